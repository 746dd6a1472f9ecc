"""Iterative RLHF rounds, RLHF-V1..Vn (recipe §3-§6, paper §3.2 and Figure 4).

Each round: collect a fresh preference batch from the newest policy (and an earlier variant),
retrain both reward models on all batches so far (from the SFT checkpoint, as the paper
initializes RMs from chat checkpoints), run rejection sampling from the newest policy, and from
round `ppo_from` on run PPO on top of the rejection-sampling checkpoint (the paper's V4 on).
With `ppo_refresh` R, a PPO round then collects R more batches, each from its newest PPO policy,
retrains the Helpfulness RM on them and reruns PPO from the same start: an RM that has scored
the policy's own answers keeps PPO from a reward hack it found (§3.2.1, "on-distribution").
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
    # Preference batches collected from each PPO round's own policy, each followed by a
    # Helpfulness RM trained on all batches so far and PPO rerun from the round's start (none
    # in a gold-reward run: PPO does not optimize the RM there).
    ppo_refresh: int = 0
    preferences: PreferencesConfig = field(default_factory=PreferencesConfig)
    helpful_rm: RewardConfig = field(default_factory=lambda: RewardConfig(kind="helpfulness"))
    safety_rm: RewardConfig = field(default_factory=lambda: RewardConfig(
        kind="safety", aux_safety_loss=True))
    rejection_sampling: RejectionSamplingConfig = field(default_factory=RejectionSamplingConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    @property
    def refreshes(self) -> int:
        return self.ppo_refresh if self.reward == "rm" else 0


def batch_marker(prefs_dir: str | Path, k: int, split: str = "train") -> Path:
    """The marker of preference batch k (its files: [eval_]{helpful,safety,stats}_batch_k)."""
    return Path(prefs_dir) / f"{'' if split == 'train' else split + '_'}batch_{k}{SUFFIX}"


def first_batch(cfg: RLHFConfig, v: int) -> int:
    """The index of round v's preference batch: one a round, and `ppo_refresh` more a PPO round."""
    return v - 1 + cfg.refreshes * max(0, v - cfg.ppo_from)


def _batch_stage(prefs_dir: Path, k: int, split: str, pc: PreferencesConfig | None) -> Stage:
    prefix = "" if split == "train" else f"{split}_"
    files = [prefs_dir / f"{prefix}{name}_batch_{k}.{ext}"
             for name, ext in (("helpful", "jsonl"), ("safety", "jsonl"), ("stats", "json"))]
    if pc is None:
        return Stage(batch_marker(prefs_dir, k, split), {}, outputs=files)
    return Stage(batch_marker(prefs_dir, k, split), {"preferences": pc},
                 {"preferences.models": pc.models}, files)


def train_rm(section: str, template: RewardConfig, sft: str, out: Path, helpful: list[str],
             safety: list[str], heldout: list[str], batches: list[Path],
             held_batches: list[Path], twin: Path | None = None) -> Path:
    """One RM as a stage ("helpful_rm" or "safety_rm"), copied from `twin` where that stage
    ran with the same settings and inputs (contract.Stage.copy_of)."""
    cfg = copy.deepcopy(template)
    cfg.model, cfg.out = sft, str(out)
    cfg.helpful_data, cfg.safety_data = list(helpful), list(safety)
    cfg.eval_data = list(heldout) or cfg.eval_data
    cfg.train.resume = True
    stage = Stage(out / MARKER, {section: cfg},
                  {f"{section}.model": sft, f"{section}.helpful_data": batches,
                   f"{section}.safety_data": batches,
                   f"{section}.eval_data": held_batches if heldout else cfg.eval_data})
    stage.run(lambda: train_reward_model(cfg), twin, cfg)
    return out / "model"


def round_record(cfg: RLHFConfig, v: int) -> dict:
    """Where round v's models and best samples are (its record in rounds.json)."""
    out = Path(cfg.out) / f"v{v}"
    record = {"round": v, "rm_helpful": str(out / "rm_helpful" / "model"),
              "rm_safety": str(out / "rm_safety" / "model"),
              "rejection_sampling": str(out / "rejection_sampling" / "train" / "model"),
              "best": str(out / "rejection_sampling" / "best.jsonl")}
    if v >= cfg.ppo_from:
        last = out / f"refresh_{cfg.refreshes}" if cfg.refreshes else out
        record["ppo"] = str(last / "ppo" / "model")
        record["rm_helpful"] = str(last / "rm_helpful" / "model")
    return {**record, "model": record.get("ppo", record["rejection_sampling"])}


def _collect_batch(cfg: RLHFConfig, k: int, models: list[str], eval_share: float) -> None:
    """Preference batch k sampled from `models`, and its held-out share on eval-split prompts."""
    prefs_dir = Path(cfg.out) / "preferences"
    for split, n_scale in (("train", 1.0), ("eval", eval_share)):
        if n_scale <= 0:
            _batch_stage(prefs_dir, k, split, None).remove("no held-out share")
            continue
        pc = copy.deepcopy(cfg.preferences)
        pc.models, pc.out, pc.batch = list(models), str(prefs_dir), k
        pc.world_seed, pc.split = cfg.world_seed, split
        pc.n_helpful, pc.n_safety = round(pc.n_helpful * n_scale), round(pc.n_safety * n_scale)
        stage = _batch_stage(prefs_dir, k, split, pc)
        if not stage.done():
            collect(pc)
            stage.finish()


