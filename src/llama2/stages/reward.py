"""Reward models (recipe §4, paper §3.2.2): Helpfulness RM and Safety RM.

The loss is the binary ranking loss with a margin by rating level,
`L = -log(sigmoid(r(x, y_c) - r(x, y_r) - m(r)))` (paper eq. 2), with the "small" and "large"
margin tables (Table 27) or none; the Safety RM may add the auxiliary safe/unsafe loss on
sigmoid(score) (Table 29). One epoch (longer overfits), AdamW as pretraining, cosine to 10%,
warmup 3% of the steps (at least 5). Data mixes (§3.2.2): the Helpfulness RM takes all
helpfulness data plus an equal part sampled from safety and open data; the Safety RM all safety
data plus open harmless data, mixed 90/10 with helpfulness data.

    llama2 reward --kind helpfulness --model runs/x/sft/model --helpful-data a.jsonl ...
    llama2 reward --evaluate runs/x/rm_helpful --eval-data test.jsonl.gz
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama2.chat import OnSpecialTags
from llama2.engine import EpochSampler, TrainConfig, Trainer, distributed
from llama2.engine.trainer import to_device
from llama2.reward import (
    RewardModel,
    encode_scored,
    from_policy,
    pack_pairs,
    save_reward_model,
    shared_prefix,
)
from llama2.rlhf_math import LEVELS, MARGINS, auxiliary_safety_loss, margin_ranking_loss
from llama2.stages.common import load_policy, parse_stage
from llama2.utils import atomic_write_text

# Safety labels of (chosen, rejected) by safety bin; None = unknown (no auxiliary loss).
BIN_LABELS = {"chosen_safe_other_unsafe": (1.0, 0.0), "both_safe": (1.0, 1.0),
              "both_unsafe": (0.0, 0.0)}


def rm_train_defaults() -> TrainConfig:
    return TrainConfig(lr=1e-5, epochs=1.0, warmup_steps=5, warmup_ratio=0.03,
                       micro_batch_size=16, global_batch=512)


@dataclass
class RewardConfig:
    kind: str = "helpfulness"  # "helpfulness" | "safety"
    model: str = ""  # chat/SFT checkpoint to initialize from
    out: str = "runs/rm"
    helpful_data: list[str] = field(default_factory=list)  # preference files (.jsonl[.gz])
    safety_data: list[str] = field(default_factory=list)
    open_helpful_data: list[str] = field(default_factory=list)  # e.g. HH-RLHF helpful-base
    open_harmless_data: list[str] = field(default_factory=list)  # e.g. HH-RLHF harmless-base
    # Share of the mix drawn from the secondary data (paper: 0.5 for the Helpfulness RM, "equal
    # parts"; 0.1 for the Safety RM, the 90/10 mix); -1 takes the paper's value for `kind`.
    secondary_share: float = -1.0
    margin: str = "small"  # "none" | "small" | "large"
    aux_safety_loss: bool = False  # Safety RM auxiliary loss (Table 29)
    aux_weight: float = 1.0
    eval_data: list[str] = field(default_factory=list)  # held-out comparisons
    val_fraction: float = 0.1  # held out of the training data when eval_data is empty
    max_len: int = 0  # 0: the model's context
    # A preference record whose dialog or answers carry a chat tag ([INST], [/INST], <<SYS>>,
    # <</SYS>>): "error" (one line naming file, line and field) or "skip" (counted, summary).
    on_special_tags: OnSpecialTags = "error"
    evaluate: str = ""  # path of a trained RM: evaluate only
    seed: int = 0
    train: TrainConfig = field(default_factory=rm_train_defaults)


# --------------------------------------------------------------------------------- data
def read_pairs(paths: list[str], on_special_tags: OnSpecialTags = "error") -> list:
    """Preference pairs from our JSONL or HH-RLHF files; records carrying chat tags raise or,
    with on_special_tags = "skip", are counted and skipped (world/adapters.py)."""
    from llama2.world.adapters import _open_text, load_hh_rlhf, load_preferences_jsonl

    pairs = []
    for p in paths:
        # HH-RLHF records hold whole transcripts ("\n\nHuman: ... Assistant: ...") and no
        # dialog field; our preference JSONL has the context apart. Sniff the first record.
        with _open_text(Path(p)) as f:
            first = next((line for line in f if line.strip()), "")
        hh = '"chosen"' in first and "Human:" in first and not any(
            f'"{k}"' in first for k in ("dialog", "messages", "conversations", "prompt"))
        pairs += (load_hh_rlhf if hh else load_preferences_jsonl)(
            p, on_special_tags=on_special_tags)
    return pairs


def build_mix(primary: list, secondary: list, share: float, rng: random.Random) -> list:
    """All of `primary`, plus secondary samples making up `share` of the result."""
    if not secondary or share <= 0:
        return list(primary)
    if not primary:
        return list(secondary)
    want = round(len(primary) * share / (1 - share)) if share < 1 else len(secondary)
    extra = rng.sample(secondary, min(want, len(secondary)))
    return list(primary) + extra


def training_mix(cfg: RewardConfig, rng: random.Random) -> list:
    tags = cfg.on_special_tags
    helpful, safety = read_pairs(cfg.helpful_data, tags), read_pairs(cfg.safety_data, tags)
    open_helpful = read_pairs(cfg.open_helpful_data, tags)
    open_harmless = read_pairs(cfg.open_harmless_data, tags)
    if cfg.kind == "helpfulness":
        share = 0.5 if cfg.secondary_share < 0 else cfg.secondary_share
        primary = helpful or open_helpful
        rest = safety + open_harmless + (open_helpful if helpful else [])
    elif cfg.kind == "safety":
        share = 0.1 if cfg.secondary_share < 0 else cfg.secondary_share
        primary = safety + open_harmless
        rest = helpful + open_helpful
    else:
        raise ValueError(f"kind must be 'helpfulness' or 'safety', got {cfg.kind!r}")
    mix = build_mix(primary, rest, share, rng)
    if not mix:
        raise ValueError(f"no preference data for the {cfg.kind} RM (set --{cfg.kind}-data)")
    return mix


def encode_pair(tok, pair, max_len: int) -> dict[str, Any]:
    """Both responses in the chat format after the pair's dialog. A pair too long for `max_len`
    loses the same leading context tokens on both sides while that keeps the responses whole,
    so the two are judged on the same visible context (and `pack_pairs` computes it once);
    otherwise each side is cut from the left on its own."""
    chosen = encode_scored(tok, pair.dialog, pair.chosen, 0)
    rejected = encode_scored(tok, pair.dialog, pair.rejected, 0)
    cut = max(len(chosen), len(rejected)) - max_len
    if cut > 0:
        if cut <= shared_prefix(chosen, rejected):
            chosen, rejected = chosen[cut:], rejected[cut:]
        else:
            chosen, rejected = chosen[-max_len:], rejected[-max_len:]
    return {"chosen": chosen, "rejected": rejected, "level": pair.level,
            "safety_bin": pair.safety_bin}


def make_collate(margin: str):
    table = MARGINS[margin]

    def collate(items: list[dict]) -> dict[str, torch.Tensor]:
        """Pairs packed by `pack_pairs` (the shared context computed once, no padding), their
        margins, safety labels and `lengths` (the tokens of each chosen,
        then each rejected sequence)."""
        labels = [BIN_LABELS.get(i["safety_bin"] or "", (-1.0, -1.0)) for i in items]
        return {**pack_pairs([(i["chosen"], i["rejected"]) for i in items]),
                "lengths": torch.tensor([len(i[k]) for k in ("chosen", "rejected") for i in items]),
                "margin": torch.tensor([table.get(i["level"] or "", 0.0) for i in items]),
                "safe": torch.tensor(labels).t().reshape(-1)}  # chosen labels, then rejected

    return collate


def ranking_loss(rm: RewardModel, batch: dict[str, torch.Tensor], aux_weight: float = 0.0
                 ) -> tuple[torch.Tensor, dict[str, float], int]:
    """Margin ranking loss (paper eq. 2), plus the auxiliary safety loss when weighted."""
    chosen, rejected = rm.forward_pairs(batch)
    n = chosen.shape[0]
    loss = margin_ranking_loss(chosen, rejected, batch["margin"])
    metrics = {"accuracy": float((chosen > rejected).float().mean())}
    if aux_weight:
        aux = auxiliary_safety_loss(torch.cat([chosen, rejected]), batch["safe"])
        if aux is not None:
            loss = loss + aux_weight * aux
            metrics["aux_loss"] = float(aux.detach())
    return loss, metrics, n


# --------------------------------------------------------------------------------- eval
@torch.no_grad()
def pair_scores(rm: RewardModel, items: list[dict], batch_size: int = 32
                ) -> tuple[torch.Tensor, torch.Tensor]:
    rm.eval()
    collate = make_collate("none")
    chosen, rejected = [], []
    device = rm.score_head.weight.device
    for b in range(0, len(items), batch_size):
        c, r = rm.forward_pairs(to_device(collate(items[b:b + batch_size]), device))
        chosen.append(c.cpu())
        rejected.append(r.cpu())
    return torch.cat(chosen), torch.cat(rejected)


def auroc(positive: list[float], negative: list[float]) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney U form)."""
    pos, neg = torch.tensor(positive), torch.tensor(negative)
    above = (pos.view(-1, 1) > neg.view(1, -1)).float().mean()
    ties = (pos.view(-1, 1) == neg.view(1, -1)).float().mean()
    return float(above + 0.5 * ties)


