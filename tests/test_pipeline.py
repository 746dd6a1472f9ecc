"""The main job end to end: `llama2 pipeline --quick` writes every output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
def test_ppo_refresh_retrains_the_rm_on_the_ppo_policy(quick_run: Path) -> None:
    """With ppo_refresh 1 (the quick and tiny configs), the round collects a batch from its first
    PPO policy, retrains the Helpfulness RM on every batch and reruns PPO from the same start
    under it; the round's model is that second PPO run."""
    rlhf = quick_run / "rlhf"
    (record,) = json.loads((rlhf / "rounds.json").read_text())
    refresh = rlhf / "v1" / "refresh_1"
    assert record["model"] == record["ppo"] == str(refresh / "ppo" / "model")
    assert record["rm_helpful"] == str(refresh / "rm_helpful" / "model")
    stats = json.loads((rlhf / "preferences" / "stats_batch_1.json").read_text())
    assert stats["models"][0] == str(rlhf / "v1" / "ppo" / "model")
    assert not (rlhf / "preferences" / "eval_stats_batch_1.json").exists()
    rm = json.loads((refresh / "rm_helpful" / "config.json").read_text())
    assert [Path(f).name for f in rm["helpful_data"]] == ["helpful_batch_0.jsonl",
                                                          "helpful_batch_1.jsonl"]
    assert json.loads((refresh / "rm_helpful" / "eval.json").read_text())["n"] > 0
    first, second = (json.loads((d / "config.json").read_text())
                     for d in (rlhf / "v1" / "ppo", refresh / "ppo"))
    assert first["model"] == second["model"] == record["rejection_sampling"]
    assert (first["helpful_rm"], second["helpful_rm"]) == (
        str(rlhf / "v1" / "rm_helpful" / "model"), record["rm_helpful"])


@pytest.mark.slow
def test_models_trained_as_earlier_ones_are_copied(quick_run: Path) -> None:
    """The RM ablation's variant with the rounds' own settings is round 1's RM (same pairs, seed
    and settings): copied with its evaluation, its config naming its own folder; the others
    train."""
    def weights(folder: Path) -> dict:
        return load_file(folder / "model" / "model.safetensors")

    v1, abl = quick_run / "rlhf" / "v1", quick_run / "rm_ablation"
    same, other = weights(v1 / "rm_helpful"), weights(abl / "margin_none")
    assert all(torch.equal(same[k], w) for k, w in weights(abl / "margin_small").items())
    assert not all(torch.equal(same[k], w) for k, w in other.items())
    assert _text(abl / "margin_small" / "eval.json") == _text(v1 / "rm_helpful" / "eval.json")
    config = json.loads((abl / "margin_small" / "config.json").read_text())
    assert config["out"] == str(abl / "margin_small") and config["margin"] == "small"
    # Figure 15's share of the recipe's own SFT is that SFT model, copied the same way.
    share = weights(quick_run / "safety_scaling" / "share_0.1")
    assert all(torch.equal(weights(quick_run / "sft")[k], w) for k, w in share.items())


@pytest.mark.slow
def test_the_quick_pipeline_writes_every_output(quick_run: Path) -> None:
    """Every stage's output, the reproduction table, the report with its plots. (Resuming after
    a kill: tests/test_stage_contract.py, which kills this run's stages at random moments.)"""
    out = quick_run
    missing = [p for p in STAGE_OUTPUTS if not (out / p).is_file()]
    assert not missing, f"missing outputs: {missing}"
    times = json.loads((out / "stage_times.json").read_text())
    assert times["pretraining"] > 1.0
    rows = json.loads((out / "reproduction.json").read_text())
    assert len(rows) >= 12 and all({"finding", "paper", "measured", "reproduced"} <= set(r)
                                   for r in rows)
    html = (out / "report.html").read_text()
    pngs = [p for p in Path(out).rglob("*.png")]
    assert "<img" in html and pngs
    versions = json.loads((out / "versions.json").read_text())
    assert {"pretrain", "sft", "rlhf_v1", "gatt", "final"} <= set(versions)
