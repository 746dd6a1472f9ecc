"""Llama 2: the model and its whole open recipe, from pretraining to an aligned chat model."""

from __future__ import annotations

import importlib
from typing import Any

# Imported on first use, so that `llama2 <command>` can set the process's threads and allocator
# (llama2.runtime) before torch loads.
_EXPORTS = {"Loaded": "llama2.checkpoint", "export_hf": "llama2.checkpoint",
            "load": "llama2.checkpoint", "save": "llama2.checkpoint",
            "ModelArgs": "llama2.model", "Transformer": "llama2.model",
            "Tokenizer": "llama2.tokenizer"}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llama2' has no attribute {name!r}")
