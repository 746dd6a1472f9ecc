"""Rejection sampling fine-tuning (recipe §5, paper §3.2.3).

For each prompt, K samples from the current policy at a given temperature (one batched,
KV-cached generate call), scored by the piecewise two-RM reward; the best becomes the new
target and the policy is fine-tuned on it as in SFT. From RLHF-V4 on the paper kept the top
samples of all earlier rounds (keep = "all"); before, only the latest round's (keep = "latest"),
which forgot skills. Writes the max-vs-median reward over K (Figure 7) and the
reward-vs-temperature sweep (Figure 8) as JSON and PNG.

    llama2 rejection-sample --model M --helpful-rm H --safety-rm S --out DIR [--k 8]
    llama2 rs-forgetting --model V1 --helpful-rm H --safety-rm S --round 2 \
        --previous V1_DIR/best.jsonl --family howto --out DIR   (keep latest vs all)
"""

from __future__ import annotations

import copy
import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama2.chat import OnSpecialTags
from llama2.engine import TrainConfig, distributed
from llama2.respond import respond
from llama2.reward import TwoRewardModels, proxy_and_gold
from llama2.stages.common import load_policy, parse_stage
from llama2.stages.sft import finetune, sft_train_defaults
from llama2.utils import atomic_write_text, read_jsonl, write_jsonl


@dataclass
class RejectionSamplingConfig:
    model: str = ""  # the current policy
    helpful_rm: str = ""
    safety_rm: str = ""
    out: str = "runs/rejection_sampling"
    prompts: list[str] = field(default_factory=lambda: ["world"])  # "world" or prompt files
    # A record of a prompt file or of `previous` whose dialog text carries a chat tag ([INST],
    # [/INST], <<SYS>>, <</SYS>>): "error" (one line: file, line, field) or "skip" (counted).
    on_special_tags: OnSpecialTags = "error"
    world_seed: int = 0
    round: int = 0  # RLHF round: picks a fresh slice of world prompts
    n_prompts: int = 300
    safety_share: float = 0.25  # share of safety prompts among the world prompts
    borderline_share: float = 0.1  # benign prompts with sensitive words (false refusals)
    families: list[str] = field(default_factory=list)  # world task families (empty: all)
    # What ranks the samples: "rm" (the two RMs, the recipe) or "annotator" (the world's
    # annotators, a gold-reward run: the ceiling with a perfect judge). Both are logged.
    reward: str = "rm"
    k: int = 8  # samples per prompt
    temperature: float = 1.0
    max_new_tokens: int = 48
    previous: list[str] = field(default_factory=list)  # best.jsonl files of earlier rounds
    keep: str = "all"  # "all" earlier rounds' samples too, or "latest" only this round's
    sweep_temperatures: list[float] = field(default_factory=lambda: [0.4, 0.7, 1.0, 1.3, 1.6,
                                                                    2.0, 2.5])
    sweep_prompts: int = 48
    safety_switch: bool = True
    seed: int = 0
    seq_len: int = 256
    train: TrainConfig = field(default_factory=sft_train_defaults)


def load_prompts(sources: list[str], world_seed: int, n: int, safety_share: float, offset: int,
                 borderline_share: float = 0.0, families: list[str] | None = None,
                 on_special_tags: OnSpecialTags = "error"):
    """World prompts (a fresh slice per round) or Prompt records from JSONL files (a record
    carrying a chat tag: an error naming file, line and field, or skipped and counted)."""
    from llama2.world import Prompt, World
    from llama2.world.adapters import DataError, SpecialTagFilter, _records

    prompts = []
    for src in sources:
        if src == "world":
            world = World(world_seed)
            n_safe, n_border = round(n * safety_share), round(n * borderline_share)
            n_help = n - n_safe - n_border
            prompts += world.helpful_prompts(n_help * (offset + 1), split="train",
                                             families=tuple(families or ()) or None)[n_help * offset:]
            prompts += world.safety_prompts(n_safe * (offset + 1), split="train")[n_safe * offset:]
            prompts += world.borderline_prompts(n_border * (offset + 1),
                                                split="train")[n_border * offset:]
        else:
            tags = SpecialTagFilter(src, on_special_tags)
            for lineno, r in _records(src):
                if isinstance(r, DataError):
                    raise r
                if "dialog" in r and "kind" in r:
                    p = Prompt.from_dict(r)
                else:  # a messages record ending with a user turn
                    msgs = r.get("messages") or r.get("dialog")
                    p = Prompt(id=f"file-{len(prompts)}", dialog=msgs,
                               kind="safety" if r.get("safety") else "helpful", family="file")
                if tags.keep(p.dialog, r, f"{src}:{lineno}"):
                    prompts.append(p)
            tags.summary()
    if not prompts:
        raise ValueError("no prompts for rejection sampling")
    return prompts


