"""Calibration of the simulated annotators: do their scores mean what the paper's ratings mean?

For each prompt the table scores a ladder of responses of known quality (gold: the expert
writer's answer with its reason; the standard and terse writers' answers; verbose, bare,
truncated, corrupted, another prompt's answer, a refusal, nothing; for unsafe prompts the safe
demonstration, a bare refusal, an evasion, vague agreement and compliance), then compares
every pair of them. It reports mean scores, violation and false-refusal rates, the mean
gap per rating level (it must grow with the level) and the measured label-noise rate per
level beside the documented NOISE_RATE.
"""

from __future__ import annotations

import itertools
import random
from collections import defaultdict
from typing import Any

from llama2.world.annotator import NOISE_RATE, RATING_LEVELS, Annotator
from llama2.world.records import Prompt
from llama2.world.tasks import corrupt_answer, explained_answer, terse_answer
from llama2.world.world import World

REFUSAL = "I'm sorry, but I can't help with that."
VERBOSE_TAIL = " I hope this answer helps you, and please ask me again if you want to know more."


def response_ladder(prompt: Prompt, other: Prompt, rng: random.Random) -> dict[str, str]:
    """Responses of known quality for one prompt (`other` gives an unrelated answer)."""
    gold = prompt.answer or ""
    if prompt.kind == "safety":
        topic_refusal = gold.split(".")[0] + "."
        return {"safe_answer": gold, "bare_refusal": topic_refusal,
                "evasive": other.answer or "", "vague_yes": "Sure, first think about it, then "
                "just do it.", "compliance": prompt.meta["unsafe_answer"], "empty": ""}
    words = gold.split()
    return {
        "gold": explained_answer(gold, prompt.meta),  # the best writer's answer
        "standard": gold,
        "terse": terse_answer(gold, prompt.meta),
        "verbose": gold + VERBOSE_TAIL + VERBOSE_TAIL,
        "bare": gold.rstrip(".").split()[-1].strip("'"),
        "truncated": " ".join(words[: max(1, len(words) // 2)]),
        "corrupted": corrupt_answer(gold, prompt.meta, rng),
        "random": other.answer or "",
        "refusal": REFUSAL,
        "empty": "",
    }


def calibration(seed: int = 0, n: int = 150) -> dict[str, Any]:
    world, ann = World(seed), Annotator(seed)
    rng = random.Random(f"calibrate:{seed}")
    groups: dict[str, list[Prompt]] = defaultdict(list)
    for p in world.helpful_prompts(n, "eval"):
        groups[p.family].append(p)
    groups["borderline"] = world.borderline_prompts(max(20, n // 5), "eval")
    safety = world.safety_prompts(n, "eval")
    groups["safety"] = safety
    pool = world.helpful_prompts(n, "train")
    # an evasive answer to an unsafe prompt is an off-topic one: not a how-to's steps, which
    # read as compliance ("first ... then ...") and are judged a violation
    off_topic = [q for q in pool if q.family != "howto"]

    help_scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    safe_scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    violations: dict[str, list[bool]] = defaultdict(list)
    refusals: dict[str, list[bool]] = defaultdict(list)
    per_cat: dict[str, list[bool]] = defaultdict(list)
    per_attack: dict[str, list[bool]] = defaultdict(list)
    level_gaps: dict[str, list[float]] = defaultdict(list)
    level_flips: dict[str, list[bool]] = defaultdict(list)
    bins: dict[str, int] = defaultdict(int)
    for fam, prompts in groups.items():
        for p in prompts:
            ladder = response_ladder(p, rng.choice(off_topic if p.kind == "safety" else pool), rng)
            for name, resp in ladder.items():
                help_scores[fam][name].append(ann.helpfulness(p, resp))
                safe_scores[fam][name].append(ann.safety(p, resp))
                violations[name].append(ann.is_violation(p, resp))
                if p.kind == "borderline":
                    refusals[name].append(ann.is_refusal(resp))
                if p.kind == "safety" and name == "compliance":
                    per_cat[p.category or "?"].append(ann.is_violation(p, resp))
                    per_attack[p.attack or "?"].append(ann.is_violation(p, resp))
            aspect = "safety" if p.kind == "safety" else "helpfulness"
            for a, b in itertools.combinations(ladder.values(), 2):
                for asp in {aspect, "helpfulness"}:
                    c = ann.compare(p, a, b, asp)
                    level_gaps[c.level].append(c.gap)
                    if c.gap > 1e-9:
                        level_flips[c.level].append(c.flipped)
                    if c.safety_bin:
                        bins[c.safety_bin] += 1

    def mean(xs: list[float] | list[bool]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "seed": seed,
        "helpfulness": {f: {k: mean(v) for k, v in d.items()} for f, d in help_scores.items()},
        "safety": {f: {k: mean(v) for k, v in d.items()} for f, d in safe_scores.items()},
        "violation_rate": {k: mean(v) for k, v in violations.items()},
        "compliance_violation_by_category": {k: mean(v) for k, v in sorted(per_cat.items())},
        "compliance_violation_by_attack": {k: mean(v) for k, v in sorted(per_attack.items())},
        "false_refusal_rate": {k: mean(v) for k, v in refusals.items()},
        "levels": {lv: {"n": len(level_gaps[lv]), "mean_gap": mean(level_gaps[lv]),
                        "noise_measured": mean(level_flips[lv]),
                        "noise_documented": NOISE_RATE[lv], "n_untied": len(level_flips[lv])}
                   for lv in RATING_LEVELS},
        "safety_bins": dict(bins),
    }


def format_table(cal: dict[str, Any]) -> str:
    lines = [f"# World calibration (seed {cal['seed']})", "",
             "## Mean helpfulness by response type (rows: prompt family)"]
    cols = ["gold", "standard", "terse", "verbose", "bare", "truncated", "corrupted", "random",
            "refusal", "empty"]
    scols = ["safe_answer", "bare_refusal", "evasive", "vague_yes", "compliance", "empty"]
    head = f"{'family':<12}" + "".join(f"{c:>11}" for c in cols)
    lines += [head]
    for fam, d in cal["helpfulness"].items():
        if fam == "safety":
            continue
        lines.append(f"{fam:<12}" + "".join(f"{d.get(c, float('nan')):>11.2f}" for c in cols))
    lines += ["", "## Unsafe prompts: mean helpfulness / safety / violation rate",
              f"{'response':<14}{'help':>8}{'safety':>8}{'viol%':>8}"]
    for c in scols:
        lines.append(f"{c:<14}{cal['helpfulness']['safety'][c]:>8.2f}"
                     f"{cal['safety']['safety'][c]:>8.2f}"
                     f"{100 * cal['violation_rate'].get(c, 0):>8.1f}")
    lines += ["", "compliance judged a violation, by risk category: " + ", ".join(
        f"{k} {100 * v:.0f}%" for k, v in cal["compliance_violation_by_category"].items()),
        "compliance judged a violation, by attack: " + ", ".join(
        f"{k} {100 * v:.0f}%" for k, v in cal["compliance_violation_by_attack"].items()),
        "benign gold answers judged a violation: "
        f"{100 * cal['violation_rate']['gold']:.1f}%",
        "borderline false-refusal rate: " + ", ".join(
        f"{k} {100 * v:.0f}%" for k, v in cal["false_refusal_rate"].items()),
        "", "## Rating levels: mean true gap and label noise",
        f"{'level':<22}{'n':>7}{'mean gap':>10}{'noise':>8}{'documented':>12}"]
    for lv, d in cal["levels"].items():
        lines.append(f"{lv:<22}{d['n']:>7}{d['mean_gap']:>10.3f}"
                     f"{100 * d['noise_measured']:>7.1f}%{100 * d['noise_documented']:>11.1f}%")
    total = sum(cal["safety_bins"].values()) or 1
    lines += ["", "safety bins of safety comparisons: " + ", ".join(
        f"{k} {100 * v / total:.0f}%" for k, v in sorted(cal["safety_bins"].items()))]
    return "\n".join(lines)
