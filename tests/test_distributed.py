"""Multi-process training with FSDP2 (gloo on CPU) against one process.

`torchrun --nproc_per_node 2` runs the same command: the same global batch per step, so
the loss curve matches the single-process one to float tolerance, while each process
holds half of the parameters and optimizer state. Checkpoints move between the two.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dataset(tmp_path_factory.mktemp("dist"), 400)


def _args(dataset: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["pretrain", "--run_dir", str(run_dir), "--data.dataset", str(dataset),
            "--data.seq_len", "32", "--model.preset", "micro", "--model.max_seq_len", "32",
            "--train.lr", "3e-3", "--train.schedule", "constant", "--train.warmup_steps", "3",
            "--train.max_steps", str(steps), "--train.micro_batch_size", "4",
            "--train.global_batch", "16", "--train.save_every", "5", "--train.keep_checkpoints",
            "5", "--train.eval_every", "5", "--train.eval_batches", "4", "--train.progress",
            "false", "--train.dtype", "float32", "--train.device", "cpu", *extra]


def _run(args: list[str], procs: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "llama2.cli"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
        "--standalone", "-m", "llama2.cli"]
    # A new session, so a timeout can kill the launcher and its workers together.
    proc = subprocess.Popen(launcher + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    out = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "terminate called" not in out.stderr


def _curve(run_dir: Path, key: str = "loss") -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r}


def _close(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys() and a
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4, abs=1e-5), step


def test_two_processes_match_one(dataset: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _run(_args(dataset, one, 10), 1)
    _run(_args(dataset, two, 10), 2)
    _close(_curve(one), _curve(two))
    _close(_curve(one, "val_loss"), _curve(two, "val_loss"))
    assert _curve(one)[10] < _curve(one)[1] - 0.3  # it learns
    s1 = json.loads((one / "summary.json").read_text())["per_rank"]
    s2 = json.loads((two / "summary.json").read_text())["per_rank"]
    assert len(s1) == 1 and len(s2) == 2
    state1 = s1[0]["param_bytes"] + s1[0]["optimizer_bytes"]
    for rank in s2:  # each process holds about half of the parameters and Adam moments
        assert rank["param_bytes"] + rank["optimizer_bytes"] < 0.6 * state1

    # A sharded checkpoint continues in one process, a single-process one under FSDP2;
    # both continue the 1-process run (constant LR: a longer run has the same schedule).
    ref = tmp_path / "ref"
    _run(_args(dataset, ref, 15), 1)
    for src, procs in ((two, 1), (one, 2)):
        cont = tmp_path / f"cont_{procs}"
        shutil.copytree(src, cont)
        _run(_args(dataset, cont, 15, "--resume"), procs)
        _close(_curve(ref), _curve(cont))
