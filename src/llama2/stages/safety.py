"""Safety SFT and its data scaling study (recipe §8, paper §4.2.2-4.2.3, Figure 15).

Safety SFT is the SFT stage with the world's adversarial prompts and safe demonstrations mixed
in (`SFTConfig.safety_share`); safety RLHF is the RLHF stage with safety prompts in rejection
sampling and PPO (`RejectionSamplingConfig.safety_share`, `PPOConfig.safety_share`) scored by
the Safety RM. This module holds what both measure with:

- `evaluate_safety(model, ...)`: greedy answers to held-out helpful, adversarial and borderline
  prompts, scored by the world's annotator: mean helpfulness, the safety-score distribution,
  violation rate, and the false-refusal rate on the borderline set (§4.4).
- `safety_scaling(cfg)`: the Figure 15 study. With the helpfulness data fixed, one SFT model
  per share of the safety demonstrations (0%, 1%, 10%, 25%, 50%, 100%), all from the same
  pretrained model; writes RUN_DIR/safety_scaling.json and .png.

    llama2 distill --scaling --model runs/x/pretrain/model --out runs/x [--sft.n_safety 300]
"""

from __future__ import annotations

import copy
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama2.chat import Dialog
from llama2.engine import distributed
from llama2.respond import respond
from llama2.stages.common import as_policy, load_policy, parse_stage
from llama2.stages.contract import MARKER, Stage, prune
from llama2.stages.sft import SFTConfig, finetune, gather_dialogs
from llama2.utils import atomic_write_text


def evaluate_safety(model: Any, world_seed: int = 0, n_helpful: int = 200, n_safety: int = 200,
                    n_borderline: int = 100, max_new_tokens: int = 48, annotator_seed: int = 0,
                    device: str = "auto") -> dict[str, Any]:
    """Annotator scores of greedy answers on held-out prompts (eval split)."""
    from llama2.world import Annotator, World

    loaded = as_policy(model, device)
    world, ann = World(world_seed), Annotator(annotator_seed, noise=False)
    helpful = world.helpful_prompts(n_helpful, split="eval") if n_helpful else []
    safety = world.safety_prompts(n_safety, split="eval") if n_safety else []
    border = world.borderline_prompts(n_borderline, split="eval") if n_borderline else []
    texts = respond(loaded.model, loaded.tokenizer, [p.dialog for p in helpful + safety + border],
                    max_new_tokens, fit="skip")
    h_txt, s_txt = texts[: len(helpful)], texts[len(helpful): len(helpful) + len(safety)]
    b_txt = texts[len(helpful) + len(safety):]
    scores = [ann.safety(p, r) for p, r in zip(safety, s_txt)]
    violations = [int(ann.is_violation(p, r)) for p, r in zip(safety, s_txt)]
    refusals = [int(ann.is_refusal(r)) for r in b_txt]
    mean = statistics.fmean
    return {
        "mean_helpfulness": mean([ann.helpfulness(p, r) for p, r in zip(helpful, h_txt)])
        if helpful else None,
        "safety_scores": scores,
        "mean_safety": mean(scores) if scores else None,
        "violation_rate": mean(violations) if safety else None,
        "violations": violations,  # per prompt, in prompt order: models compare paired
        "false_refusals": refusals,
        "refusal_rate_safety": mean([ann.is_refusal(r) for r in s_txt]) if safety else None,
        "false_refusal": mean(refusals) if border else None,
        "borderline_helpfulness": mean([ann.helpfulness(p, r) for p, r in zip(border, b_txt)])
        if border else None,
        "examples": {"helpful": list(zip([p.text for p in helpful[:3]], h_txt[:3])),
                     "safety": list(zip([p.text for p in safety[:3]], s_txt[:3])),
                     "borderline": list(zip([p.text for p in border[:3]], b_txt[:3]))},
    }


def without_lists(ev: dict[str, Any]) -> dict[str, Any]:
    """An evaluation for summaries: without its per-prompt scores and examples (its 0/1
    violation and refusal flags stay: comparisons of models on the same prompts pair them)."""
    return {k: v for k, v in ev.items() if k not in ("safety_scores", "examples")}


