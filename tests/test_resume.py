"""Crash safety: SIGKILL a pretraining run mid-way, resume it, and get the same run.

Same per-step losses (fp32, same machine) and bit-identical final weights as a run that was
never interrupted; the checkpoints on disk are always complete.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_dataset

STEPS, SAVE_EVERY = 120, 20


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("resume"), 600)


def _command(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llama2.cli", "pretrain", "--run_dir", str(run_dir),
            "--data.dataset", str(dataset), "--data.seq_len", "64", "--model.preset", "micro",
            "--model.dim", "64", "--model.max_seq_len", "64", "--train.lr", "3e-3",
            "--train.warmup_steps", "10", "--train.max_steps", str(STEPS),
            "--train.micro_batch_size", "8", "--train.global_batch", "16",
            "--train.save_every", str(SAVE_EVERY), "--train.eval_every", "40",
            "--train.eval_batches", "2", "--train.progress", "false", "--train.dtype",
            "float32", "--train.seed", "7", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _last_step(run_dir: Path) -> int:
    try:
        return max((r["step"] for r in _records(run_dir)), default=0)
    except json.JSONDecodeError:  # a line being appended right now
        return 0


def test_sigkill_then_resume_equals_uninterrupted(dataset: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    subprocess.run(_command(dataset, full), check=True, env=_env(), timeout=300,
                   capture_output=True)

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(_command(dataset, crashed), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = SAVE_EVERY * 2 + SAVE_EVERY // 2  # between two checkpoints
    deadline = time.time() + 240
    while _last_step(crashed) < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _last_step(crashed)
    assert SAVE_EVERY * 2 <= killed_at < STEPS, f"killed at step {killed_at}"

    # Whatever is on disk is complete: every checkpoint loads, `latest` names one.
    ckpts = sorted((crashed / "checkpoints").glob("step_*.pt"))
    assert ckpts and all(torch.load(p, weights_only=False)["step"] % SAVE_EVERY == 0
                         for p in ckpts)
    assert not (crashed / "model").exists()
    with open(crashed / "metrics.jsonl", "a") as f:  # as if killed in the middle of a line
        f.write('{"step": 99, "lo')

    again = subprocess.run(_command(dataset, crashed, "--resume"), env=_env(), timeout=300,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from" in again.stderr
    assert not list((crashed / "checkpoints").glob(".*"))  # no temporary files left

    a = [(r["step"], r["loss"]) for r in _records(full) if "loss" in r]
    b = [(r["step"], r["loss"]) for r in _records(crashed) if "loss" in r]
    assert len(a) == STEPS and a == b  # bit-identical loss curve, each step once
    va = [(r["step"], r["val_loss"]) for r in _records(full) if "val_loss" in r]
    assert va == [(r["step"], r["val_loss"]) for r in _records(crashed) if "val_loss" in r]
    wa = load_file(full / "model" / "model.safetensors")
    wb = load_file(crashed / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that dies mid-file leaves the previous checkpoint and `latest` untouched."""
    from llama2.engine import checkpointing

    checkpointing.write(tmp_path, 5, {"step": 5})

    def broken_save(obj, path, *a, **k):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpointing.write(tmp_path, 10, {"step": 10})
    monkeypatch.undo()
    assert checkpointing.latest(tmp_path).name == "step_0000005.pt"
    assert checkpointing.read(checkpointing.latest(tmp_path))["step"] == 5
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] in (
        ["step_0000005.pt", "latest"], ["latest", "step_0000005.pt"])
