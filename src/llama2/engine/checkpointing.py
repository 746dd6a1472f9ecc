"""Training checkpoints that lose nothing, written atomically.

One file per checkpoint, `run_dir/checkpoints/step_0000100.pt`, holding the full model and
optimizer state (keyed by parameter name, see `distributed.full_state`), the LR scheduler,
the RNG states of every process (python, numpy, torch, cuda), the data sources' positions,
the step and free-form `extra`. It is written to a temporary file and renamed, then
`checkpoints/latest` (a text file naming it) is replaced the same way: a crash at any moment
leaves the previous checkpoint intact. Resuming restores all of it, so a resumed fp32 run
equals the uninterrupted one step for step (tests/test_resume.py).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama2.utils import atomic_torch_save, atomic_write_text

CKPT_DIR = "checkpoints"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step_{step:07d}.pt"


def write(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write checkpoint `step`, point `latest` at it, prune old ones."""
    path = checkpoint_path(run_dir, step)
    atomic_torch_save(payload, path)
    atomic_write_text(path.parent / "latest", path.name + "\n")
    if keep > 0:
        for old in sorted(path.parent.glob("step_*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
    return path


def clean_partial(run_dir: str | Path) -> None:
    """Remove temporary files a killed writer left behind (they never replaced a file)."""
    folder = Path(run_dir) / CKPT_DIR
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    folder = Path(run_dir) / CKPT_DIR
    pointer = folder / "latest"
    if pointer.is_file():
        path = folder / pointer.read_text().strip()
        if path.is_file():
            return path
    found = sorted(folder.glob("step_*.pt")) if folder.is_dir() else []
    return found[-1] if found else None


def read(path: str | Path) -> dict[str, Any]:
    # Our own files (they hold RNG tuples and numpy arrays, hence weights_only=False);
    # mmap keeps a large checkpoint out of memory until each tensor is used.
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
