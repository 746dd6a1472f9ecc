"""Multi-process runs (gloo on CPU) against one process: the rule of engine/distributed.py.

`torchrun --nproc_per_node 2` runs the same command: the same global batch per step, so
the loss curve matches the single-process one to float tolerance, while each process
holds half of the parameters and optimizer state. Checkpoints move between the two. A
generating stage splits its prompts over the ranks and writes the one-process run's files;
PPO shards its trained models and splits its rollouts and minibatches; only rank 0 writes and
logs; a stage that is not distributed runs once, on rank 0.
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


def _run(args: list[str], procs: int, script: Path | None = None
         ) -> subprocess.CompletedProcess:
    """`llama2 ARGS` (or `python SCRIPT ARGS`) in 1 process or under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    program = [str(script)] if script else ["-m", "llama2.cli"]
    launcher = [sys.executable, *program] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
        "--standalone", *program]
    # A new session, so a timeout can kill the launcher and its workers together.
    proc = subprocess.Popen(launcher + args, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, err)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "terminate called" not in out.stderr
    return out


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


# ----------------------------------------------------------------- the recipe's stages
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The tiny policy and two RMs whose score heads are random (so samples score apart)."""
    import torch

    from conftest import tiny_policy_and_rms
    from llama2.reward import load_reward_model, save_reward_model

    root = tmp_path_factory.mktemp("stages")
    paths = tiny_policy_and_rms(root)
    for name in ("rm_helpful", "rm_safety"):
        rm, tok, meta = load_reward_model(paths[name])
        with torch.no_grad():
            rm.score_head.weight.normal_(generator=torch.Generator().manual_seed(len(name)))
        save_reward_model(rm, tok, paths[name], meta["kind"])
    return paths


TRAIN = ["--train.lr", "1e-3", "--train.max_steps", "4", "--train.warmup_steps", "0",
         "--train.micro_batch_size", "4", "--train.global_batch", "8", "--train.progress",
         "false", "--train.dtype", "float32", "--train.device", "cpu", "--seq_len", "128"]


def _records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _same_stdout(one: subprocess.CompletedProcess, two: subprocess.CompletedProcess,
                 a: Path, b: Path) -> None:
    """Rank 0 alone prints: the 2-process run prints what the 1-process run prints."""
    assert two.stdout.replace(str(b), str(a)) == one.stdout and one.stdout


def test_sft_two_processes_match_one(models: dict[str, str], tmp_path: Path) -> None:
    """SFT under torchrun: the same loss and held-out loss per step (the same global batch,
    the same evaluation batches), half of the parameters and Adam moments per process, each
    step logged once and the result printed once."""
    args = ["sft", "--model", models["policy"], "--n_helpful", "80", "--n_safety", "10",
            "--val_fraction", "0.2", "--train.eval_every", "2", *TRAIN]
    one, two = tmp_path / "one", tmp_path / "two"
    r1, r2 = _run([*args, "--out", str(one)], 1), _run([*args, "--out", str(two)], 2)
    _same_stdout(r1, r2, one, two)
    _close(_curve(one), _curve(two))
    _close(_curve(one, "val_loss"), _curve(two, "val_loss"))
    recs = _records(two / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 2, 3, 4, 4]  # each step once, evals at 2 and 4
    s1 = json.loads((one / "summary.json").read_text())["per_rank"]
    s2 = json.loads((two / "summary.json").read_text())["per_rank"]
    assert len(s2) == 2 and all(
        r["param_bytes"] + r["optimizer_bytes"]
        < 0.6 * (s1[0]["param_bytes"] + s1[0]["optimizer_bytes"]) for r in s2)


def test_rejection_sampling_writes_the_one_process_files(models: dict[str, str],
                                                         tmp_path: Path) -> None:
    """A generating stage: each rank samples and scores its share of the prompts, the answers
    meet in prompt order (each prompt its own seeded stream), rank 0 writes: the samples, their
    rewards, the picks and the curves are the one-process run's byte for byte, and the
    fine-tuning (FSDP2) follows the same loss curve."""
    args = ["rejection-sample", "--model", models["policy"], "--helpful_rm",
            models["rm_helpful"], "--safety_rm", models["rm_safety"], "--n_prompts", "10",
            "--k", "3", "--sweep_prompts", "4", "--sweep_temperatures", "0.7,1.3",
            "--max_new_tokens", "12", *TRAIN]
    one, two = tmp_path / "one", tmp_path / "two"
    r1, r2 = _run([*args, "--out", str(one)], 1), _run([*args, "--out", str(two)], 2)
    _same_stdout(r1, r2, one, two)
    for name in ("samples.jsonl", "best.jsonl", "curves.json"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    rc = [x for r in _records(one / "samples.jsonl") for x in r["rc"]]
    assert len(set(rc)) > len(rc) // 2  # the rewards tell the samples apart
    sweep = json.loads((one / "curves.json").read_text())["sweep"]  # each prompt's best of 3
    assert [len(x) for x in sweep["max_by_prompt"]] == [4, 4]
    assert sweep["max_by_k"]["3"] == pytest.approx([sum(x) / 4 for x in sweep["max_by_prompt"]])
    _close(_curve(one / "train"), _curve(two / "train"))


SCRIPT = """
import json, sys
from llama2 import checkpoint
from llama2.engine import distributed
from llama2.respond import respond

