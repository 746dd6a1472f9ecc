"""Iterative RLHF rounds, RLHF-V1..Vn (recipe §3-§6, paper §3.2 and Figure 4).

Each round: collect a fresh preference batch from the newest policy (and an earlier variant),
retrain both reward models on all batches so far (from the SFT checkpoint, as the paper
initializes RMs from chat checkpoints), run rejection sampling from the newest policy, and from
round `ppo_from` on run PPO on top of the rejection-sampling checkpoint (the paper's V4 on).
Every sub-stage (a preference batch, an RM, rejection sampling, PPO) writes its outputs and
then its marker (contract.py): one done with the same settings and inputs is skipped, so an
interrupted run resumes where it stopped, and one whose settings changed runs again.

    llama2 rlhf --sft runs/x/sft/model --base runs/x/pretrain/model --out runs/x/rlhf --rounds 3
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from llama2.engine import checkpointing, distributed
from llama2.stages.common import parse_stage
from llama2.stages.contract import MARKER, SUFFIX, Stage, notice, prune
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


def batch_marker(prefs_dir: str | Path, k: int, split: str = "train") -> Path:
    """The marker of preference batch k (its files: [eval_]{helpful,safety,stats}_batch_k)."""
    return Path(prefs_dir) / f"{'' if split == 'train' else split + '_'}batch_{k}{SUFFIX}"


def _batch_stage(prefs_dir: Path, k: int, split: str, pc: PreferencesConfig | None) -> Stage:
    prefix = "" if split == "train" else f"{split}_"
    files = [prefs_dir / f"{prefix}{name}_batch_{k}.{ext}"
             for name, ext in (("helpful", "jsonl"), ("safety", "jsonl"), ("stats", "json"))]
    if pc is None:
        return Stage(batch_marker(prefs_dir, k, split), {}, outputs=files)
    return Stage(batch_marker(prefs_dir, k, split), {"preferences": pc},
                 {"preferences.models": pc.models}, files)


def _train_rm(section: str, template: RewardConfig, sft: str, out: Path, helpful: list[str],
              safety: list[str], heldout: list[str], batches: list[Path],
              held_batches: list[Path]) -> Path:
    cfg = copy.deepcopy(template)
    cfg.model, cfg.out = sft, str(out)
    cfg.helpful_data, cfg.safety_data = list(helpful), list(safety)
    cfg.eval_data = list(heldout) or cfg.eval_data
    cfg.train.resume = True
    stage = Stage(out / MARKER, {section: cfg},
                  {f"{section}.model": sft, f"{section}.helpful_data": batches,
                   f"{section}.safety_data": batches,
                   f"{section}.eval_data": held_batches if heldout else cfg.eval_data})
    stage.run(lambda: train_reward_model(cfg))
    return out / "model"


def round_record(cfg: RLHFConfig, v: int) -> dict:
    """Where round v's models and best samples are (its record in rounds.json)."""
    out = Path(cfg.out) / f"v{v}"
    record = {"round": v, "rm_helpful": str(out / "rm_helpful" / "model"),
              "rm_safety": str(out / "rm_safety" / "model"),
              "rejection_sampling": str(out / "rejection_sampling" / "train" / "model"),
              "best": str(out / "rejection_sampling" / "best.jsonl")}
    if v >= cfg.ppo_from:
        record["ppo"] = str(out / "ppo" / "model")
    return {**record, "model": record.get("ppo", record["rejection_sampling"])}


