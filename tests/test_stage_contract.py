"""The stage contract (stages/contract.py): one marker per stage decides "done", for the
settings and inputs it ran with; a changed setting re-runs what it touches, a killed run
resumes, and the run directory's config always describes its artefacts."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import PIPELINE_ENV, pipeline_cmd, run_pipeline
from llama2 import config as config_mod
from llama2.engine import TrainConfig
from llama2.stages.contract import MARKER, Stage, input_hash, marker_of
from llama2.stages.pipeline import parse_args


@dataclass
class Toy:
    model: str = ""
    out: str = "runs/toy"
    n: int = 10
    train: TrainConfig = field(default_factory=TrainConfig)


def _stage(folder: Path, cfg: Toy, **inputs) -> Stage:
    return Stage(folder / MARKER, {"toy": cfg}, inputs)


def _run(folder: Path, cfg: Toy, **inputs) -> bool:
    """A stage that writes a checkpoint, then its model; True if it was skipped."""
    stage = _stage(folder, cfg, **inputs)
    if stage.done():
        return True
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints" / "step_1.pt").write_text("ckpt")
    (folder / "model").mkdir(exist_ok=True)
    (folder / "model" / "config.json").write_text("{}")
    stage.finish()
    return False


def test_same_settings_are_done_and_run_only_settings_do_not_count(tmp_path, capsys):
    assert not _run(tmp_path / "s", Toy(n=3))
    moved = Toy(n=3, out="elsewhere", train=TrainConfig(resume=True, device="cpu", log_every=5,
                                                          save_every=7, progress=False))
    assert _run(tmp_path / "s", moved)
    assert capsys.readouterr().err == ""


def test_a_changed_key_re_runs_the_stage_without_its_checkpoints(tmp_path, capsys):
    folder = tmp_path / "s"
    _run(folder, Toy(n=3))
    stage = _stage(folder, Toy(n=3, train=TrainConfig(lr=1e-3)))
    assert not stage.done()
    err = capsys.readouterr().err.strip()
    assert err == f"{folder}: config changed (keys: toy.train.lr) -> re-running"
    # Its checkpoints were trained with the other settings: none is left to resume from.
    assert not (folder / "checkpoints").exists() and not (folder / "model").exists()
    assert not json.loads((folder / MARKER).read_text())["complete"]
    assert not _run(folder, Toy(n=3, train=TrainConfig(lr=1e-3)))
    assert _run(folder, Toy(n=3, train=TrainConfig(lr=1e-3)))
    assert not _run(folder, Toy(n=3))  # and back


def test_a_re_made_input_re_runs_the_stage_downstream(tmp_path, capsys):
    up, down = tmp_path / "up", tmp_path / "down"
    _run(up, Toy(n=1))
    _run(down, Toy(model=str(up / "model")), **{"toy.model": up / "model"})
    assert _run(down, Toy(model=str(up / "model")), **{"toy.model": up / "model"})
    _run(up, Toy(n=2))  # upstream re-run with other settings: a new marker hash
    capsys.readouterr()
    assert not _run(down, Toy(model=str(up / "model")), **{"toy.model": up / "model"})
    assert f"{down}: inputs re-made (toy.model) -> re-running" in capsys.readouterr().err
    # The input's path is not part of the settings, its marker is: a moved run is still done.
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path, moved)
    assert _run(moved / "down", Toy(model="x"), **{"toy.model": moved / "up" / "model"})


def test_a_killed_stage_resumes_from_its_checkpoints_with_the_same_settings(tmp_path, capsys):
    folder = tmp_path / "s"
    stage = _stage(folder, Toy(n=3))
    assert not stage.done()
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "step_1.pt").write_text("ckpt")  # then killed: no finish()
    assert not _stage(folder, Toy(n=3)).done()
    assert (folder / "checkpoints" / "step_1.pt").is_file()  # kept for the resume
    assert not _stage(folder, Toy(n=4)).done()  # other settings: the checkpoint goes
    assert not (folder / "checkpoints").exists()
    assert "keys: toy.n" in capsys.readouterr().err


def test_outputs_without_a_record_are_not_kept(tmp_path, capsys):
    folder = tmp_path / "s"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "config.json").write_text("{}")  # a run from before the contract
    assert not _stage(folder, Toy()).done()
    assert not (folder / "model").exists()
    assert "without a record of their config" in capsys.readouterr().err


def test_a_stage_made_as_a_finished_one_was_is_copied_from_it(tmp_path, capsys):
    up, twin = tmp_path / "up", tmp_path / "twin"
    _run(up, Toy(n=1))
    _run(twin, Toy(model=str(up / "model")), **{"toy.model": up / "model"})
    (twin / "eval.json").write_text('{"acc": 0.7}')
    trained = []

    def run(folder: Path, cfg: Toy) -> bool:
        stage = _stage(folder, cfg, **{"toy.model": up / "model"})
        return stage.run(lambda: trained.append(folder), twin, cfg)

    same = Toy(model=str(up / "model"), out=str(tmp_path / "copy"))
    assert not _stage(tmp_path / "copy", same, **{"toy.model": up / "model"}).done()
    (tmp_path / "copy" / "step_9.pt").write_text("ckpt")  # then killed: its checkpoint goes
    assert not run(tmp_path / "copy", same) and not trained
    assert not (tmp_path / "copy" / "step_9.pt").exists()
    assert (tmp_path / "copy" / "eval.json").read_text() == '{"acc": 0.7}'
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["out"] == same.out
    assert f"{tmp_path / 'copy'}: made as {twin} was" in capsys.readouterr().err
    assert run(tmp_path / "copy", same)  # done now, with its own marker
    # Other settings, or the same settings on a re-made input: trained, not copied.
    assert not run(tmp_path / "other", Toy(model=str(up / "model"), n=5))
    _run(up, Toy(n=2))
    assert not run(tmp_path / "later", same)
    assert trained == [tmp_path / "other", tmp_path / "later"]


def test_marker_of_finds_the_stage_that_made_a_path(tmp_path):
    rs = tmp_path / "rlhf" / "v1" / "rejection_sampling"
    _run(rs, Toy())
    assert marker_of(rs / "train" / "model") == rs / MARKER
    assert marker_of(rs / "best.jsonl") == rs / MARKER
    assert input_hash(str(rs / "train" / "model") + "#transcript").endswith("#transcript")
    assert input_hash(tmp_path / "downloaded").startswith("path:")


@pytest.mark.parametrize("refresh", [0, 1])
def test_rlhf_drops_the_rounds_a_smaller_config_no_longer_has(tmp_path, refresh):
    from llama2.stages.rlhf import RLHFConfig, _drop_later_rounds, first_batch

    prefs = tmp_path / "preferences"
    prefs.mkdir()
    for k in range(4):
        (tmp_path / f"v{k + 1}").mkdir()
        for name in (f"helpful_batch_{k}.jsonl", f"eval_stats_batch_{k}.json",
                     f"batch_{k}.done.json"):
            (prefs / name).write_text("x")
    # One batch a round; with ppo_refresh, a PPO round (here from round 1) has one more.
    cfg = RLHFConfig(out=str(tmp_path), rounds=1, ppo_from=1, ppo_refresh=refresh)
    assert [first_batch(cfg, v) for v in (1, 2, 3)] == [0, 1 + refresh, 2 + 2 * refresh]
    _drop_later_rounds(cfg)
    assert (tmp_path / "v1").is_dir() and not (tmp_path / "v2").exists()
    kept = sorted(p.name for p in prefs.iterdir())
    assert kept == sorted(f"{name}_{k}.{ext}" for k in range(1 + refresh) for name, ext in
                          (("batch", "done.json"), ("eval_stats_batch", "json"),
                           ("helpful_batch", "jsonl")))


# ------------------------------------------------------------------ the pipeline end to end
def _markers(run: Path) -> dict[str, dict]:
    return {str(p.relative_to(run)): json.loads(p.read_text())
            for p in sorted(run.rglob(f"*{MARKER}"))}


def _weights(run: Path) -> dict[str, dict]:
    from safetensors.torch import load_file

    return {str(p.relative_to(run)): load_file(p) for p in sorted(run.rglob("*.safetensors"))}


@pytest.mark.slow
def test_a_changed_setting_re_runs_what_it_touches_and_the_config_matches(quick_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(quick_run, out)
    before = _markers(out)
    assert before and all(m["complete"] for m in before.values())
    r = run_pipeline(out)  # moved, same settings: nothing to do
    assert r.stderr.count("(already done: skipped)") == 12

    # Fewer pretraining steps: pretraining and everything downstream of it run again.
    r = run_pipeline(out, "--pretrain.train.max_steps", "30")
    assert f"{out / 'pretrain'}: config changed (keys: pretrain.train.max_steps) -> re-running" \
        in r.stderr
    assert r.stderr.count("(already done: skipped)") == 2  # world data, tokenizer
    after = _markers(out)
    assert set(after) == set(before) and all(m["complete"] for m in after.values())
    kept = sorted(k for k in after if after[k]["hash"] == before[k]["hash"])
    assert kept == ["tokenizer.done.json", f"world/{MARKER}"]
    assert after[f"pretrain/{MARKER}"]["config"]["pretrain"]["train"]["max_steps"] == 30
    extra = json.loads((out / "pretrain" / "model" / "config.json").read_text())["extra"]
    assert extra["step"] == 30
    requested = config_mod.to_dict(parse_args(["--quick", "--out", str(out),
                                               "--pretrain.train.max_steps", "30"]))
    assert json.loads((out / "pipeline_config.json").read_text()) == \
        json.loads(json.dumps(requested, default=str))

    # A PPO setting: among the RLHF sub-stages PPO and what its policy feeds (the refresh batch,
    # the RM trained on it, the second PPO), and the stages after it.
    r = run_pipeline(out, "--pretrain.train.max_steps", "30", "--rlhf.ppo.iterations", "1")
    v1 = out / "rlhf" / "v1"
    assert f"{v1 / 'ppo'}: config changed (keys: ppo.iterations)" in r.stderr
    assert f"{v1 / 'refresh_1' / 'rm_helpful'}: inputs re-made" in r.stderr
    assert f"{v1 / 'refresh_1' / 'ppo'}: config changed (keys: ppo.iterations)" in r.stderr
    assert f"{v1 / 'rm_helpful'}:" not in r.stderr and "rejection_sampling:" not in r.stderr
    # world, tokenizer, pretraining, SFT, the RM ablations, safety data scaling
    assert r.stderr.count("(already done: skipped)") == 6
    # A stage switched off: its outputs go, and the report no longer counts on them.
    r = run_pipeline(out, "--pretrain.train.max_steps", "30", "--rlhf.ppo.iterations", "1",
                  "--redteam.enabled", "false")
    assert f"{out / 'redteam'}: disabled -> its outputs removed" in r.stderr
    assert not (out / "redteam.json").exists() and not (out / "redteam.done.json").exists()
    assert f"{out / 'report'}: inputs re-made (redteam)" in r.stderr
    saved = json.loads((out / "pipeline_config.json").read_text())
    assert saved["redteam"]["enabled"] is False and saved["rlhf"]["ppo"]["iterations"] == 1


def _start_and_kill(out: Path, log: Path, stage: int, delay: float) -> str:
    """Start the pipeline, SIGKILL it `delay` s after it announces stage `stage` (1-based);
    returns where the kill landed (the last stage announced) or "finished"."""
    with open(log, "w") as f:
        proc = subprocess.Popen(pipeline_cmd(out), stdout=subprocess.DEVNULL, stderr=f,
                                start_new_session=True, env=PIPELINE_ENV)
    while proc.poll() is None and f"=== [{stage}/" not in log.read_text():
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return "finished"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return log.read_text().rpartition("=== [")[2].partition(" (")[0]


@pytest.mark.slow
def test_killed_at_random_moments_it_ends_like_an_uninterrupted_run(quick_run, tmp_path):
    """SIGKILL at random moments, started again each time: the same reproduction table and
    the same weights of every model as the uninterrupted run. Each kill lands at a random
    moment of a random stage (within its duration in the uninterrupted run), the stages drawn
    in pipeline order; LLAMA2_KILLS sets how many (default 4)."""
    reference = quick_run
    durations = list(json.loads((reference / "stage_times.json").read_text()).values())
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    out = tmp_path / "run"
    landed = []
    # Stages in increasing order: each start gets past the kills before it.
    for stage in sorted(rng.randrange(len(durations))
                        for _ in range(int(os.environ.get("LLAMA2_KILLS", "4")))):
        landed.append(_start_and_kill(out, tmp_path / "log.txt", stage + 1,
                                      rng.uniform(0, durations[stage])))
    why = f"kills (seed {seed}) landed in: {landed}"
    print(why)
    r = subprocess.run(pipeline_cmd(out), capture_output=True, text=True, timeout=900,
                       env=PIPELINE_ENV)
    assert r.returncode == 0, f"{why}\n{r.stderr[-3000:]}"
    assert "reproduction of the paper's findings" in r.stderr, why
    assert json.loads((out / "reproduction.json").read_text()) == \
        json.loads((reference / "reproduction.json").read_text()), why
    got, want = _weights(out), _weights(reference)
    assert sorted(got) == sorted(want), why
    for name, tensors in want.items():
        assert sorted(got[name]) == sorted(tensors), f"{why}: {name}"
        for key, t in tensors.items():
            assert got[name][key].equal(t), f"{why}: {name} {key} differs"