policy, out = sys.argv[1:]
info = distributed.init("cpu")
loaded = checkpoint.load(policy)
model = distributed.shard_model(loaded.model, info)
answers = respond(model, loaded.tokenizer, [[{"role": "user", "content": f"Say {w}."}]
                  for w in ("yes", "no", "maybe", "hello", "bye")], 12, temperature=1.0,
                  seed=5)
alone = distributed.rank0_only("a lone stage", lambda: distributed.current().world_size)
if info.is_main:
    json.dump({"answers": answers, "alone": alone}, open(out, "w"))
del model  # dropped before the process group goes (shutdown frees it)
distributed.shutdown()
"""


def test_sharded_generation_and_a_rank0_only_stage(models: dict[str, str],
                                                   tmp_path: Path) -> None:
    """An FSDP-sharded policy answers under torchrun what the whole one answers in one
    process (gathered once, the prompts split over the ranks); a stage that is not distributed
    says so in one line and runs once, on rank 0, seeing one process, while the other waits."""
    from llama2 import checkpoint
    from llama2.respond import respond

    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    r = _run([models["policy"], str(tmp_path / "out.json")], 2, script)
    loaded = checkpoint.load(models["policy"])
    want = respond(loaded.model, loaded.tokenizer, [[{"role": "user", "content": f"Say {w}."}]
                   for w in ("yes", "no", "maybe", "hello", "bye")], 12, temperature=1.0,
                   seed=5)
    got = json.loads((tmp_path / "out.json").read_text())
    assert got == {"answers": want, "alone": 1}
    assert r.stderr.count("not distributed yet") == 1
    assert "a lone stage: not distributed yet: runs on rank 0" in r.stderr


PPO_CURVES = ("reward", "kl", "policy_loss", "value_loss", "entropy", "approx_kl",
              "grad_norm", "value_grad_norm", "heldout_reward", "heldout_gold")


def test_ppo_two_processes_match_one(models: dict[str, str], tmp_path: Path) -> None:
    """PPO under torchrun: the same rollouts (each prompt its own seeded stream, wherever it is
    generated), the same reward, KL and loss per iteration (the global batch's statistics, the
    minibatch's gradient summed over the ranks), half of the policy's and value model's
    parameters and AdamW moments per process, each iteration logged once and the result
    printed once. The frozen models sharded instead of replicated change nothing, and a
    sharded run's checkpoint continues in one process to the one-process curves."""
    args = ["ppo", "--model", models["policy"], "--helpful_rm", models["rm_helpful"],
            "--safety_rm", models["rm_safety"], "--n_prompts", "16", "--heldout_prompts", "4",
            "--batch_prompts", "8", "--minibatch", "4", "--max_new_tokens", "8",
            "--eval_every", "1", "--lr", "1e-2", "--value_lr", "1e-3", "--beta", "0.05",
            "--device", "cpu"]
    one, two, three = tmp_path / "one", tmp_path / "two", tmp_path / "three"
    _run([*args, "--iterations", "3", "--out", str(one)], 1)
    r2 = _run([*args, "--iterations", "3", "--out", str(two)], 2)
    _run([*args, "--iterations", "2", "--frozen", "sharded", "--out", str(three)], 2)
    _run([*args, "--iterations", "3", "--resume", "--out", str(three)], 1)

    def curves(run: Path) -> dict[str, dict[int, float]]:
        recs = _records(run / "ppo_metrics.jsonl")
        return {k: {r["iteration"]: r[k] for r in recs if k in r} for k in PPO_CURVES}

    want = curves(one)
    assert list(want["reward"]) == [1, 2, 3] and want["kl"][3] > 0  # the policy moves
    for run in (two, three):
        got = curves(run)
        for k in PPO_CURVES:  # sums of rounded float32 terms: equal to about 1e-5
            _close(want[k], got[k])
    assert [r["iteration"] for r in _records(two / "ppo_metrics.jsonl")] == [0, 1, 2, 3]
    assert r2.stdout.count("model written to") == 1
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s2["best_iteration"] == s1["best_iteration"] and s2["world_size"] == 2
    whole = s1["per_rank"][0]["param_bytes"] + s1["per_rank"][0]["optimizer_bytes"]
    assert len(s2["per_rank"]) == 2 and all(
        r["param_bytes"] + r["optimizer_bytes"] < 0.6 * whole for r in s2["per_rank"])


# ------------------------------------------------- the other stages: one process and two
def _one_and_two(args: list[str], tmp_path: Path, printed: str = "text"
                 ) -> tuple[Path, Path]:
    """`llama2 ARGS --out one` in one process and `--out two` under torchrun with two: rank 0
    alone prints (the same stdout; `printed="json"`: the same JSON to float tolerance, the
    numbers of a model trained in each run), no line is logged twice, and the two runs leave
    the same files behind."""
    one, two = tmp_path / "one", tmp_path / "two"
    r1, r2 = _run([*args, "--out", str(one)], 1), _run([*args, "--out", str(two)], 2)
    if printed == "json":
        _approx(json.loads(r1.stdout), json.loads(r2.stdout.replace(str(two), str(one))))
    else:
        _same_stdout(r1, r2, one, two)
    lines = [x for x in r2.stderr.splitlines() if x.strip()]
    assert len(lines) == len(set(lines)), r2.stderr[-3000:]
    assert _tree(one) == _tree(two)
    return one, two


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _same_files(one: Path, two: Path, *names: str) -> None:
    """Byte for byte, but for the run's own folder named inside."""
    for name in names:
        got = (two / name).read_text().replace(str(two), str(one))
        assert got == (one / name).read_text(), name


def _approx(want: object, got: object, where: str = "") -> None:
    """The same JSON, floats to float tolerance (a model trained in two processes sums its
    gradients in another order)."""
    if isinstance(want, float) and isinstance(got, float):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), where
    elif isinstance(want, dict) and isinstance(got, dict):
        assert want.keys() == got.keys(), where
        for k in want:
            _approx(want[k], got[k], f"{where}.{k}")
    elif isinstance(want, list) and isinstance(got, list):
        assert len(want) == len(got), where
        for i, (a, b) in enumerate(zip(want, got)):
            _approx(a, b, f"{where}[{i}]")
    else:
        assert want == got, where