def _ppo(cfg: RLHFConfig, v: int, start: str, rm_h: Path, rm_s: Path, out: Path) -> str:
    pc = copy.deepcopy(cfg.ppo)
    pc.model, pc.helpful_rm, pc.safety_rm = start, str(rm_h), str(rm_s)
    pc.out, pc.round, pc.world_seed, pc.reward = str(out), v, cfg.world_seed, cfg.reward

    def ppo() -> None:
        pc.resume = checkpointing.latest(out) is not None  # continue a killed run
        PPO(pc).run()

    # Under torchrun every rank runs PPO (FSDP2, the rollouts split over the ranks).
    Stage(out / MARKER, {"ppo": pc},
          {f"ppo.{k}": getattr(pc, k) for k in ("model", "helpful_rm", "safety_rm")}).run(ppo)
    return str(out / "model")


def run_round(cfg: RLHFConfig, v: int, policy: str, previous_best: list[str]) -> dict:
    """Round v (1-based) starting from `policy`; returns the round's record."""
    out = Path(cfg.out)
    prefs_dir = out / "preferences"
    first = first_batch(cfg, v)
    # Two responses from different model variants and temperatures (§3.2.1): the newest
    # policy, the SFT model after round 1, and the base model. Each batch also gets held-out
    # comparisons on eval-split prompts to evaluate the RMs.
    models = [policy] + ([cfg.sft] if v > 1 else []) + ([cfg.base] if cfg.base else [])
    _collect_batch(cfg, first, models, cfg.eval_share)

    def train_rms(last: int, kinds: tuple[str, ...], where: Path) -> list[Path]:
        """RMs trained on batches 0..last, each evaluated on the held-out pairs of the round's
        first batch (every RM of a round on the same pairs)."""
        data = {name: [str(prefs_dir / f"{name}_batch_{b}.jsonl") for b in range(last + 1)]
                for name in ("helpful", "safety")}
        batches = [batch_marker(prefs_dir, b) for b in range(last + 1)]
        held = [batch_marker(prefs_dir, first, "eval")]
        return [train_rm(f"{kind}_rm", getattr(cfg, f"{kind}_rm"), cfg.sft, where / f"rm_{kind}",
                         data["helpful"], data["safety"],
                         [str(prefs_dir / f"eval_{kind}_batch_{first}.jsonl")]
                         if cfg.eval_share > 0 else [], batches, held)
                for kind in kinds]

    rm_h, rm_s = train_rms(first, ("helpful", "safety"), out / f"v{v}")

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
    refresh_dirs = [f"refresh_{r}" for r in range(1, cfg.refreshes + 1)]
    prune(out / f"v{v}", ["rm_helpful", "rm_safety", "rejection_sampling"]
          + (["ppo", *refresh_dirs] if v >= cfg.ppo_from else []))
    if v < cfg.ppo_from:
        return record
    newest = _ppo(cfg, v, record["rejection_sampling"], rm_h, rm_s, out / f"v{v}" / "ppo")
    for r in range(1, cfg.refreshes + 1):
        # The newest PPO policy's answers, against the round's start, annotated (§3.2.1): the
        # Helpfulness RM learns what PPO found to please it; PPO restarts under that RM.
        where = out / f"v{v}" / f"refresh_{r}"
        _collect_batch(cfg, first + r, [newest, policy], 0.0)
        (rm_h,) = train_rms(first + r, ("helpful",), where)
        newest = _ppo(cfg, v, record["rejection_sampling"], rm_h, rm_s, where / "ppo")
    return record


def _drop_later_rounds(cfg: RLHFConfig) -> None:
    """Rounds past `cfg.rounds` (a run that had more): their folders and preference batches."""
    out, rounds = Path(cfg.out), cfg.rounds
    prune(out, ["preferences"] + [f"v{v}" for v in range(1, rounds + 1)])
    prefs = out / "preferences"
    n = first_batch(cfg, rounds + 1)
    stale = [f for f in (prefs.iterdir() if prefs.is_dir() else [])
             if (m := re.search(r"batch_(\d+)\.", f.name)) and int(m.group(1)) >= n]
    if distributed.is_main():
        for f in stale:
            f.unlink()
    distributed.barrier(distributed.current())
    if stale:
        notice(f"{prefs}: batches past round {rounds} removed")


def run(cfg: RLHFConfig) -> list[dict]:
    if not cfg.sft:
        raise ValueError("set --sft PATH (the SFT model)")
    if cfg.ppo_refresh < 0:
        raise ValueError(f"ppo_refresh must be 0 or more, got {cfg.ppo_refresh}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _drop_later_rounds(cfg)
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
