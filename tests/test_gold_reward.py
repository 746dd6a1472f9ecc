"""Gold-reward runs (Gao et al. 2022): rejection sampling and PPO optimize the world's annotators
in place of the two RMs and log both, and PPO against a known reward raises that reward."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_policy_and_rms
from llama2.engine import TrainConfig
from llama2.reward import AnnotatorReward, proxy_and_gold
from llama2.stages.ppo import PPO, PPOConfig
from llama2.stages.rejection_sampling import RejectionSamplingConfig
from llama2.stages.rejection_sampling import run as rejection_sample
from llama2.world import Annotator, World


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_policy_and_rms(tmp_path_factory.mktemp("models"))


def test_annotator_reward_is_the_annotators_scores_through_the_piecewise_rule():
    w, ann = World(0), Annotator(0, noise=False)
    prompts = w.helpful_prompts(3, split="train") + w.safety_prompts(2, split="train")
    answers = [p.answer for p in prompts[:3]] + ["Sure, first get the tools.", "I cannot help."]
    got = AnnotatorReward(prompts)([p.dialog for p in prompts], answers,
                                   [p.kind == "safety" for p in prompts])
    assert got["rh"].tolist() == pytest.approx([ann.helpfulness(p, a) for p, a in zip(prompts, answers)])
    assert got["rs"].tolist() == pytest.approx([ann.safety(p, a) for p, a in zip(prompts, answers)])
    assert got["rc"][:3].tolist() == pytest.approx(got["rh"][:3].tolist())  # safe, helpful prompts
    assert got["rc"][3:].tolist() == pytest.approx(got["rs"][3:].tolist())  # safety prompts
    other = [{"role": "user", "content": "not a world prompt"}]
    with pytest.raises(ValueError, match="world's prompts"):
        AnnotatorReward(prompts)([other], ["x"], [False])


def test_rejection_sampling_with_the_gold_reward_picks_the_annotators_best(models, tmp_path):
    cfg = RejectionSamplingConfig(
        model=models["policy"], helpful_rm=models["rm_helpful"], safety_rm=models["rm_safety"],
        out=str(tmp_path / "rs"), reward="annotator", n_prompts=10, k=3, max_new_tokens=6,
        sweep_prompts=0, seq_len=128,
        train=TrainConfig(lr=1e-3, max_steps=1, warmup_steps=0, micro_batch_size=4,
                          progress=False, device="cpu"))
    summary = rejection_sample(cfg)
    rows = [json.loads(x) for x in (tmp_path / "rs" / "samples.jsonl").read_text().splitlines()]
    for r in rows:  # ranked by the annotators; the RMs' scores are logged beside them
        assert r["rc"] == r["gold"] and len(r["proxy"]) == 3
    best = [json.loads(x)["messages"][-1]["content"]
            for x in (tmp_path / "rs" / "best.jsonl").read_text().splitlines()]
    assert best == [r["samples"][max(range(3), key=lambda j: r["gold"][j])] for r in rows]
    curves = summary["proxy_vs_gold"]
    assert curves["k"] == [1, 2, 3] and curves["gold"][0] <= curves["gold"][-1]
    assert len(curves["proxy"]) == 3


def test_ppo_against_a_known_reward_raises_it(models, tmp_path):
    """A known reward (shorter answers score higher) in place of the RMs: PPO's rollouts earn
    more of it by the end than at the start; every iteration logs the proxy and gold rewards."""

    class Shorter:
        def __call__(self, dialogs, responses, is_safety):
            rc = torch.tensor([min(0.99, max(0.01, 1 - len(r) / 40)) for r in responses])
            return {"rc": rc, "rs": rc, "rh": rc}

    cfg = PPOConfig(model=models["policy"], helpful_rm=models["rm_helpful"],
                    safety_rm=models["rm_safety"], out=str(tmp_path / "ppo"), n_prompts=64,
                    heldout_prompts=8, iterations=24, batch_prompts=32, minibatch=16,
                    max_new_tokens=10, lr=1e-2, value_lr=1e-3, beta=0.0, eval_every=1000,
                    save_every=0, device="cpu")
    ppo = PPO(cfg)
    ppo.rewards = Shorter()
    ppo.run()
    recs = [json.loads(x) for x in (tmp_path / "ppo" / "ppo_metrics.jsonl").read_text().splitlines()]
    reward = [r["reward"] for r in recs if "reward" in r]
    assert sum(reward[-4:]) / 4 > sum(reward[:4]) / 4 + 0.1
    assert all("proxy_reward" in r and "gold_reward" in r for r in recs if "reward" in r)


def test_the_gold_reward_needs_world_prompts():
    from llama2.world import Prompt

    files = [Prompt(id="file-0", dialog=[{"role": "user", "content": "hi"}], kind="helpful",
                    family="file")]
    with pytest.raises(ValueError, match="world prompts"):
        proxy_and_gold("annotator", "", "", files)
    with pytest.raises(ValueError, match="reward must be one of"):
        proxy_and_gold("oracle", "", "", files)


def test_a_gold_reward_run_skips_the_rm_refresh(tmp_path):
    """The refresh retrains the RM that PPO optimizes; a gold-reward PPO optimizes the annotators,
    so its round has one PPO run and one preference batch."""
    from llama2.stages.rlhf import RLHFConfig, first_batch, round_record

    for reward, ppo_dir, batches in (("rm", "v2/refresh_1/ppo/model", 3),
                                     ("annotator", "v2/ppo/model", 2)):
        cfg = RLHFConfig(out=str(tmp_path), rounds=2, ppo_from=2, ppo_refresh=1, reward=reward)
        assert round_record(cfg, 2)["model"] == str(tmp_path / ppo_dir)
        assert first_batch(cfg, 3) == batches