def _halved(one: Path, two: Path) -> None:
    """Each of the two processes held about half of the parameters and AdamW moments (the
    Trainer's summary, or what a stage's summary keeps of it)."""
    from llama2.stages.common import trainer_summary

    s1, s2 = trainer_summary(one)["per_rank"], trainer_summary(two)["per_rank"]
    whole = s1[0]["param_bytes"] + s1[0]["optimizer_bytes"]
    assert len(s1) == 1 and len(s2) == 2 and all(
        r["param_bytes"] + r["optimizer_bytes"] < 0.6 * whole for r in s2)


TRAIN_RM = TRAIN[:-2]  # the RM stage has no --seq_len (--max_len)


@pytest.fixture(scope="module")
def variant(models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second policy, another model version: the tiny one made a bigram model (no attention
    or MLP output, so the next token follows the last one alone) that answers "ok." (a
    compliance: a violation on an adversarial prompt) or "." (harmless) at random, so a red
    team finds violations, and which prompts they are depends on each prompt's sample."""
    import torch

    from llama2 import checkpoint

    loaded = checkpoint.load(models["policy"])
    model, tok = loaded.model, loaded.tokenizer
    o, k, dot = tok.encode("ok.", bos=False)
    assert tok.decode([o, k, dot]) == "ok."
    e = torch.eye(model.args.dim)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.norm.weight.fill_(1.0)
        model.tok_embeddings.weight.copy_(e[0].expand_as(model.tok_embeddings.weight))
        for token, row in ((o, 1), (k, 2), (dot, 3)):
            model.tok_embeddings.weight[token] = e[row]
        model.output.weight.zero_()  # after any token "o" or "."; after "o" "k", then "."
        for token, rows in ((o, (0,)), (dot, (0, 2)), (k, (1,)), (tok.eos_id, (3,))):
            model.output.weight[token] = 5.0 * e[list(rows)].sum(0)
    path = tmp_path_factory.mktemp("variant") / "policy"
    checkpoint.save(model, tok, path)
    return str(path)


@pytest.fixture(scope="module")
def comparisons(models: dict[str, str], variant: str,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Preferences collected in one process and in two: two model variants, three responses a
    prompt (every pair annotated), helpful, adversarial and borderline prompts."""
    args = ["preferences", "--models", f"{models['policy']},{variant}", "--n_helpful", "10",
            "--n_safety", "6", "--n_borderline", "2", "--responses_per_prompt", "3",
            "--max_new_tokens", "8", "--device", "cpu"]
    return _one_and_two(args, tmp_path_factory.mktemp("preferences"))


def test_preferences_write_the_one_process_files(comparisons: tuple[Path, Path]) -> None:
    """Preference collection under torchrun: each rank samples its share of the responses (each
    prompt its own seeded stream), rank 0 annotates and writes: the batches and their
    statistics are the one-process run's byte for byte."""
    one, two = comparisons
    names = ("helpful_batch_0.jsonl", "safety_batch_0.jsonl", "stats_batch_0.json")
    _same_files(one, two, *names)
    stats = json.loads((one / "stats_batch_0.json").read_text())
    assert stats["helpful_pairs"] >= 24 and stats["safety_pairs"] > 0


def test_reward_model_two_processes_match_one(models: dict[str, str],
                                              comparisons: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    """A Safety RM with the auxiliary loss, trained under torchrun on the collected
    comparisons: the same loss (and accuracy, auxiliary loss) per step, the same held-out
    metrics to float tolerance, half of the parameters and AdamW moments per process."""
    data = comparisons[0]
    args = ["reward", "--kind", "safety", "--aux_safety_loss", "true", "--secondary_share",
            "0.5", "--model", models["policy"], "--helpful_data",
            str(data / "helpful_batch_0.jsonl"), "--safety_data",
            str(data / "safety_batch_0.jsonl"), "--val_fraction", "0.25", "--max_len", "128",
            *TRAIN_RM]
    one, two = _one_and_two(args, tmp_path, printed="json")
    for key in ("loss", "accuracy", "aux_loss"):
        _close(_curve(one, key), _curve(two, key))
    assert list(_curve(one)) == [1, 2, 3, 4]
    want = json.loads((one / "eval.json").read_text())
    assert want["n"] >= 8
    _approx(want, json.loads((two / "eval.json").read_text()))
    _halved(one, two)


def test_ghost_attention_two_processes_match_one(models: dict[str, str],
                                                 tmp_path: Path) -> None:
    """GAtt under torchrun: the sampled multi-turn dialogs (each rank its share of every turn's
    prompts) and their statistics are the one-process run's byte for byte, the fine-tuning
    follows the same loss curve, and the evaluation before GAtt is the same (after it, to
    float tolerance where it is a number of the model's: the attention)."""
    args = ["gatt", "--model", models["policy"], "--n_dialogs", "6", "--max_turns", "2",
            "--k", "2", "--neutral_share", "0.3", "--replay.demos", "4", "--max_new_tokens",
            "8", "--eval_turns", "2", "--eval_dialogs", "1", "--eval_max_new_tokens", "8",
            *TRAIN[:-2], "--seq_len", "256"]
    one, two = _one_and_two(args, tmp_path)
    _same_files(one, two, "samples.jsonl", "sampling.json")
    assert json.loads((one / "sampling.json").read_text())["turns"] >= 6
    _close(_curve(one), _curve(two))
    _halved(one, two)
    adherence = [json.loads((d / "adherence.json").read_text()) for d in (one, two)]
    assert adherence[0]["before"] == adherence[1]["before"]
    _approx(*[json.loads((d / "attention.json").read_text()) for d in (one, two)])


def test_context_distillation_two_processes_match_one(models: dict[str, str],
                                                      tmp_path: Path) -> None:
    """Context distillation under torchrun: the answers with and without the preprompt and
    their Safety RM scores (generated and scored before any training, each rank its share)
    are the one-process run's byte for byte; the gated and the ungated fine-tuning follow
    the same loss curves; the evaluation of the model before is the same."""
    args = ["distill", "--model", models["policy"], "--safety_rm", models["rm_safety"],
            "--n_safety", "6", "--n_helpful", "2", "--n_borderline", "2", "--preprompt",
            "generic", "--also_ungated", "true", "--replay.demos", "4", "--temperature", "1.0",
            "--max_new_tokens", "8", "--n_eval_helpful", "2", "--n_eval_safety", "2",
            "--n_eval_borderline", "2", *TRAIN]
    one, two = _one_and_two(args, tmp_path)
    _same_files(one, two, "distilled.jsonl")
    rows = _records(one / "distilled.jsonl")
    assert sum(bool(r["distilled"]) for r in rows) >= 8
    s1, s2 = [json.loads((d / "summary.json").read_text()) for d in (one, two)]
    assert s1["by_kind"] == s2["by_kind"] and s1["eval"]["before"] == s2["eval"]["before"]
    for variant_dir in ("", "ungated"):
        _close(_curve(one / variant_dir), _curve(two / variant_dir))
    _halved(one, two)


def test_safety_data_scaling_two_processes_match_one(models: dict[str, str],
                                                     tmp_path: Path) -> None:
    """`llama2 distill --scaling` under torchrun: each share's SFT model (FSDP2) follows the
    one-process loss curve with half of the state per process, and the study's JSON is the
    one-process run's (greedy answers of the trained models)."""
    train = [x.replace("--train.", "--sft.train.") for x in TRAIN[:-2]]
    args = ["distill", "--scaling", "--model", models["policy"], "--shares", "0,0.5",
            "--sft.n_helpful", "30", "--sft.n_safety", "10", "--sft.seq_len", "128",
            "--sft.val_fraction", "0", "--n_eval_helpful", "2", "--n_eval_safety", "2",
            "--n_eval_borderline", "2", "--max_new_tokens", "8", *train]
    one, two = _one_and_two(args, tmp_path)
    for share in ("share_0", "share_0.5"):
        _close(_curve(one / "safety_scaling" / share), _curve(two / "safety_scaling" / share))
        _halved(one / "safety_scaling" / share, two / "safety_scaling" / share)
    _same_files(one, two, "safety_scaling.json")


def test_red_teaming_writes_the_one_process_files(models: dict[str, str], variant: str,
                                                  tmp_path: Path) -> None:
    """`llama2 distill --redteam` under torchrun: each rank answers its share of the tries
    (sampled, each prompt its own seeded stream), rank 0 judges and writes the one-process
    run's files: the same violations (the variant complies with some tries, not others)."""
    args = ["distill", "--redteam", "--models", f"a={models['policy']},b={variant}",
            "--n_tries", "12", "--max_new_tokens", "8", "--temperature", "1.0", "--device",
            "cpu"]
    one, two = _one_and_two(args, tmp_path)
    _same_files(one, two, "redteam.json", "redteam_violations.jsonl")
    result = json.loads((one / "redteam.json").read_text())
    assert result["versions"] == ["a", "b"] and 0 < result["violations_per_1000"][1] < 1000


def test_eval_writes_the_one_process_suites(models: dict[str, str], variant: str,
                                            tmp_path: Path) -> None:
    """`llama2 eval` under torchrun: helpfulness against a baseline (the annotators and the
    Helpfulness RM as judges) and safety, sampled answers split over the ranks: the suites'
    JSON is the one-process run's byte for byte, the summary too but for the timings."""
    args = ["eval", "--model", variant, "--baseline", models["policy"], "--suite",
            "helpfulness", "safety", "--reward-model", models["rm_helpful"], "--reward-model",
            models["rm_safety"], "--n-prompts", "4", "--max-new-tokens", "8", "--temperature",
            "1.0", "--device", "cpu"]
    one, two = _one_and_two(args, tmp_path)
    _same_files(one, two, "helpfulness.json", "safety.json")
    s1, s2 = [json.loads((d / "summary.json").read_text().replace(str(d), "OUT"))
              for d in (one, two)]
    assert s1.pop("seconds").keys() == s2.pop("seconds").keys() == {"helpfulness", "safety"}
    assert s1 == s2
    assert "reward_model" in json.loads((one / "helpfulness.json").read_text())
    assert 0 < json.loads((one / "safety.json").read_text())["violation"]["rate"] < 1
