from __future__ import annotations

import os
import subprocess
import sys
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


def tiny_policy_and_rms(root: Path) -> dict[str, str]:
    """An untrained 1-layer policy and Helpfulness/Safety RMs on a world tokenizer, saved
    under root/{policy,rm_helpful,rm_safety}: the stages' mechanics at the smallest size."""
    import torch

    from llama2 import checkpoint
    from llama2.model import ModelArgs, Transformer
    from llama2.reward import from_policy, save_reward_model
    from llama2.tokenizer import train_tokenizer
    from llama2.world import World

    texts = [m["content"] for d in World(0).demonstrations(120, 40) for m in d] + ["[INST] [/INST]"]
    tok = train_tokenizer(texts, root / "tok.model", vocab_size=400)
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                     multiple_of=16, max_seq_len=256)
    torch.manual_seed(0)
    for name in ("policy", "rm_helpful", "rm_safety"):
        model = Transformer(args)
        model.init_weights()
        if name == "policy":
            checkpoint.save(model, tok, root / name)
        else:
            save_reward_model(from_policy(model), tok, root / name,
                              "helpfulness" if name == "rm_helpful" else "safety")
    return {k: str(root / k) for k in ("policy", "rm_helpful", "rm_safety")}


def pipeline_cmd(out: Path, *extra: str) -> list[str]:
    """`llama2 pipeline --quick --out OUT EXTRA...` as a command line."""
    return [sys.executable, "-m", "llama2.cli", "pipeline", "--quick", "--out", str(out), *extra]


# Runs that are compared with each other use the same threads: the thread count changes the
# floats of reductions, and without OMP_NUM_THREADS each run picks its own from the cores that
# are idle when it starts (runtime.configure).
PIPELINE_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}


def run_pipeline(out: Path, *extra: str) -> subprocess.CompletedProcess:
    """The quick pipeline in a process of its own; it must succeed."""
    r = subprocess.run(pipeline_cmd(out, *extra), capture_output=True, text=True, timeout=900,
                       env=PIPELINE_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`llama2 pipeline --quick`, uninterrupted: run once for the slow tests that read it (its
    outputs, the stage contract's reference run, the torchrun comparison)."""
    out = tmp_path_factory.mktemp("quick") / "run"
    run_pipeline(out)
    return out
