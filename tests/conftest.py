from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_file(*parts: str) -> Path:
    """A file in ../shared/data, or a skip that says it is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is missing (../shared/data is not beside this checkout)")
    return path


def tiny_docs(n: int) -> list[str]:
    """A seeded toy corpus for tokenizer/pretraining tests."""
    import numpy as np

    words = ["the cat", "a dog", "ran home", "saw the sun", "was happy", "Lily", "Tom", "and"]
    rng = np.random.default_rng(0)
    return [" ".join(rng.choice(words, size=rng.integers(5, 40))) + "." for _ in range(n)]


def tiny_dataset(root: Path, n_docs: int) -> Path:
    """A prepared pretraining dataset (300-piece tokenizer) under root/data."""
    from llama2.data.pretrain import prepare
    from llama2.tokenizer import train_tokenizer

    docs = tiny_docs(n_docs)
    tok = train_tokenizer(docs, root / "tok.model", vocab_size=300)
    prepare(docs, tok, root / "data", val_fraction=0.05, progress=False, workers=1)
    return root / "data"