def flagged_at_kept(safe: list[float], unsafe: list[float], kept: float = 0.9) -> list[bool]:
    """Per unsafe response, whether it is flagged at the threshold that keeps `kept` of the
    safe ones (a score below the safe scores' (1 - kept) quantile is flagged)."""
    threshold = torch.tensor(safe).quantile(1.0 - kept).item()
    return [x < threshold for x in unsafe]


def recall_at_kept(safe: list[float], unsafe: list[float], kept: float = 0.9) -> float:
    """The share of unsafe responses flagged where `kept` of the safe ones are kept."""
    return sum(flagged_at_kept(safe, unsafe, kept)) / len(unsafe)


def evaluate_rm(rm: RewardModel, items: list[dict]) -> dict[str, Any]:
    """Accuracy per rating level (Table 8 layout) and per safety bin, the recall of unsafe
    responses at sigmoid(score) < 0.5 (Table 29), the share of safe responses kept at that
    threshold, the recall where 90% of safe responses are kept and the AUROC of the score
    separating safe from unsafe responses."""
    chosen, rejected = pair_scores(rm, items)
    right = (chosen > rejected).float()
    by_level, by_bin = defaultdict(list), defaultdict(list)
    unsafe_scores: list[float] = []
    safe_scores: list[float] = []
    for i, item in enumerate(items):
        by_level[item["level"] or "unknown"].append(float(right[i]))
        if item["safety_bin"]:
            by_bin[item["safety_bin"]].append(float(right[i]))
            labels = BIN_LABELS.get(item["safety_bin"])
            if labels:
                for label, s in zip(labels, (chosen[i], rejected[i])):
                    (safe_scores if label else unsafe_scores).append(float(s))
    out: dict[str, Any] = {
        "n": len(items), "accuracy": float(right.mean()) if len(items) else 0.0,
        "accuracy_by_level": {k: sum(v) / len(v) for k, v in by_level.items()},
        "count_by_level": {k: len(v) for k, v in by_level.items()},
        "accuracy_by_bin": {k: sum(v) / len(v) for k, v in by_bin.items()},
        "mean_chosen": float(chosen.mean()) if len(items) else 0.0,
        "mean_rejected": float(rejected.mean()) if len(items) else 0.0,
    }
    if unsafe_scores:  # score < 0 is sigmoid(score) < 0.5
        out["unsafe_recall"] = sum(x < 0 for x in unsafe_scores) / len(unsafe_scores)
        out["unsafe_count"] = len(unsafe_scores)
    if safe_scores:
        # Recall at 0.5 depends on where the scores sit, which the ranking loss alone leaves
        # free: report the safe responses kept at that threshold, the recall at a fixed share
        # of safe responses kept, and the threshold-free AUROC.
        out["safe_kept"] = sum(x >= 0 for x in safe_scores) / len(safe_scores)
        if unsafe_scores:
            flags = flagged_at_kept(safe_scores, unsafe_scores, 0.9)
            out["unsafe_recall_at_90_kept"] = sum(flags) / len(flags)
            out["unsafe_auroc"] = auroc(safe_scores, unsafe_scores)
            out["safe_count"] = len(safe_scores)
            # Per unsafe response, in the evaluation's order: two RMs evaluated on the same
            # pairs are compared response by response (McNemar) in the reproduction table.
            out["unsafe_flagged_at_90_kept"] = [int(f) for f in flags]
    # Per pair, in the evaluation's order within each level: whether the RM ranked it right.
    out["correct_by_level"] = {k: [int(x) for x in v] for k, v in by_level.items()}
    out["_gaps"] = {lvl: [float(chosen[i] - rejected[i]) for i, it in enumerate(items)
                          if (it["level"] or "unknown") == lvl] for lvl in by_level}
    return out


