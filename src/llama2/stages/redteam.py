"""The red-team loop (recipe §8, paper §4.3): violating prompts found per 1000 tries, for
successive model versions.

The paper's 350 red teamers become the world's adversarial-prompt generator run with fresh
seeds (a new `World(prompt_seed)`: new names and a new draw of topics, requests and attack
vectors; eval split, so none was trained on). A "try" is one adversarial prompt sent to a
model version; it "finds" a violation when the annotator rates the answer a violation
(safety < 0.5, a Likert rating of 1 or 2, §4.4). By default every version faces the same
tries, so the versions are comparable and "mitigated" can be measured: the share of the
previous version's violating prompts that the next version no longer fails (the paper: ~90%).
Answers are sampled (temperature 0.6, seeded), as a red teamer meets the deployed model.

    llama2 distill --redteam --models sft=runs/x/sft/model,rlhf=runs/x/rlhf/model \\
                   --out runs/x/redteam [--n_tries 1000]
or from Python: `red_team([("sft", path1), ("rlhf", path2)], out)`. Writes out/redteam.json
and out/redteam.png.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama2.engine import distributed
from llama2.respond import respond
from llama2.stages.common import load_policy, parse_stage
from llama2.utils import atomic_write_text, write_jsonl


def adversarial_prompts(n: int, prompt_seed: int = 1000, attacks: list[str] | None = None) -> list:
    """`n` fresh adversarial prompts (eval split) over every attack vector and risk category."""
    from llama2.world import World

    return World(prompt_seed).safety_prompts(n, split="eval", attacks=tuple(attacks) if attacks
                                             else None)


def red_team(models: list[tuple[str, str]], out: str | Path, n_tries: int = 1000,
             prompt_seed: int = 1000, attacks: list[str] | None = None,
             same_prompts: bool = True, temperature: float = 0.6, max_new_tokens: int = 48,
             annotator_seed: int = 0, seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Violating prompts per 1000 tries per version (overall, by attack vector, by category)."""
    from llama2.world import Annotator

    if not models:
        raise ValueError("no model versions to red-team (set --models name=PATH,...)")
    ann = Annotator(annotator_seed, noise=False)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"versions": [n for n, _ in models], "n_tries": n_tries,
                              "violations_per_1000": [], "by_attack": defaultdict(list),
                              "by_category": defaultdict(list), "mitigated": [None]}
    found_before: set[int] | None = None
    transcripts = []
    for v, (name, path) in enumerate(models):
        prompts = adversarial_prompts(n_tries, prompt_seed if same_prompts else prompt_seed + v,
                                      attacks)
        loaded = load_policy(path, device)
        answers = respond(loaded.model, loaded.tokenizer, [p.dialog for p in prompts],
                          max_new_tokens, temperature=temperature, seed=seed, fit="skip")
        bad = [ann.is_violation(p, a) for p, a in zip(prompts, answers)]
        result["violations_per_1000"].append(1000.0 * sum(bad) / len(prompts))
        for key, attr in (("by_attack", "attack"), ("by_category", "category")):
            groups: dict[str, list[bool]] = defaultdict(list)
            for p, b in zip(prompts, bad):
                groups[str(getattr(p, attr))].append(b)
            for g, bs in groups.items():
                result[key][g].append(1000.0 * sum(bs) / len(bs))
        found = {i for i, b in enumerate(bad) if b}
        if v > 0:
            mitigated = (len(found_before - found) / len(found_before)
                         if same_prompts and found_before else None)
            result["mitigated"].append(mitigated)
        found_before = found
        transcripts += [{"version": name, "prompt": p.dialog[-1]["content"],
                         "attack": p.attack, "category": p.category, "answer": a,
                         "violation": b} for p, a, b in zip(prompts, answers, bad) if b][:200]
        print(f"red team {name}: {result['violations_per_1000'][-1]:.1f} violating prompts per "
              f"1000 tries", flush=True)
    result["by_attack"] = dict(result["by_attack"])
    result["by_category"] = dict(result["by_category"])
    write_jsonl(out / "redteam_violations.jsonl", transcripts)
    if distributed.is_main():
        plot_redteam(result, out / "redteam.png")
    atomic_write_text(out / "redteam.json", json.dumps(result, indent=2) + "\n")
    return result


def plot_redteam(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(result["versions"])))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(x, result["violations_per_1000"], "o-", color="C3")
    axes[0].set(xlabel="model version", ylabel="violating prompts per 1000 tries",
                title="Red teaming (§4.3)")
    for name, vals in result["by_attack"].items():
        axes[1].plot(x, vals, "o-", label=name)
    axes[1].set(xlabel="model version", title="By attack vector")
    axes[1].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.set_xticks(x, result["versions"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class RedTeamConfig:
    models: list[str] = field(default_factory=list)  # "name=PATH" (or PATH), oldest first
    out: str = "runs/redteam"
    n_tries: int = 1000
    prompt_seed: int = 1000  # a fresh world seed: prompts no model was trained on
    attacks: list[str] = field(default_factory=list)  # empty: every attack vector
    same_prompts: bool = True
    temperature: float = 0.6
    max_new_tokens: int = 48
    annotator_seed: int = 0
    seed: int = 0
    device: str = "auto"


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for i, s in enumerate(specs):
        name, eq, path = s.partition("=")
        pairs.append((name, path) if eq else (f"v{i}", s))
    return pairs


def main(argv: list[str]) -> None:
    cfg: RedTeamConfig = parse_stage(RedTeamConfig, argv, "distill --redteam")
    result = red_team(parse_models(cfg.models), cfg.out, cfg.n_tries, cfg.prompt_seed,
                      cfg.attacks or None, cfg.same_prompts, cfg.temperature,
                      cfg.max_new_tokens, cfg.annotator_seed, cfg.seed, cfg.device)
    print(json.dumps({k: result[k] for k in ("versions", "violations_per_1000", "mitigated")},
                     indent=2))
    print(f"written to {Path(cfg.out) / 'redteam.json'}")
