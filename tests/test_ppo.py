"""PPO on the engine's pieces: its checkpoints are the engine's (atomic, keep-N, RNG states),
its metrics log drops what a killed run logged past its checkpoint, and a run killed and
resumed ends exactly like the uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_policy_and_rms
from llama2.engine import checkpointing
from llama2.stages.ppo import PPO, PPOConfig


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from llama2.reward import load_reward_model, save_reward_model

    paths = tiny_policy_and_rms(tmp_path_factory.mktemp("models"))
    for i, name in enumerate(("rm_helpful", "rm_safety")):  # scores that differ by answer
        rm, tok, meta = load_reward_model(paths[name])
        torch.manual_seed(10 + i)
        torch.nn.init.normal_(rm.score_head.weight, std=0.5)
        save_reward_model(rm, tok, paths[name], meta["kind"])
    return paths


def _cfg(models, out, **kw) -> PPOConfig:
    return PPOConfig(model=models["policy"], helpful_rm=models["rm_helpful"],
                     safety_rm=models["rm_safety"], out=str(out), n_prompts=48,
                     heldout_prompts=8, iterations=4, batch_prompts=16, minibatch=8,
                     max_new_tokens=8, lr=1e-2, value_lr=1e-3, beta=0.05, eval_every=2,
                     save_every=2, keep_checkpoints=1, device="cpu", **kw)


def _records(out) -> list[dict]:
    recs = [json.loads(x) for x in (out / "ppo_metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in recs]  # no timings


def _weights(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "model" / "model.safetensors")


def test_killed_ppo_resumes_from_the_engine_checkpoint_to_the_same_end(models, tmp_path,
                                                                       monkeypatch):
    full = tmp_path / "full"
    PPO(_cfg(models, full)).run()
    # Checkpoints at iterations 2 and 4, keep_checkpoints = 1: the last alone remains.
    assert sorted(p.name for p in (full / "checkpoints").glob("step_*.pt")) == \
        ["step_0000004.pt"]
    assert checkpointing.latest(full) == full / "checkpoints" / "step_0000004.pt"
    assert [r["iteration"] for r in _records(full)] == [0, 1, 2, 3, 4]

    killed = tmp_path / "killed"
    collect, calls = PPO.collect, []

    def dying_collect(self, prompts):  # killed while collecting iteration 4's rollouts
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return collect(self, prompts)

    monkeypatch.setattr(PPO, "collect", dying_collect)
    with pytest.raises(KeyboardInterrupt):
        PPO(_cfg(models, killed)).run()
    monkeypatch.setattr(PPO, "collect", collect)
    assert [r["iteration"] for r in _records(killed)] == [0, 1, 2, 3]  # 3: past the checkpoint
    with open(killed / "ppo_metrics.jsonl", "a") as f:  # and a line cut short by the kill
        f.write('{"iteration": 4, "rew')
    assert checkpointing.latest(killed).name == "step_0000002.pt"

    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        PPO(_cfg(models, killed)).run()
    PPO(_cfg(models, killed, resume=True)).run()
    assert _records(killed) == _records(full)  # iteration 3 logged once, the cut line gone
    got, want = _weights(killed), _weights(full)
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_ppo_sizes_are_global_and_must_split_over_the_processes(models, tmp_path, monkeypatch):
    """batch_prompts and minibatch are global sizes: a process count that does not divide one
    is a one-line error naming it, before any model is loaded."""
    import dataclasses

    from llama2.engine import distributed

    monkeypatch.setattr(distributed, "init", lambda device="auto": distributed.DistInfo(
        world_size=3))
    cfg = _cfg(models, tmp_path)
    for fix, field in (({}, "batch_prompts 16"), ({"batch_prompts": 24}, "minibatch 8"),
                       ({"frozen": "halved"}, "frozen")):
        with pytest.raises(distributed.LaunchError, match=f"^{field}"):
            PPO(dataclasses.replace(cfg, **fix))
    assert not any(tmp_path.iterdir())