@dataclass
class SafetyScalingConfig:
    model: str = ""  # the pretrained model every share starts from
    out: str = "runs/x"  # RUN_DIR: safety_scaling.json/.png here, models in safety_scaling/
    shares: list[float] = field(default_factory=lambda: [0.0, 0.01, 0.1, 0.25, 0.5, 1.0])
    sft: SFTConfig = field(default_factory=SFTConfig)  # the SFT recipe (data sizes, training)
    n_eval_helpful: int = 200
    n_eval_safety: int = 200
    n_eval_borderline: int = 100
    max_new_tokens: int = 48
    annotator_seed: int = 0


def share_dir(out: str | Path, share: float) -> Path:
    return Path(out) / "safety_scaling" / f"share_{share:g}"


def train_share(cfg: SafetyScalingConfig, share: float) -> Path:
    """One SFT model with `share` of the safety demonstrations (helpfulness data fixed)."""
    folder = share_dir(cfg.out, share)
    sft = copy.deepcopy(cfg.sft)
    sft.model, sft.out, sft.safety_share = cfg.model, str(folder), share

    def train() -> None:
        dialogs: list[Dialog] = gather_dialogs(sft)
        loaded = load_policy(cfg.model, sft.train.device)
        finetune(loaded.model, loaded.tokenizer, dialogs, folder, sft.train, sft.seq_len,
                 sft.val_fraction, sft.learn, config=sft,
                 extra={"stage": "safety_scaling", "safety_share": share})

    # The share the recipe's own SFT has is that model (cfg.sft.out, where the pipeline made it):
    # the same hash, so copied rather than trained again (contract.py).
    Stage(folder / MARKER, {"sft": sft}, {"sft.model": cfg.model}).run(train, cfg.sft.out, sft)
    return folder / "model"


def plot_scaling(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = result["shares"]
    labels = [f"{100 * s:g}%" for s in shares]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = list(range(len(shares)))
    axes[0].plot(x, result["mean_helpfulness"], "o-", label="mean helpfulness")
    axes[0].plot(x, result["mean_safety"], "s-", label="mean safety")
    axes[0].plot(x, result["false_refusal"], "^--", label="false refusal (borderline)")
    axes[0].set_xticks(x, labels)
    axes[0].set(xlabel="share of safety data", ylim=(-0.05, 1.05),
                title="Safety data scaling (Figure 15)")
    axes[0].legend(fontsize=8)
    axes[1].boxplot(result["safety_scores"], tick_labels=labels)
    axes[1].set(xlabel="share of safety data", ylabel="safety score",
                title="Safety score distribution")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def safety_scaling(cfg: SafetyScalingConfig) -> dict[str, Any]:
    """Figure 15: one SFT model per safety share, all evaluated on the same held-out prompts."""
    if not cfg.model:
        raise ValueError("no pretrained model given (set --model PATH)")
    keys = ("mean_helpfulness", "safety_scores", "mean_safety", "violation_rate",
            "false_refusal")
    result: dict[str, Any] = {"shares": list(cfg.shares), **{k: [] for k in keys},
                              "n_safety_demos": [], "models": [],
                              "n_eval": {"helpful": cfg.n_eval_helpful, "safety": cfg.n_eval_safety,
                                         "borderline": cfg.n_eval_borderline}}
    prune(Path(cfg.out) / "safety_scaling", [share_dir(cfg.out, s).name for s in cfg.shares])
    for share in cfg.shares:
        path = train_share(cfg, share)
        ev = evaluate_safety(path, cfg.sft.world_seed, cfg.n_eval_helpful, cfg.n_eval_safety,
                             cfg.n_eval_borderline, cfg.max_new_tokens, cfg.annotator_seed,
                             cfg.sft.train.device)
        for k in keys:
            result[k].append(ev[k])
        result["n_safety_demos"].append(round(cfg.sft.n_safety * share))
        result["models"].append(str(path))
        print(f"safety share {share:g}: helpfulness {ev['mean_helpfulness']:.3f} safety "
              f"{ev['mean_safety']:.3f} violations {ev['violation_rate']:.3f} false refusals "
              f"{ev['false_refusal']:.3f}", flush=True)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        plot_scaling(result, out / "safety_scaling.png")
    atomic_write_text(out / "safety_scaling.json", json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str]) -> None:
    cfg: SafetyScalingConfig = parse_stage(SafetyScalingConfig, argv, "distill --scaling")
    result = safety_scaling(cfg)
    print(json.dumps({k: v for k, v in result.items() if k != "safety_scores"}, indent=1))
    print(f"written to {Path(cfg.out) / 'safety_scaling.json'}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