def sample_and_score(loaded, rewards: TwoRewardModels, prompts, k: int, temperature: float,
                     max_new_tokens: int, seed: int) -> tuple[list[list[str]], dict[str, torch.Tensor]]:
    """K responses per prompt and their rewards {"rc", "rs", "rh"}, each [n_prompts, K]."""
    flat = [p for p in prompts for _ in range(k)]
    texts = respond(loaded.model, loaded.tokenizer, [p.dialog for p in flat], max_new_tokens,
                    temperature=temperature, seed=seed)
    scores = rewards([p.dialog for p in flat], texts, [p.kind == "safety" for p in flat])
    return ([texts[i * k:(i + 1) * k] for i in range(len(prompts))],
            {name: v.view(len(prompts), k) for name, v in scores.items()})


def judged(prompts, kind: str):
    """The world's noise-free annotator and the indices of the world prompts of `kind` (prompts
    read from files carry no world metadata: the annotators cannot judge them)."""
    from llama2.world import Annotator

    return Annotator(0, noise=False), [i for i, p in enumerate(prompts)
                                       if p.kind == kind and p.meta.get("split")]


def switch_ablation(prompts, texts: list[list[str]], scores: dict[str, torch.Tensor]) -> dict:
    """The best-of-K picks on adversarial prompts with the piecewise reward and with the safety
    switch removed (Rc = Rh), judged by the world's annotators: what the switch buys."""
    ann, idx = judged(prompts, "safety")
    if not idx:
        return {}
    out = {}
    for name, key in (("with_switch", "rc"), ("without_switch", "rh")):
        best = scores[key].argmax(1)
        out[name] = sum(ann.is_violation(prompts[i], texts[i][int(best[i])]) for i in idx) / len(idx)
    out["n_safety_prompts"] = len(idx)
    return out


def selection_quality(prompts, texts: list[list[str]], rc: torch.Tensor) -> dict:
    """What the reward's best-of-K pick is worth to the world's annotators on helpful prompts:
    the helpfulness of the pick against the mean sample and the best sample (an oracle pick).
    A pick below the mean sample is the reward model being gamed by selection (Goodhart):
    fine-tuning on such targets makes the policy worse, not better."""
    ann, idx = judged(prompts, "helpful")
    if not idx:
        return {}
    scores = [[ann.helpfulness(prompts[i], t) for t in texts[i]] for i in idx]
    picks = [row[int(rc[i].argmax())] for i, row in zip(idx, scores)]
    return {"pick": statistics.fmean(picks),
            "mean_sample": statistics.fmean(statistics.fmean(row) for row in scores),
            "best_sample": statistics.fmean(max(row) for row in scores),
            "n_helpful_prompts": len(idx)}


def rescore(reward, prompts, texts: list[list[str]]) -> torch.Tensor:
    """Rc [n_prompts, K] of the samples under another reward (proxy or gold)."""
    flat = [p for p, row in zip(prompts, texts) for _ in row]
    rc = reward([p.dialog for p in flat], [t for row in texts for t in row],
                [p.kind == "safety" for p in flat])["rc"]
    return rc.view(len(prompts), -1)


