"""Preference collection (recipe §3, paper §3.2.1), with the world's annotators as the humans.

For each prompt, two responses from different model variants and temperatures; the annotator
picks one and rates how much better it is (four levels). With `responses_per_prompt` K > 2,
every pair of the K responses is annotated (InstructGPT's K-wise ranking: C(K,2) comparisons
for K samples; our annotators are free, sampling is what costs); identical responses are not
compared; safety comparisons also carry the
three-bin safety label, and pairs where the chosen is unsafe and the other safe are dropped
(paper §3.2.1). Each call writes one versioned batch, `helpful_batch_K.jsonl` and
`safety_batch_K.jsonl`; the next iteration samples a new batch from the newer policy, so the
reward models stay on the policy's distribution.

    llama2 preferences --models runs/x/sft/model --out runs/x/preferences
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llama2.respond import respond
from llama2.stages.common import load_policy, parse_stage
from llama2.utils import atomic_write_text


@dataclass
class PreferencesConfig:
    # Model variants to sample from (e.g. the newest policy and an earlier one); each response
    # of a pair comes from a random (variant, temperature). "PATH#transcript" prompts a
    # pretrained model in its own User/Assistant transcript format.
    models: list[str] = field(default_factory=list)
    out: str = "runs/preferences"
    batch: int = -1  # batch number; -1: the next free one
    split: str = "train"  # "eval": held-out comparisons (eval-split prompts) to evaluate RMs
    world_seed: int = 0
    annotator_seed: int = 0
    n_helpful: int = 600
    n_safety: int = 300
    # Benign prompts with sensitive words, compared on helpfulness: a refusal there is the
    # false refusal the RMs must learn to rank low (paper §4.2, Figure 33).
    n_borderline: int = 0
    temperatures: list[float] = field(default_factory=lambda: [0.6, 1.0, 1.4])
    responses_per_prompt: int = 2  # K; all C(K, 2) pairs are annotated
    max_new_tokens: int = 48
    seed: int = 0
    device: str = "auto"


def next_batch_index(out: Path, prefix: str = "") -> int:
    done = [int(p.stem.rsplit("_", 1)[1]) for p in out.glob(f"{prefix}helpful_batch_*.jsonl")]
    return max(done, default=-1) + 1


def parse_variant(spec: str) -> tuple[str, str]:
    """"PATH" (chat format) or "PATH#transcript" (a pretrained model's own transcript format)."""
    path, _, fmt = spec.partition("#")
    fmt = fmt or "chat"
    if fmt not in ("chat", "transcript"):
        raise ValueError(f"model variant {spec!r}: unknown prompt format {fmt!r} "
                         "(expected #chat or #transcript)")
    return path, fmt


# Aspects each prompt kind is annotated on. Borderline prompts (benign, with sensitive words)
# get both: on safety their answers and their refusals tie, and the more helpful one wins.
ASPECTS: dict[str, tuple[str, ...]] = {"safety": ("safety",),
                                       "borderline": ("helpfulness", "safety")}

def collect(cfg: PreferencesConfig) -> dict:
    from llama2.world import Annotator, World
    from llama2.world.adapters import write_preferences_jsonl

    if not cfg.models:
        raise ValueError("no model to sample from (set --models PATH[,PATH...])")
    out = Path(cfg.out)
    prefix = "" if cfg.split == "train" else f"{cfg.split}_"
    k = cfg.batch if cfg.batch >= 0 else next_batch_index(out, prefix)
    world, annotator = World(cfg.world_seed), Annotator(cfg.annotator_seed + k)
    # Fresh prompts for every batch: batch k takes the k-th slice of the world's prompt stream.
    helpful = world.helpful_prompts(cfg.n_helpful * (k + 1), split=cfg.split)[cfg.n_helpful * k:]
    safety = world.safety_prompts(cfg.n_safety * (k + 1), split=cfg.split)[cfg.n_safety * k:]
    border = world.borderline_prompts(cfg.n_borderline * (k + 1), split=cfg.split)[cfg.n_borderline * k:] \
        if cfg.n_borderline else []
    prompts = helpful + safety + border
    rng = random.Random(f"preferences:{cfg.seed}:{cfg.split}:{k}")
    # Each prompt gets K (variant, temperature) draws, distinct while there are enough.
    variants = [(m, t) for m in range(len(cfg.models)) for t in cfg.temperatures]
    n_resp = cfg.responses_per_prompt
    if n_resp < 2:
        raise ValueError(f"responses_per_prompt must be at least 2, got {n_resp}")
    if len(variants) < 2:
        raise ValueError("need two model variants or temperatures to compare")

    def draw() -> list[tuple[int, float]]:
        picks = rng.sample(variants, min(n_resp, len(variants)))
        return picks + [rng.choice(variants) for _ in range(n_resp - len(picks))]

    picks = [draw() for _ in prompts]
    responses: list[list[str]] = [[""] * n_resp for _ in prompts]
    for m, spec in enumerate(cfg.models):
        path, fmt = parse_variant(spec)
        loaded = load_policy(path, cfg.device)
        jobs = [(i, s, t) for i, pair in enumerate(picks) for s, (mm, t) in enumerate(pair)
                if mm == m]
        # A response ends at its first chat tag (the model starting a new turn), so no sample
        # carries one into preference data.
        texts = respond(loaded.model, loaded.tokenizer, [prompts[i].dialog for i, _, _ in jobs],
                        cfg.max_new_tokens, format=fmt, temperature=[t for _, _, t in jobs],
                        seed=cfg.seed + 7919 * k)
        for (i, s, _), text in zip(jobs, texts):
            responses[i][s] = text
    pairs = {"helpful": [], "safety": []}
    stats: Counter = Counter()
    for p, texts in zip(prompts, responses):
        for a, b in itertools.combinations(texts, 2):
            if a == b:
                stats["dropped_identical"] += 1
                continue
            for aspect in ASPECTS.get(p.kind, ("helpfulness",)):
                comp = annotator.compare(p, a, b, aspect=aspect)
                if aspect == "safety" and comp.safety_bin == "chosen_unsafe_other_safe":
                    stats["dropped_chosen_unsafe"] += 1
                    continue
                pairs["helpful" if aspect == "helpfulness" else "safety"].append(comp.to_pair())
                stats[f"{aspect}:{comp.level}"] += 1
                if comp.safety_bin:
                    stats[f"bin:{comp.safety_bin}"] += 1
    for name, items in pairs.items():
        write_preferences_jsonl(out / f"{prefix}{name}_batch_{k}.jsonl", items)
    summary = {"batch": k, "models": cfg.models, "helpful_pairs": len(pairs["helpful"]),
               "safety_pairs": len(pairs["safety"]), "counts": dict(sorted(stats.items()))}
    atomic_write_text(out / f"{prefix}stats_batch_{k}.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str]) -> None:
    cfg: PreferencesConfig = parse_stage(PreferencesConfig, argv, "preferences")
    summary = collect(cfg)
    print(json.dumps(summary, indent=2))
