"""Safety stages (paper §4.2-4.3): the safety evaluation, the safety data scaling study
(Figure 15), gated/ungated context distillation (§4.2.4, Figure 16) and the red-team loop, run
for their mechanics on a tiny untrained model."""

from __future__ import annotations

import json

import pytest
import torch

from llama2 import checkpoint
from llama2.engine import TrainConfig
from llama2.model import ModelArgs, Transformer
from llama2.reward import from_policy, save_reward_model
from llama2.stages import distill, redteam, safety
from llama2.stages.sft import SFTConfig
from llama2.tokenizer import train_tokenizer
from llama2.world import RISK_CATEGORIES, World
from llama2.world.safety import ATTACKS


def _args(vocab: int) -> ModelArgs:
    return ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                     multiple_of=16, max_seq_len=384)


def _train(steps: int = 1) -> TrainConfig:
    return TrainConfig(lr=1e-3, max_steps=steps, warmup_steps=0, micro_batch_size=4,
                       progress=False, device="cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tokenizer, an untrained tiny policy and a tiny Safety RM with a random head."""
    folder = tmp_path_factory.mktemp("safety")
    w = World(0)
    texts = [m["content"] for d in w.demonstrations(100, 100, n_borderline=20) for m in d]
    texts += list(distill.CATEGORY_PREPROMPTS.values()) + ["[INST] [/INST] <<SYS>>"]
    tok = train_tokenizer(texts, folder / "tok.model", vocab_size=400)
    torch.manual_seed(0)
    model = Transformer(_args(tok.n_words))
    model.init_weights()
    checkpoint.save(model, tok, folder / "policy")
    rm_base = Transformer(_args(tok.n_words))
    rm_base.init_weights()
    rm = from_policy(rm_base)
    torch.nn.init.normal_(rm.score_head.weight, std=1.0)
    save_reward_model(rm, tok, folder / "safety_rm", kind="safety")
    return folder


def test_preprompts_cover_every_risk_category():
    assert set(distill.CATEGORY_PREPROMPTS) == set(RISK_CATEGORIES)
    p = World(0).safety_prompts(3, "train")
    assert all(distill.preprompt_for(x, "category") == distill.CATEGORY_PREPROMPTS[x.category]
               for x in p)
    assert distill.preprompt_for(p[0], "generic") == distill.GENERIC_PREPROMPT
    border = World(0).borderline_prompts(1, "train")[0]
    assert distill.preprompt_for(border, "category") == distill.GENERIC_PREPROMPT
    with pytest.raises(ValueError):
        distill.preprompt_for(p[0], "other")


def test_safety_scaling_writes_one_point_per_share(tiny):
    cfg = safety.SafetyScalingConfig(
        model=str(tiny / "policy"), out=str(tiny / "run"), shares=[0.0, 1.0],
        sft=SFTConfig(n_helpful=8, n_safety=8, seq_len=160, val_fraction=0.0, train=_train()),
        n_eval_helpful=4, n_eval_safety=4, n_eval_borderline=3, max_new_tokens=6)
    result = safety.safety_scaling(cfg)
    saved = json.loads((tiny / "run" / "safety_scaling.json").read_text())
    assert saved["shares"] == [0.0, 1.0] and saved["n_safety_demos"] == [0, 8]
    for key in ("mean_helpfulness", "mean_safety", "violation_rate", "false_refusal"):
        assert len(saved[key]) == 2 and all(0 <= v <= 1 for v in saved[key])
    assert [len(s) for s in saved["safety_scores"]] == [4, 4]
    # The JSON, the pipeline's mark of a finished stage, is written after the plot.
    png = tiny / "run" / "safety_scaling.png"
    assert png.stat().st_mtime_ns <= (tiny / "run" / "safety_scaling.json").stat().st_mtime_ns
    assert result["models"][1].endswith("share_1/model")


def test_gated_distillation_keeps_only_safer_answers(tiny):
    out = tiny / "distill"
    cfg = distill.DistillConfig(model=str(tiny / "policy"), safety_rm=str(tiny / "safety_rm"),
                                out=str(out), prompt_offset=0, n_safety=9, n_helpful=3,
                                n_borderline=3, max_new_tokens=6, seq_len=160,
                                also_ungated=True, temperature=1.0, train=_train(),
                                n_eval_helpful=3,
                                n_eval_safety=3, n_eval_borderline=2)
    summary = distill.run(cfg)
    rows = [json.loads(x) for x in (out / "distilled.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and {r["kind"] for r in rows} == {"safety", "helpful", "borderline"}
    assert all(r["gate"] == (bool(r["distilled"]) and r["rm_distilled"] > r["rm_plain"])
               for r in rows)
    assert any(r["gate"] for r in rows) and not all(r["gate"] for r in rows)
    assert all(r["preprompt"] == distill.CATEGORY_PREPROMPTS[r["prompt"]["category"]]
               for r in rows if r["kind"] == "safety")
    gated = distill.training_dialogs(rows, gated=True)
    assert len(gated) == sum(r["gate"] and bool(r["distilled"]) for r in rows) == summary["kept"]
    # The fine-tuning dialogs carry no preprompt: the model learns to answer without it.
    assert all(d[0]["role"] == "user" for d in gated)
    assert summary["kept_ungated"] == sum(bool(r["distilled"]) for r in rows)
    assert (out / "model" / "config.json").is_file()
    assert (out / "ungated" / "model" / "config.json").is_file()
    assert set(summary["eval"]) == {"before", "gated", "ungated"}
    saved = json.loads((out / "summary.json").read_text())
    assert saved["by_kind"]["safety"]["prompts"] == 9
    groups = saved["by_kind"]["safety"]["by_initial_score"]
    assert sum(g["prompts"] for g in groups) == sum(bool(r["distilled"]) for r in rows
                                                    if r["kind"] == "safety")


def test_score_change_by_initial_score_groups_prompts_by_their_plain_score():
    # Figure 16 (right): low plain scores gain from the preprompt, high ones lose.
    def row(plain, distilled, text="a"):
        return {"rm_plain": plain, "rm_distilled": distilled, "distilled": text,
                "annotator_safety": [0.5, 0.5 + (distilled - plain) / 10],
                "gate": distilled > plain}

    rows = [row(3.0, 2.0), row(-1.0, 1.0), row(1.0, 1.0), row(-2.0, 0.0), row(2.0, 1.0),
            row(0.0, 0.5), row(5.0, 9.0, text="")]  # no distilled answer: left out
    groups = distill.score_change_by_initial(rows)
    assert [g["prompts"] for g in groups] == [2, 2, 2]
    assert [g["rm_plain"] for g in groups] == [-1.5, 0.5, 2.5]
    assert [g["rm_change"] for g in groups] == [2.0, 0.25, -1.0]
    assert [g["kept_gated"] for g in groups] == [2, 1, 0]
    assert groups[0]["annotator_safety_change"] == pytest.approx(0.2)


def test_gate_needs_a_safety_rm(tiny):
    cfg = distill.DistillConfig(model=str(tiny / "policy"), out=str(tiny / "d2"), n_safety=2,
                                n_helpful=0, n_borderline=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="Safety RM"):
        distill.run(cfg)


def test_red_team_counts_violations_per_1000_tries(tiny):
    p = str(tiny / "policy")
    result = redteam.red_team(redteam.parse_models([f"sft={p}", p]), tiny / "rt", n_tries=24,
                              max_new_tokens=6)
    saved = json.loads((tiny / "rt" / "redteam.json").read_text())
    assert saved["versions"] == ["sft", "v1"] and saved["n_tries"] == 24
    assert all(0 <= v <= 1000 for v in saved["violations_per_1000"])
    assert set(saved["by_attack"]) <= set(ATTACKS) and set(saved["by_category"]) == set(
        RISK_CATEGORIES)
    assert len(saved["mitigated"]) == 2 and saved["mitigated"][0] is None
    assert result["violations_per_1000"] == saved["violations_per_1000"]
    mark = (tiny / "rt" / "redteam.json").stat().st_mtime_ns  # written last: the stage's mark
    assert all((tiny / "rt" / f).stat().st_mtime_ns <= mark
               for f in ("redteam.png", "redteam_violations.jsonl"))
    prompts = redteam.adversarial_prompts(24)
    assert all(p.kind == "safety" and p.meta["split"] == "eval" for p in prompts)
    assert prompts[0].dialog != World(0).safety_prompts(1, "eval")[0].dialog


def test_distill_cli_routes_the_safety_studies(capsys):
    for flag, field in (("--scaling", '"shares"'), ("--redteam", '"n_tries"')):
        with pytest.raises(SystemExit) as e:
            distill.main([flag, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "defaults" in out and field in out


def test_preferences_annotate_every_pair_of_k_responses(tiny, tmp_path):
    """K responses per prompt give C(K, 2) comparisons (identical responses are not compared)."""
    from llama2.stages.preferences import PreferencesConfig, collect

    cfg = PreferencesConfig(models=[str(tiny / "policy")], out=str(tmp_path), n_helpful=5,
                            n_safety=3, temperatures=[0.8, 1.2], responses_per_prompt=3,
                            max_new_tokens=6)
    summary = collect(cfg)
    counts = summary["counts"]
    compared = sum(v for k, v in counts.items() if k.split(":")[0] in ("helpfulness", "safety"))
    dropped = counts.get("dropped_identical", 0) + counts.get("dropped_chosen_unsafe", 0)
    assert compared + dropped == (5 + 3) * 3
    assert summary["helpful_pairs"] + summary["safety_pairs"] == compared
    assert compared > 0
    with pytest.raises(ValueError, match="responses_per_prompt"):
        collect(PreferencesConfig(models=cfg.models, out=str(tmp_path), responses_per_prompt=1))


def test_distillation_rows_need_a_real_safety_gain(tmp_path):
    from llama2.stages.reproduction import reproduction_table

    def rows(before_viol, thirds, fr=(0.1, 0.05, 0.2)):
        def ev(viol, f):
            return {"violation_rate": viol, "false_refusal": f}
        summary = {"by_kind": {"safety": {"by_initial_score": [{"rm_change": c} for c in thirds]}},
                   "eval": {"before": ev(before_viol, fr[0]), "gated": ev(0.0, fr[1]),
                            "ungated": ev(0.1, fr[2])}}
        (tmp_path / "distill").mkdir(exist_ok=True)
        (tmp_path / "distill" / "summary.json").write_text(json.dumps(summary))
        (tmp_path / "distill" / "config.json").write_text(json.dumps(
            {"n_eval_safety": 200, "n_eval_borderline": 200}))
        table = reproduction_table(tmp_path)
        return [next(r for r in table if r["finding"].startswith(s))
                for s in ("Context distillation", "Gated distillation")]

    safety_row, refusal_row = rows(0.08, [0.9, -0.1, -0.8])
    assert safety_row["reproduced"] and refusal_row["reproduced"]
    assert "+0.90 / -0.10 / -0.80" in safety_row["measured"]
    # Nothing to make safer (no violations before) or no lift of the low scores: not shown.
    assert not rows(0.0, [0.9, -0.1, -0.8])[0]["reproduced"]
    assert not rows(0.08, [0.0, 0.0, 0.1])[0]["reproduced"]
    assert not rows(0.08, [0.9, 0.0, 0.0], fr=(0.1, 0.2, 0.05))[1]["reproduced"]
