"""The main job end to end: `llama2 pipeline --quick`, killed in the middle and started again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama2.stages.pipeline import parse_args

STAGE_OUTPUTS = [
    "world/corpus.txt", "tokenizer.model", "pretrain/model/config.json", "sft/model/config.json",
    "rlhf/rounds.json", "rlhf/preferences/helpful_batch_0.jsonl", "rlhf/v1/rm_helpful/eval.json",
    "rlhf/v1/rm_safety/eval.json", "rlhf/v1/rejection_sampling/curves.json",
    "rlhf/v1/ppo/model/config.json", "rm_ablation/margin_none/eval.json",
    "gatt/model/config.json", "gatt/adherence.json", "distill/summary.json",
    "safety_scaling.json", "redteam.json", "eval/sft/summary.json", "eval/final/summary.json",
    "eval/tracking.json", "reproduction.json", "report.md", "report.html",
]


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def test_quick_config_is_the_tiny_one_made_small():
    quick, tiny = parse_args(["--quick"]), parse_args([])
    assert quick.pretrain.train.max_steps < tiny.pretrain.train.max_steps
    assert quick.rlhf.rounds == 1 and quick.rlhf.ppo_from == 1  # every stage still runs
    assert parse_args(["--quick", "--rlhf.rounds", "2"]).rlhf.rounds == 2


@pytest.mark.slow
def test_quick_pipeline_resumes_after_a_kill_and_writes_every_output(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "llama2.cli", "pipeline", "--quick", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # First run: killed (SIGKILL, no chance to clean up) once SFT has finished: its marker
    # (written last, contract.py) says so.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 400
    while '"complete": true' not in _text(out / "sft" / "done.json"):
        assert proc.poll() is None, "the pipeline stopped before SFT finished"
        assert time.time() < deadline, "SFT did not finish in time"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pretrain_mtime = (out / "pretrain" / "model" / "model.safetensors").stat().st_mtime
    # Second run: resumes, does not redo finished stages, and finishes.
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "pretrain" / "model" / "model.safetensors").stat().st_mtime == pretrain_mtime
    assert r.stderr.count("(already done: skipped)") >= 4  # world, tokenizer, pretrain, SFT
    times = json.loads((out / "stage_times.json").read_text())
    assert times["pretraining"] > 1.0  # the time of the killed run that did it, not the skip
    missing = [p for p in STAGE_OUTPUTS if not (out / p).is_file()]
    assert not missing, f"missing outputs: {missing}"
    rows = json.loads((out / "reproduction.json").read_text())
    assert len(rows) >= 12 and all({"finding", "paper", "measured", "reproduced"} <= set(r)
                                   for r in rows)
    html = (out / "report.html").read_text()
    pngs = [p for p in Path(out).rglob("*.png")]
    assert "<img" in html and pngs
    versions = json.loads((out / "versions.json").read_text())
    assert {"pretrain", "sft", "rlhf_v1", "gatt", "final"} <= set(versions)