def plot_histograms(gaps: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for lvl in [*LEVELS, "unknown"]:
        if gaps.get(lvl):
            ax.hist(gaps[lvl], bins=30, alpha=0.5, label=lvl.replace("_", " "))
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("score(chosen) - score(rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_eval(metrics: dict[str, Any], out: Path, title: str) -> dict[str, Any]:
    gaps = metrics.pop("_gaps")
    if distributed.is_main():
        plot_histograms(gaps, out / "score_gaps.png", title)
    atomic_write_text(out / "eval.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


# --------------------------------------------------------------------------------- train
def train_reward_model(cfg: RewardConfig, eval_pairs: list | None = None) -> dict[str, Any]:
    """Train one RM as configured, evaluate it on held-out pairs; returns the eval metrics."""
    rng = random.Random(cfg.seed)
    loaded = load_policy(cfg.model, cfg.train.device)
    tok = loaded.tokenizer
    max_len = cfg.max_len or loaded.args.max_seq_len
    pairs = training_mix(cfg, rng)
    rng.shuffle(pairs)
    if eval_pairs is None:
        if cfg.eval_data:
            eval_pairs = read_pairs(cfg.eval_data, cfg.on_special_tags)
        else:
            n_val = int(len(pairs) * cfg.val_fraction)
            eval_pairs, pairs = pairs[:n_val], pairs[n_val:]
    items = [encode_pair(tok, p, max_len) for p in pairs]
    eval_items = [encode_pair(tok, p, max_len) for p in eval_pairs]
    rm = from_policy(loaded.model)
    train = cfg.train
    # A global batch larger than the data would make one step of an epoch: cap it.
    if train.global_batch > len(items):
        per = train.micro_batch_size
        train.global_batch = max(per, len(items) // per * per)
    data = EpochSampler(items, make_collate(cfg.margin), seed=cfg.seed)
    aux = cfg.aux_weight if cfg.aux_safety_loss else 0.0
    out = Path(cfg.out)

    def loss_fn(model, batch):
        return ranking_loss(model, batch, aux)

    def on_save(model, step):
        save_reward_model(model, tok, out / "model", cfg.kind,
                          extra={"step": step, "margin": cfg.margin, "aux": cfg.aux_safety_loss,
                                 "pairs": len(items)})

    Trainer(rm, loss_fn, data, train, out, config=cfg, on_save=on_save).fit()
    metrics = evaluate_rm(rm, eval_items) if eval_items else {"n": 0, "_gaps": {}}
    return write_eval(metrics, out, f"{cfg.kind} RM (margin {cfg.margin})")


def main(argv: list[str]) -> None:
    cfg: RewardConfig = parse_stage(RewardConfig, argv, "reward")
    if cfg.evaluate:
        from llama2.reward import load_reward_model

        rm, tok, meta = load_reward_model(cfg.evaluate)
        pairs = read_pairs(cfg.eval_data, cfg.on_special_tags)
        if not pairs:
            raise ValueError("nothing to evaluate: set --eval-data FILE")
        items = [encode_pair(tok, p, cfg.max_len or rm.args.max_seq_len) for p in pairs]
        metrics = write_eval(evaluate_rm(rm, items), Path(cfg.out),
                             f"{meta.get('kind')} RM")
    else:
        metrics = train_reward_model(cfg)
    per_item = ("correct_by_level", "unsafe_flagged_at_90_kept")  # eval.json has them
    print(json.dumps({k: v for k, v in metrics.items() if k not in per_item}, indent=2))
