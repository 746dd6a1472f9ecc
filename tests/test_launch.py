"""Bad launches stop with one line, and one launch writes a run directory at a time.

A global batch that does not split over the processes, reward models on another tokenizer than
the policy's, and a run directory that another launch holds are each a `LaunchError`: under
torchrun every rank finds it and rank 0 alone prints `llama2 CMD: error: ...`, with no
traceback from the workers (torchrun adds its own failure summary). The run directory's lock
(stages/contract.py) goes when the command ends, and a lock left by a killed launch is taken
over. The slow test runs the quick pipeline in one process and under torchrun and compares
their reproduction tables.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_policy_and_rms
from llama2.engine.distributed import LaunchError
from llama2.stages import contract


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny policy and its RMs, and a safety RM on a tokenizer of its own."""
    import torch

    from llama2.model import ModelArgs, Transformer
    from llama2.reward import from_policy, save_reward_model
    from llama2.tokenizer import train_tokenizer
    from llama2.world import World

    root = tmp_path_factory.mktemp("launch")
    paths = tiny_policy_and_rms(root)
    texts = [m["content"] for d in World(1).demonstrations(60, 20) for m in d]
    tok = train_tokenizer(texts, root / "other.model", vocab_size=500)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                  vocab_size=tok.n_words, multiple_of=16, max_seq_len=256))
    model.init_weights()
    save_reward_model(from_policy(model), tok, root / "rm_other", "safety")
    return {**paths, "rm_other": str(root / "rm_other")}