def pick_curves(rank: torch.Tensor, signals: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """For k = 1..K, the mean over prompts of each signal [n, K] at the sample that `rank`
    picks among the first k: the proxy reward and the gold reward of best-of-k (Gao et al.
    2022); a proxy that rises while the gold falls is over-optimization."""
    ks = list(range(1, rank.shape[1] + 1))
    out: dict[str, list[float]] = {"k": ks}
    for name, values in signals.items():
        out[name] = [float(values.gather(1, rank[:, :k].argmax(1, keepdim=True)).mean())
                     for k in ks]
    return out


def max_vs_median(rc: torch.Tensor) -> dict[str, list[float]]:
    """Mean over prompts of the max and the median reward among the first k samples (Fig. 7)."""
    ks = list(range(1, rc.shape[1] + 1))
    mx = [float(rc[:, :k].max(1).values.mean()) for k in ks]
    md = [float(rc[:, :k].quantile(0.5, dim=1).mean()) for k in ks]  # true median (even k)
    return {"k": ks, "max": mx, "median": md}


def plot_curves(curves: dict, sweep: dict | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 2 if sweep else 1
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.5))
    axes = [axes] if n == 1 else axes
    axes[0].plot(curves["k"], curves["max"], "o-", label="max")
    axes[0].plot(curves["k"], curves["median"], "s-", label="median")
    axes[0].fill_between(curves["k"], curves["median"], curves["max"], alpha=0.2)
    axes[0].set(xlabel="samples per prompt K", ylabel="reward Rc", title="Max vs median (Fig. 7)")
    axes[0].legend()
    if sweep:
        for k, vals in sweep["max_by_k"].items():
            axes[1].plot(sweep["temperatures"], vals, "o-", label=f"max of {k}")
        axes[1].set(xlabel="temperature", ylabel="reward Rc", title="Reward vs temperature (Fig. 8)")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: RejectionSamplingConfig) -> dict:
    from llama2.world.adapters import load_messages_jsonl

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = load_policy(cfg.model, cfg.train.device)
    prompts = load_prompts(cfg.prompts, cfg.world_seed, cfg.n_prompts, cfg.safety_share, cfg.round,
                           cfg.borderline_share, cfg.families)
    rewards, proxy, gold = proxy_and_gold(cfg.reward, cfg.helpful_rm, cfg.safety_rm, prompts,
                                          safety_switch=cfg.safety_switch,
                                          policy=loaded.tokenizer)
    samples_path = out / "samples.jsonl"
    signals = {"proxy": proxy, **({"gold": gold} if gold is not None else {})}
    if samples_path.is_file():  # resume: sampling is the expensive part
        rows = read_jsonl(samples_path)
        texts = [r["samples"] for r in rows]
        scores = {k: torch.tensor([r[k] for r in rows]) for k in ("rc", "rs", "rh", *signals)
                  if k in rows[0]}
    else:
        texts, scores = sample_and_score(loaded, rewards, prompts, cfg.k, cfg.temperature,
                                         cfg.max_new_tokens, cfg.seed + 1000 * cfg.round)
    for name, reward in signals.items():
        if name not in scores:
            scores[name] = scores["rc"] if reward is rewards else rescore(reward, prompts, texts)
    if not samples_path.is_file():
        write_jsonl(samples_path, [{"prompt": p.to_dict(), "samples": t,
                                    **{k: v[i].tolist() for k, v in scores.items()}}
                                   for i, (p, t) in enumerate(zip(prompts, texts))])
    rc = scores["rc"]
    best = rc.argmax(1)
    best_dialogs = [p.with_answer(t[int(b)]) for p, t, b in zip(prompts, texts, best)]
    write_jsonl(out / "best.jsonl", [{"messages": d, "kind": p.kind}
                                     for d, p in zip(best_dialogs, prompts)])
    curves = max_vs_median(rc)
    sweep = None
    if cfg.sweep_temperatures and cfg.sweep_prompts:
        sub = prompts[: cfg.sweep_prompts]
        # max_by_prompt: each prompt's best of k at each temperature, for paired comparisons.
        sweep = {"temperatures": cfg.sweep_temperatures, "max_by_k": {}, "mean": [],
                 "max_by_prompt": []}
        by_k: dict[int, list[float]] = {k: [] for k in sorted({1, max(1, cfg.k // 2), cfg.k})}
        for i, t in enumerate(cfg.sweep_temperatures):
            _, r = sample_and_score(loaded, rewards, sub, cfg.k, t, cfg.max_new_tokens,
                                    cfg.seed + 17 * i)
            r = r["rc"]
            best = {k: r[:, :k].max(1).values for k in by_k}  # each prompt's best of k
            for k in by_k:
                by_k[k].append(float(best[k].mean()))
            sweep["mean"].append(float(r.mean()))
            sweep["max_by_prompt"].append(best[cfg.k].tolist())
        sweep["max_by_k"] = {str(k): v for k, v in by_k.items()}
    if distributed.is_main():
        plot_curves(curves, sweep, out / "curves.png")
    # Training set: this round's best, plus the earlier rounds' (keep = "all").
    train_dialogs = list(best_dialogs)
    earlier = cfg.previous if cfg.keep == "all" else []
    if cfg.keep not in ("all", "latest"):
        raise ValueError(f"keep must be 'all' or 'latest', got {cfg.keep!r}")
    for path in earlier:  # checked for chat tags as any dialog file
        train_dialogs += load_messages_jsonl(path, on_special_tags=cfg.on_special_tags)
    summary = {"prompts": len(prompts), "k": cfg.k, "temperature": cfg.temperature,
               "reward": cfg.reward,
               "mean_reward": float(rc.mean()), "mean_best_reward": float(rc.max(1).values.mean()),
               "median_reward": float(rc.median(1).values.mean()), "curves": curves,
               "proxy_vs_gold": pick_curves(rc, {k: scores[k] for k in signals}),
               "sweep": sweep, "train_dialogs": len(train_dialogs), "keep": cfg.keep,
               "switch_ablation": switch_ablation(prompts, texts, scores),
               "selection": selection_quality(prompts, texts, rc),
               "best_by_kind": {kind: statistics.fmean(float(rc[i].max()) for i, p in
                                                       enumerate(prompts) if p.kind == kind)
                                for kind in sorted({p.kind for p in prompts})}}
    atomic_write_text(out / "curves.json", json.dumps(summary, indent=2) + "\n")
    finetune(loaded.model, loaded.tokenizer, train_dialogs, out / "train", cfg.train, cfg.seq_len,
             config=cfg, extra={"stage": "rejection_sampling", "round": cfg.round})
    return summary


@dataclass
class ForgettingConfig(RejectionSamplingConfig):
    """A rejection-sampling round (`model`, the RMs, `round`, `previous`: the earlier rounds'
    best.jsonl) run without the prompts of one task `family`, trained twice on its samples."""

    family: str = "howto"  # the skill this round does not ask for again
    n_eval: int = 80  # held-out prompts per family


def forgetting_study(cfg: ForgettingConfig) -> dict:
    """Why the paper keeps every round's best samples (§3.2.3: RLHF-V3, fine-tuned on its own
    round's samples only, got worse at rhyming poems). One round of rejection sampling from
    `cfg.model` leaves out the prompts of `cfg.family`; its samples train two models, one with
    keep = "latest" (this round's best only) and one with keep = "all" (plus `cfg.previous`).
    The annotators score greedy answers to held-out prompts of every family for the starting
    policy and both models: a skill kept only in earlier rounds' samples is what "latest" forgets."""
    from llama2.world import Annotator, World
    from llama2.world.tasks import FAMILIES

    if cfg.family not in FAMILIES:
        raise ValueError(f"family {cfg.family!r}: expected one of {list(FAMILIES)}")
    out = Path(cfg.out)
    world, ann = World(cfg.world_seed), Annotator(0, noise=False)
    held_out = {f: world.helpful_prompts(cfg.n_eval, split="eval", families=(f,)) for f in FAMILIES}

    def skills(model: str) -> dict[str, float]:
        loaded = load_policy(model, cfg.train.device)
        out = {}
        for f, ps in held_out.items():
            answers = respond(loaded.model, loaded.tokenizer, [p.dialog for p in ps],
                              cfg.max_new_tokens, fit="skip")
            out[f] = statistics.fmean(ann.helpfulness(p, r) for p, r in zip(ps, answers))
        return out

    result = {"family": cfg.family, "round": cfg.round, "model": cfg.model,
              "helpfulness": {"before": skills(cfg.model)}, "train_dialogs": {}}
    for keep in ("latest", "all"):
        rc = copy.deepcopy(cfg)
        rc.out, rc.keep, rc.sweep_prompts = str(out / keep), keep, 0
        rc.families = [f for f in FAMILIES if f != cfg.family]
        # The same samples: only the training set differs (rank 0 copies, every rank reads).
        if keep == "all" and distributed.is_main():
            (out / keep).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / "latest" / "samples.jsonl", out / keep / "samples.jsonl")
        distributed.barrier(distributed.current())
        summary = run(rc)
        result["train_dialogs"][keep] = summary["train_dialogs"]
        result["helpfulness"][keep] = skills(str(out / keep / "train" / "model"))
    h = result["helpfulness"]
    result["forgotten"] = h["before"][cfg.family] - h["latest"][cfg.family]
    result["kept_by_all"] = h["all"][cfg.family] - h["latest"][cfg.family]
    atomic_write_text(out / "forgetting.json", json.dumps(result, indent=2) + "\n")
    return result


def main_rs_forgetting(argv: list[str]) -> None:
    cfg: ForgettingConfig = parse_stage(ForgettingConfig, argv, "rs-forgetting")
    result = forgetting_study(cfg)
    for name, row in result["helpfulness"].items():
        print(f"{name:7s} " + "  ".join(f"{f} {v:.3f}" for f, v in row.items()))
    print(f"{cfg.family}: {result['forgotten']:+.3f} forgotten with keep=latest, "
          f"{result['kept_by_all']:+.3f} kept by keep=all; {Path(cfg.out) / 'forgetting.json'}")


def main(argv: list[str]) -> None:
    cfg: RejectionSamplingConfig = parse_stage(RejectionSamplingConfig, argv, "rejection-sample")
    summary = run(cfg)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("curves", "sweep")}, indent=2))
    print(f"model written to {Path(cfg.out) / 'train' / 'model'}")
