"""Training checkpoints that lose nothing, written atomically.

One file per checkpoint, `run_dir/checkpoints/step_0000100.pt`, holding the full model and
optimizer state (keyed by parameter name, see `distributed.full_state`), the LR scheduler,
the RNG states of every process (python, numpy, torch, cuda), the data sources' positions,
the step and free-form `extra`. It is written to a temporary file and renamed, then
`checkpoints/latest` (a text file naming it) is replaced the same way: a crash at any moment
leaves the previous checkpoint intact. Resuming restores all of it, so a resumed fp32 run
equals the uninterrupted one step for step (tests/test_resume.py).

The Trainer and PPO both start with `prepare` (refuse to overwrite a run unless resuming, clear
a killed writer's leftovers, name the checkpoint to resume from), save the RNG states of their
processes with `rng_states` and restore them with `set_rng_states`, and `write` / `read`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama2.engine import distributed
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


def rng_states(info: Any = None) -> list[dict[str, Any]]:
    """The RNG states of every process (`distributed.DistInfo`; None: this one alone), in
    rank order: a checkpoint's "rng"."""
    if info is None:
        return [rng_state()]
    return distributed.all_gather_object(rng_state(), info)


def set_rng_states(states: list[dict[str, Any]], rank: int = 0, world_size: int = 1) -> None:
    """Restore this process's RNG states from a checkpoint's "rng" (saved by as many
    processes; otherwise every process takes rank 0's)."""
    set_rng_state(states[rank] if len(states) == world_size else states[0])


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


def prepare(run_dir: str | Path, resume: bool, is_main: bool = True) -> Path | None:
    """Ready `run_dir` for a run: refuse one that holds checkpoints unless resuming, and (on
    the main process) create it and remove a killed writer's temporary files. Returns the
    checkpoint to resume from, or None for a fresh start."""
    path = latest(run_dir)
    if path is not None and not resume:
        raise ValueError(f"{run_dir} already holds checkpoints; pass --resume to continue it "
                         "or choose another run directory")
    if is_main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        clean_partial(run_dir)
    return path if resume else None


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
