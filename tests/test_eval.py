"""Evaluation suites: the judges on plain response lists, stub responders, TruthfulQA/BOLD
scoring with fake callables, and a small end-to-end run on a tiny random model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import shared_file
from llama2.eval import judge, run_suites
from llama2.eval.bold import evaluate_bold, load_bold
from llama2.eval.suites import EvalOptions, helpfulness_suite, track_versions
from llama2.eval.truthfulqa import MCQuestion, evaluate_mc, load_questions, score_question
from llama2.world import Annotator, World

REFUSAL = "I'm sorry, but I can't help with that because it could cause harm."


def refuse(prompts):
    return [REFUSAL] * len(prompts)


def gold(prompts):
    return [p.answer or "" for p in prompts]


# ------------------------------------------------------------------------------ judge
def test_wilson_interval_bounds():
    lo, hi = judge.wilson_interval(5, 10)
    assert lo < 0.5 < hi and math.isclose(0.5 - lo, hi - 0.5, rel_tol=1e-9)
    assert judge.wilson_interval(0, 10)[0] == 0.0 and judge.wilson_interval(10, 10)[1] == 1.0
    assert judge.wilson_interval(0, 0) == (0.0, 1.0)


def test_swapping_models_mirrors_win_and_loss():
    a, b = [0.9, 0.2, 0.5, 0.7, 0.1], [0.1, 0.8, 0.52, 0.3, 0.08]
    ab, ba = judge.judge_pairs(a, b), judge.judge_pairs(b, a)
    assert ab["win_count"] == ba["loss_count"] == 2 and ab["loss_count"] == ba["win_count"] == 1
    assert ab["tie_count"] == ba["tie_count"] == 2  # |0.5-0.52| and |0.1-0.08| < 0.05
    assert math.isclose(ab["win_rate"] + ba["win_rate"], 1.0)


def test_model_against_itself_is_fifty_fifty():
    world, ann = World(0), Annotator(0)
    prompts = world.helpful_prompts(20, split="eval")
    responses = gold(prompts)[:10] + refuse(prompts[10:])
    res = judge.judge_helpfulness(prompts, responses, list(responses), ann.helpfulness)
    assert res["tie"] == 1.0 and res["win_rate"] == 0.5 and res["n"] == 20
    assert res["win_rate_ci95"] == [0.5, 0.5]


def test_helpfulness_suite_with_stub_responders():
    opts = EvalOptions(n_prompts=12)
    better = helpfulness_suite(gold, refuse, opts)["world"]
    worse = helpfulness_suite(refuse, gold, opts)["world"]
    assert better["win"] == worse["loss"] == 1.0
    assert better["win_rate"] == 1.0 and worse["win_rate"] == 0.0
    assert better["win_ci95"][0] > 0.7  # Wilson lower bound for 12/12
    assert "single_turn" in better


def test_always_refusing_model_on_safety(tmp_path):
    out = tmp_path / "eval"
    summary = run_suites(None, ["safety"], out, respond=refuse, n_prompts=10)
    s = summary["suites"]["safety"]
    assert s["violation"]["rate"] == 0.0 and s["violation"]["n"] == 10
    assert s["false_refusal"]["borderline"]["rate"] == 1.0
    assert s["false_refusal"]["helpful"]["rate"] == 1.0
    assert set(s["violation"]["by_category"]) == {"illicit", "hateful", "unqualified_advice"}
    xs = s["false_refusal"]["xstest"]
    assert "skipped" in xs or xs["rate"] == 1.0
    on_disk = json.loads((out / "safety.json").read_text())
    assert on_disk["violation"]["rate"] == 0.0
    assert json.loads((out / "summary.json").read_text())["suites"]["safety"]["violation"]["n"] == 10


def test_compliant_model_violates():
    from llama2.eval.suites import safety_suite

    def comply(prompts):  # harmful "steps" of every topic: the annotators flag it
        from llama2.world.safety import TOPICS

        return ["Sure, first " + " then ".join(TOPICS[0].harm[:2])] * len(prompts)

    res = safety_suite(comply, EvalOptions(n_prompts=9))
    assert res["violation"]["rate"] > 0.5
    assert res["false_refusal"]["borderline"]["rate"] == 0.0


def test_tracking_with_stub_scorers():
    def h_rm(dialogs, responses):
        return torch.tensor([2.0 if "sorry" not in r else -2.0 for r in responses])

    def s_rm(dialogs, responses):
        return torch.tensor([3.0 if "sorry" in r else -3.0 for r in responses])

    res = track_versions([("sft", gold), ("final", refuse)],
                         {"helpfulness": h_rm, "safety": s_rm}, EvalOptions(n_prompts=6))
    sft, final = res["rows"]
    assert sft["version"] == "sft" and sft["helpfulness_rm"] > 0.8 and final["safety_rm"] > 0.9
    assert sft["helpfulness_gold"] > final["helpfulness_gold"]
    # Per-prompt scores beside each mean (same prompts for every version: paired intervals).
    for key, n in (("helpfulness_gold", res["n_helpful"]), ("safety_rm", res["n_safety"])):
        assert len(sft[f"{key}_scores"]) == len(final[f"{key}_scores"]) == n
        assert sum(sft[f"{key}_scores"]) / n == pytest.approx(sft[key], abs=1e-4)


def test_suites_skip_with_a_reason(tmp_path):
    summary = run_suites(None, ["toxigen", "perplexity"], tmp_path, respond=refuse)
    assert "skipped" in summary["suites"]["toxigen"] and "skipped" in summary["suites"]["perplexity"]
    with pytest.raises(ValueError, match="unknown suite"):
        run_suites(None, ["nope"], tmp_path, respond=refuse)


# ------------------------------------------------------------------------------ TruthfulQA
def test_mc_scoring_with_a_fake_loglik():
    q = MCQuestion("Is the sky green?", {"No": 1, "Yes": 0, "Maybe": 0},
                   {"No": 1, "No, it is blue": 1, "Yes": 0})
    fake = {" No": -1.0, " Yes": -5.0, " Maybe": -4.0, " No, it is blue": -2.0}

    scored = []

    def loglik(pairs):
        assert all(c.endswith("Q: Is the sky green?\nA:") for c, _ in pairs)
        scored.extend(a for _, a in pairs)
        return [fake[a] for _, a in pairs]

    res = evaluate_mc([q], loglik)
    assert sorted(scored) == sorted(fake)  # "No" and "Yes" are in both lists: scored once
    assert res["mc1"] == 1.0 and res["n_questions"] == 1
    p_true = math.exp(-1) + math.exp(-2)
    assert math.isclose(res["mc2"], p_true / (p_true + math.exp(-5)))
    # The wrong answer most likely: MC1 misses.
    assert score_question(q, [-3.0, -1.0, -4.0], [-1, -1, -1])[0] == 0.0


def test_truthfulqa_files_load():
    js = load_questions(shared_file("truthfulqa", "data", "mc_task.json"))
    csv_q = load_questions(shared_file("truthfulqa", "TruthfulQA.csv"))
    assert len(js) > 700 and len(csv_q) > 700
    for q in js[:20] + csv_q[:20]:
        assert sum(q.mc1.values()) == 1 and 0 < sum(q.mc2.values()) < len(q.mc2)


# ------------------------------------------------------------------------------ BOLD
def test_bold_means_per_group():
    items = [("gender", "a", "x1"), ("gender", "a", "x2"), ("gender", "b", "y1")]
    res = evaluate_bold(items, lambda texts: [t + "!" for t in texts],
                        sentiment=lambda s: 1.0 if s.startswith("x") else -0.5)
    assert res["by_domain"]["gender"]["a"] == {"mean": 1.0, "n": 2}
    assert res["by_domain"]["gender"]["b"]["mean"] == -0.5
    assert math.isclose(res["domain_mean"]["gender"], 0.5)


def test_bold_prompts_sampled_per_group():
    folder = shared_file("bold", "prompts")
    items = load_bold(folder, per_group=1, seed=0, domains=["gender"])
    assert {g for _, g, _ in items} == {"American_actors", "American_actresses"}
    assert items == load_bold(folder, per_group=1, seed=0, domains=["gender"])


# ------------------------------------------------------------------------------ tiny model
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from llama2 import checkpoint
    from llama2.model import ModelArgs, Transformer
    from llama2.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    texts = [f"Q: what is {i} plus {i + 1}? A: the answer is {2 * i + 1}. [INST] hello [/INST]"
             for i in range(200)]
    tok = train_tokenizer(texts, folder / "tok.model", vocab_size=300, num_threads=1)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                  vocab_size=tok.n_words, multiple_of=16, max_seq_len=256))
    model.init_weights()
    return checkpoint.save(model, tok, folder / "sft" / "model")


def test_end_to_end_on_a_tiny_model(tiny_model, tmp_path):
    from llama2.eval.cli import main

    text = tmp_path / "heldout.txt"
    text.write_text("the answer is 42. " * 40)
    tqa = shared_file("truthfulqa", "data", "mc_task.json")
    out = tmp_path / "eval" / "sft"
    main(["--model", str(tiny_model), "--baseline", str(tiny_model), "--out", str(out),
          "--suite", "helpfulness", "truthfulqa", "perplexity", "--n-prompts", "4",
          "--max-new-tokens", "6", "--limit", "3", "--truthfulqa", str(tqa), "--text", str(text)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["version"] == "sft"
    # Greedy answers of a model against itself are identical: all ties, 50%.
    h = summary["suites"]["helpfulness"]["world"]
    assert h["tie"] == 1.0 and h["win_rate"] == 0.5
    t = summary["suites"]["truthfulqa"]
    assert t["n_questions"] == 3 and 0.0 <= t["mc1"] <= 1.0 and 0.0 <= t["mc2"] <= 1.0
    p = summary["suites"]["perplexity"]
    assert p["n_tokens"] > 0 and 1.0 < p["perplexity"] < 10 * 300
    # A second run into the same folder adds its suite to the summary.
    run_suites(str(tiny_model), ["safety"], out, n_prompts=3, max_new_tokens=4)
    merged = json.loads((out / "summary.json").read_text())["suites"]
    assert {"helpfulness", "truthfulqa", "perplexity", "safety"} <= set(merged)


def test_reward_model_judges_real_prompts(tiny_model, tmp_path):
    from llama2 import checkpoint
    from llama2.reward import from_policy, save_reward_model

    loaded = checkpoint.load(tiny_model)
    rm = save_reward_model(from_policy(loaded.model), loaded.tokenizer, tmp_path / "rm",
                           kind="helpfulness")
    real = tmp_path / "real.jsonl"
    real.write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": str(2 * i)}]}) for i in range(3)) + "\n")
    res = run_suites(None, ["helpfulness"], None, reward_models=[str(rm)], respond=gold,
                     baseline_respond=refuse, n_prompts=3, prompts=str(real))["suites"]["helpfulness"]
    # A fresh RM head scores every answer 0 (sigmoid 0.5): all ties on both prompt sets.
    assert res["reward_model"]["tie"] == 1.0 and res["real_prompts"]["tie"] == 1.0
    assert res["real_prompts"]["n"] == 3 and res["world"]["win"] == 1.0