def run_round(cfg: RLHFConfig, v: int, policy: str, previous_best: list[str]) -> dict:
    """Round v (1-based) starting from `policy`; returns the round's record."""
    out = Path(cfg.out)
    prefs_dir = out / "preferences"
    for split, n_scale in (("train", 1.0), ("eval", cfg.eval_share)):
        if n_scale <= 0:
            _batch_stage(prefs_dir, v - 1, split, None).remove("eval_share is 0")
            continue
        pc = copy.deepcopy(cfg.preferences)
        # Two responses from different model variants and temperatures (§3.2.1): the newest
        # policy, the SFT model after round 1, and the base model. Each batch also gets
        # held-out comparisons on eval-split prompts to evaluate the RMs.
        pc.models = [policy] + ([cfg.sft] if v > 1 else []) + ([cfg.base] if cfg.base else [])
        pc.out, pc.batch, pc.world_seed, pc.split = str(prefs_dir), v - 1, cfg.world_seed, split
        pc.n_helpful, pc.n_safety = round(pc.n_helpful * n_scale), round(pc.n_safety * n_scale)
        stage = _batch_stage(prefs_dir, v - 1, split, pc)
        if not stage.done():
            collect(pc)
            stage.finish()
    helpful = [str(prefs_dir / f"helpful_batch_{k}.jsonl") for k in range(v)]
    safety = [str(prefs_dir / f"safety_batch_{k}.jsonl") for k in range(v)]
    held_h = [str(prefs_dir / f"eval_helpful_batch_{v - 1}.jsonl")] if cfg.eval_share > 0 else []
    held_s = [str(prefs_dir / f"eval_safety_batch_{v - 1}.jsonl")] if cfg.eval_share > 0 else []
    batches = [batch_marker(prefs_dir, k) for k in range(v)]
    held = [batch_marker(prefs_dir, v - 1, "eval")]
    rm_h = _train_rm("helpful_rm", cfg.helpful_rm, cfg.sft, out / f"v{v}" / "rm_helpful",
                     helpful, safety, held_h, batches, held)
    rm_s = _train_rm("safety_rm", cfg.safety_rm, cfg.sft, out / f"v{v}" / "rm_safety",
                     helpful, safety, held_s, batches, held)

    rs_dir = out / f"v{v}" / "rejection_sampling"
    rc = copy.deepcopy(cfg.rejection_sampling)
    rc.model, rc.helpful_rm, rc.safety_rm, rc.out = policy, str(rm_h), str(rm_s), str(rs_dir)
    rc.round, rc.previous, rc.world_seed = v, list(previous_best), cfg.world_seed
    rc.reward = cfg.reward
    rc.train.resume = True
    Stage(rs_dir / MARKER, {"rejection_sampling": rc},
          {f"rejection_sampling.{k}": getattr(rc, k)
           for k in ("model", "helpful_rm", "safety_rm", "previous")}).run(
        lambda: rejection_sample(rc))
    record = round_record(cfg, v)
    ppo_dir = out / f"v{v}" / "ppo"
    if v >= cfg.ppo_from:
        pc = copy.deepcopy(cfg.ppo)
        pc.model, pc.helpful_rm, pc.safety_rm = record["rejection_sampling"], str(rm_h), str(rm_s)
        pc.out, pc.round, pc.world_seed, pc.reward = str(ppo_dir), v, cfg.world_seed, cfg.reward

        def ppo() -> None:
            pc.resume = checkpointing.latest(ppo_dir) is not None  # continue a killed run
            PPO(pc).run()

        # Under torchrun every rank runs PPO (FSDP2, the rollouts split over the ranks).
        Stage(ppo_dir / MARKER, {"ppo": pc},
              {f"ppo.{k}": getattr(pc, k) for k in ("model", "helpful_rm", "safety_rm")}).run(ppo)
    else:
        Stage(ppo_dir / MARKER, {}).remove(f"PPO starts at round {cfg.ppo_from}")
    return record


def _drop_later_rounds(out: Path, rounds: int) -> None:
    """Rounds past `rounds` (a run that had more): their folders and preference batches."""
    prune(out, ["preferences"] + [f"v{v}" for v in range(1, rounds + 1)])
    prefs = out / "preferences"
    stale = [f for f in (prefs.iterdir() if prefs.is_dir() else [])
             if (m := re.search(r"batch_(\d+)\.", f.name)) and int(m.group(1)) >= rounds]
    if distributed.is_main():
        for f in stale:
            f.unlink()
    distributed.barrier(distributed.current())
    if stale:
        notice(f"{prefs}: batches past round {rounds} removed")


def run(cfg: RLHFConfig) -> list[dict]:
    if not cfg.sft:
        raise ValueError("set --sft PATH (the SFT model)")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _drop_later_rounds(out, cfg.rounds)
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
