"""Iterative RLHF rounds, RLHF-V1..Vn (recipe §3-§6, paper §3.2 and Figure 4).

Each round: collect a fresh preference batch from the newest policy (and an earlier variant),
retrain both reward models on all batches so far (from the SFT checkpoint, as the paper
initializes RMs from chat checkpoints), run rejection sampling from the newest policy, and from
round `ppo_from` on run PPO on top of the rejection-sampling checkpoint (the paper's V4 on).
Every sub-stage writes into its own folder; a finished one is skipped, so an interrupted run
resumes where it stopped.

    llama2 rlhf --sft runs/x/sft/model --base runs/x/pretrain/model --out runs/x/rlhf --rounds 3
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from llama2.stages.common import parse_stage, stage_done
from llama2.stages.ppo import PPO, PPOConfig
from llama2.stages.preferences import PreferencesConfig, collect
from llama2.stages.rejection_sampling import RejectionSamplingConfig
from llama2.stages.rejection_sampling import run as rejection_sample
from llama2.stages.reward import RewardConfig, train_reward_model
from llama2.utils import atomic_write_text


@dataclass
class RLHFConfig:
    sft: str = ""  # the SFT model: RLHF-V0 policy, reward-model initialization, and pi_0
    # An earlier model variant for preference sampling, e.g. "runs/x/pretrain/model#transcript"
    # (a pretrained model prompted in its own User/Assistant transcript format).
    base: str = ""
    out: str = "runs/rlhf"
    rounds: int = 3
    ppo_from: int = 2  # first round with PPO on top of rejection sampling
    world_seed: int = 0
    # Held-out comparisons per batch, as a share of the batch's size (paper: 1000 per batch),
    # sampled on eval-split prompts; the RMs are evaluated on them.
    eval_share: float = 0.3
    # What rejection sampling and PPO optimize: "rm" (the recipe) or "annotator" (a gold-reward
    # run: the world's annotators, the optimizer's ceiling). Both rewards are always logged.
    reward: str = "rm"
    preferences: PreferencesConfig = field(default_factory=PreferencesConfig)
    helpful_rm: RewardConfig = field(default_factory=lambda: RewardConfig(kind="helpfulness"))
    safety_rm: RewardConfig = field(default_factory=lambda: RewardConfig(
        kind="safety", aux_safety_loss=True))
    rejection_sampling: RejectionSamplingConfig = field(default_factory=RejectionSamplingConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


def _train_rm(template: RewardConfig, sft: str, out: Path, helpful: list[str],
              safety: list[str], heldout: list[str]) -> Path:
    if not stage_done(out):
        cfg = copy.deepcopy(template)
        cfg.model, cfg.out = sft, str(out)
        cfg.helpful_data, cfg.safety_data = list(helpful), list(safety)
        cfg.eval_data = list(heldout) or cfg.eval_data
        cfg.train.resume = True
        train_reward_model(cfg)
    return out / "model"


def run_round(cfg: RLHFConfig, v: int, policy: str, previous_best: list[str]) -> dict:
    """Round v (1-based) starting from `policy`; returns the round's record."""
    out = Path(cfg.out)
    prefs_dir = out / "preferences"
    for split, prefix, n_scale in (("train", "", 1.0), ("eval", "eval_", cfg.eval_share)):
        # The batch's stats file is written last: a run killed between its files redoes it.
        if n_scale <= 0 or (prefs_dir / f"{prefix}stats_batch_{v - 1}.json").is_file():
            continue
        pc = copy.deepcopy(cfg.preferences)
        # Two responses from different model variants and temperatures (§3.2.1): the newest
        # policy, the SFT model after round 1, and the base model. Each batch also gets
        # held-out comparisons on eval-split prompts to evaluate the RMs.
        pc.models = [policy] + ([cfg.sft] if v > 1 else []) + ([cfg.base] if cfg.base else [])
        pc.out, pc.batch, pc.world_seed, pc.split = str(prefs_dir), v - 1, cfg.world_seed, split
        pc.n_helpful, pc.n_safety = round(pc.n_helpful * n_scale), round(pc.n_safety * n_scale)
        collect(pc)
    helpful = [str(prefs_dir / f"helpful_batch_{k}.jsonl") for k in range(v)]
    safety = [str(prefs_dir / f"safety_batch_{k}.jsonl") for k in range(v)]
    held_h = [str(prefs_dir / f"eval_helpful_batch_{v - 1}.jsonl")] if cfg.eval_share > 0 else []
    held_s = [str(prefs_dir / f"eval_safety_batch_{v - 1}.jsonl")] if cfg.eval_share > 0 else []
    rm_h = _train_rm(cfg.helpful_rm, cfg.sft, out / f"v{v}" / "rm_helpful", helpful, safety, held_h)
    rm_s = _train_rm(cfg.safety_rm, cfg.sft, out / f"v{v}" / "rm_safety", helpful, safety, held_s)

    rs_dir = out / f"v{v}" / "rejection_sampling"
    if not stage_done(rs_dir / "train"):
        rc = copy.deepcopy(cfg.rejection_sampling)
        rc.model, rc.helpful_rm, rc.safety_rm, rc.out = policy, str(rm_h), str(rm_s), str(rs_dir)
        rc.round, rc.previous, rc.world_seed = v, list(previous_best), cfg.world_seed
        rc.reward = cfg.reward
        rc.train.resume = True
        rejection_sample(rc)
    new_policy = rs_dir / "train" / "model"
    record = {"round": v, "rm_helpful": str(rm_h), "rm_safety": str(rm_s),
              "rejection_sampling": str(new_policy), "best": str(rs_dir / "best.jsonl")}
    if v >= cfg.ppo_from:
        ppo_dir = out / f"v{v}" / "ppo"
        if not stage_done(ppo_dir):
            pc = copy.deepcopy(cfg.ppo)
            pc.model, pc.helpful_rm, pc.safety_rm = str(new_policy), str(rm_h), str(rm_s)
            pc.out, pc.round, pc.world_seed, pc.reward = str(ppo_dir), v, cfg.world_seed, cfg.reward
            pc.resume = (ppo_dir / "ppo_state.pt").is_file()
            PPO(pc).run()
        new_policy = ppo_dir / "model"
        record["ppo"] = str(new_policy)
    record["model"] = str(new_policy)
    return record


def run(cfg: RLHFConfig) -> list[dict]:
    if not cfg.sft:
        raise ValueError("set --sft PATH (the SFT model)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    policy, best_files, records = cfg.sft, [], []
    for v in range(1, cfg.rounds + 1):
        rec = run_round(cfg, v, policy, best_files)
        records.append(rec)
        policy = rec["model"]
        best_files.append(rec["best"])
        atomic_write_text(out / "rounds.json", json.dumps(records, indent=2) + "\n")
    return records


def main(argv: list[str]) -> None:
    cfg: RLHFConfig = parse_stage(RLHFConfig, argv, "rlhf")
    records = run(cfg)
    print(json.dumps(records, indent=2))