def _llama2(args: list[str], procs: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """`llama2 ARGS` in a process of its own, or under torchrun with `procs` processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "llama2.cli"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
        str(procs), "-m", "llama2.cli"]
    # A new session, so that a timeout ends the launcher and its workers together.
    proc = subprocess.Popen(launcher + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("llama2 ")]


# ------------------------------------------------------------------ the global batch
def test_a_global_batch_must_split_over_the_processes() -> None:
    """Every training section is checked at launch and the error names its field."""
    from llama2.stages.common import check_batches
    from llama2.stages.pipeline import parse_args

    cfg = parse_args(["--quick", "--rlhf.helpful_rm.train.global_batch", "7"])
    check_batches(cfg, 1)
    with pytest.raises(LaunchError, match=r"^rlhf\.helpful_rm\.train\.global_batch 7: a global "
                                          r"batch of 7 sequences does not split over 2 processes"):
        check_batches(cfg, 2)
    cfg.rlhf.helpful_rm.train.global_batch = 8  # the micro-batch (16) shrinks to 4 per process
    check_batches(cfg, 2)
    cfg.rlhf.ppo.minibatch = 9  # PPO's global sizes too, before the rounds before PPO run
    with pytest.raises(LaunchError, match=r"^rlhf\.ppo\.minibatch 9: a global size that does "
                                          r"not split over 2 processes"):
        check_batches(cfg, 2)


def test_under_torchrun_a_bad_global_batch_is_one_line(models: dict[str, str],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "sft"
    r = _llama2(["sft", "--model", models["policy"], "--train.global_batch", "7",
                 "--train.device", "cpu", "--out", str(out)], procs=2)
    assert r.returncode != 0
    assert _error_lines(r.stderr) == [
        "llama2 sft: error: train.global_batch 7: a global batch of 7 sequences does not split "
        "over 2 processes; launch a number of processes that divides it, or make it a multiple "
        "of 2"]
    assert "src/llama2" not in r.stderr  # no worker's traceback (torchrun prints its own)
    assert not out.exists()  # found before anything was written


# ------------------------------------------------------------------ reward models
def test_reward_models_must_share_the_policys_tokenizer(models: dict[str, str],
                                                        tmp_path: Path) -> None:
    from llama2.cli import main
    from llama2.eval.suites import _load_scorers
    from llama2.reward import TwoRewardModels
    from llama2.tokenizer import Tokenizer

    n_rm, n_policy = (Tokenizer(Path(models[k]) / "tokenizer.model").n_words
                      for k in ("rm_other", "policy"))
    TwoRewardModels(models["rm_helpful"], models["rm_safety"], policy=models["policy"])
    with pytest.raises(LaunchError, match=f"tokenizer .{n_rm} pieces. is not the policy's "
                                          f".{n_policy} pieces"):
        TwoRewardModels(models["rm_helpful"], models["rm_other"])  # nor each other's
    with pytest.raises(LaunchError, match="rm_other: the reward model's tokenizer"):
        _load_scorers([models["rm_other"]], models["policy"])  # evaluation loads them so too
    out = tmp_path / "rs"
    with pytest.raises(SystemExit) as e:
        main(["rejection-sample", "--model", models["policy"], "--helpful_rm",
              models["rm_helpful"], "--safety_rm", models["rm_other"], "--n_prompts", "2",
              "--train.device", "cpu", "--out", str(out)])
    assert str(e.value.code) == (
        f"llama2 rejection-sample: error: {models['rm_other']}: the reward model's tokenizer "
        f"({n_rm} pieces) is not the policy's ({n_policy} pieces); train the reward model from the "
        "policy's checkpoint (or its SFT model)")
    assert not (out / contract.LOCK).exists()  # the command is over: its lock is gone


# ------------------------------------------------------------------ the run directory's lock
def _write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / contract.LOCK
    lock.write_text(f"{pid} {host or socket.gethostname()}\n")
    return lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_launch_on_a_run_directory_is_refused(tmp_path: Path) -> None:
    run, host = tmp_path / "run", socket.gethostname()
    _write_lock(run, os.getppid())  # a live process on this host holds it
    busy = (f"{run} is being written by another launch (pid {os.getppid()} on {host}); wait "
            f"for it to end, or remove {run / contract.LOCK} if that launch is gone")
    with pytest.raises(LaunchError) as e:
        contract.claim(run)
    assert str(e.value) == busy
    # A folder inside it too, from the command line: one line, before anything is written.
    r = _llama2(["sft", "--out", str(run / "sft")])
    assert r.returncode == 1 and r.stderr.strip() == f"llama2 sft: error: {busy}"
    assert not (run / "sft").exists()
    r = _llama2(["eval", "--model", "unread", "--suite", "perplexity", "--out", str(run)])
    assert r.returncode == 1 and r.stderr.strip() == f"llama2 eval: error: {busy}"
    _write_lock(run, 1, "elsewhere")  # another host: its pid cannot be checked from here
    with pytest.raises(LaunchError, match=r"\(pid 1 on elsewhere\)"):
        contract.claim(run)


def test_the_lock_is_taken_and_released(models: dict[str, str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    contract.claim(run)
    assert (run / contract.LOCK).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    contract.claim(run)  # this process holds it already
    contract.release()
    assert not (run / contract.LOCK).exists()
    # A whole command: the lock is there while it runs and gone once it ends.
    out = tmp_path / "sft"
    r = _llama2(["sft", "--model", models["policy"], "--n_helpful", "8", "--n_safety", "0",
                 "--val_fraction", "0", "--seq_len", "64", "--train.max_steps", "1",
                 "--train.micro_batch_size", "4", "--train.global_batch", "4",
                 "--train.progress", "false", "--train.device", "cpu", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "model" / "config.json").is_file() and not (out / contract.LOCK).exists()


def test_a_stale_lock_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    dead = _dead_pid()
    _write_lock(run, dead)  # a killed launch's lock
    contract.claim(run)
    assert (run / contract.LOCK).read_text().split()[0] == str(os.getpid())
    assert f"the launch that held it (pid {dead}) is gone" in capsys.readouterr().err
    contract.release()
    (run / contract.LOCK).write_text("")  # killed between creating the lock and writing it
    contract.claim(run)
    assert (run / contract.LOCK).read_text().split()[0] == str(os.getpid())
    contract.release()


# ------------------------------------------------------------------ the pipeline
@pytest.mark.slow
def test_pipeline_under_torchrun_gives_the_one_process_table(quick_run: Path,
                                                            tmp_path: Path) -> None:
    """`llama2 pipeline --quick` on 2 processes runs end to end and finds what one process
    finds (the session's one-process run, `quick_run`). The trained weights differ by float
    rounding (FSDP's gradient reduction order and AdamW kernel, bfloat16 gradients of a
    micro-batch halved over 2 ranks, one thread a rank against the machine's), which sampling
    later amplifies, so some measured numbers differ: the findings and verdicts must not."""
    one, two = quick_run, tmp_path / "two"
    r2 = _llama2(["pipeline", "--quick", "--out", str(two)], procs=2, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    rows1 = json.loads((one / "reproduction.json").read_text())
    rows2 = json.loads((two / "reproduction.json").read_text())
    differ = "\n".join(f"{a['finding']}:\n  1: {a['measured']}\n  2: {b['measured']}"
                       for a, b in zip(rows1, rows2) if a["measured"] != b["measured"])
    assert [(r["finding"], r["paper"], r["reproduced"]) for r in rows2] == \
        [(r["finding"], r["paper"], r["reproduced"]) for r in rows1], differ
    assert r2.stderr.count("reproduction of the paper's findings:") == 1  # rank 0 alone logs
    assert not (two / contract.LOCK).exists()
