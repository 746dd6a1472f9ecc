"""Rejection sampling's forgetting study (paper §3.2.3): a round without one task family,
trained with keep = "latest" and keep = "all", run for its mechanics on a tiny untrained model."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_policy_and_rms
from llama2.engine import TrainConfig
from llama2.stages.rejection_sampling import ForgettingConfig, forgetting_study
from llama2.utils import write_jsonl
from llama2.world import World
from llama2.world.tasks import FAMILIES


def test_forgetting_study_trains_latest_and_all_on_one_round_without_the_family(tmp_path):
    w = World(0)
    models = tiny_policy_and_rms(tmp_path)
    earlier = [p.with_answer() for p in w.helpful_prompts(5, families=("howto",))]
    write_jsonl(tmp_path / "best_v1.jsonl", [{"messages": d} for d in earlier])
    cfg = ForgettingConfig(
        model=models["policy"], helpful_rm=models["rm_helpful"], safety_rm=models["rm_safety"],
        out=str(tmp_path / "study"), round=2,
        previous=[str(tmp_path / "best_v1.jsonl")], n_prompts=12, k=2, max_new_tokens=4,
        family="howto", n_eval=2, seq_len=128,
        train=TrainConfig(lr=1e-3, max_steps=1, warmup_steps=0, micro_batch_size=4,
                          progress=False, device="cpu"))
    result = forgetting_study(cfg)
    study = tmp_path / "study"
    rows = [json.loads(x) for x in (study / "latest" / "samples.jsonl").read_text().splitlines()]
    # The round asks for every skill but the left-out one, and both models see its samples.
    helpful = {r["prompt"]["family"] for r in rows if r["prompt"]["kind"] == "helpful"}
    assert helpful and "howto" not in helpful
    assert (study / "all" / "samples.jsonl").read_text() == (
        study / "latest" / "samples.jsonl").read_text()
    assert result["train_dialogs"] == {"latest": len(rows), "all": len(rows) + len(earlier)}
    assert set(result["helpfulness"]) == {"before", "latest", "all"}
    assert all(set(v) == set(FAMILIES) and all(0 <= x <= 1 for x in v.values())
               for v in result["helpfulness"].values())
    h = result["helpfulness"]
    assert result["forgotten"] == pytest.approx(h["before"]["howto"] - h["latest"]["howto"])
    assert json.loads((study / "forgetting.json").read_text())["family"] == "howto"
    with pytest.raises(ValueError, match="family"):
        forgetting_study(ForgettingConfig(model=cfg.model, family="poems"))
    with pytest.raises(ValueError, match="unknown task families"):
        w.helpful_prompts(2, families=("poems",))
