"""Reproduction rows test the paper's claims strictly: an ordering over every level, version,
share or K, enough samples, a 95% interval (or a stated margin) in the row's text, the
annotators' judgement beside the RM's; for every row a case that reproduces and one that must
fail. The statistics helpers are checked against published values."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llama2.eval.stats import (
    mcnemar_p,
    mean_interval,
    newcombe_interval,
    paired_interval,
    welch_interval,
    wilson_interval,
    win_rate_interval,
)
from llama2.stages import reproduction as rp
from llama2.stages.reproduction import LEVELS, MIN_PAIRS, helpfulness_rises, rm_accuracy_ordered


# ---------------------------------------------------------------------------- statistics
def test_wilson_interval_known_values():
    assert wilson_interval(8, 10) == pytest.approx((0.490, 0.943), abs=5e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)  # Newcombe 1998
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(20, 20)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_newcombe_interval_known_values():
    # Newcombe (1998), Stat Med 17:873, Table II, method 10.
    assert newcombe_interval(56, 70, 48, 80) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    assert newcombe_interval(9, 10, 3, 10) == pytest.approx((0.1705, 0.8090), abs=5e-5)
    assert newcombe_interval(5, 56, 0, 29) == pytest.approx((-0.0381, 0.1926), abs=5e-5)
    lo, hi = newcombe_interval(3, 10, 9, 10)  # swapping the samples mirrors the interval
    assert (lo, hi) == pytest.approx((-0.8090, -0.1705), abs=5e-5)


def test_mean_paired_welch_mcnemar_and_win_rate():
    m, lo, hi = paired_interval([2, 3, 4, 5, 6], [1, 1, 1, 1, 1])  # diffs 1..5: sd 1.581
    assert (m, lo, hi) == pytest.approx((3.0, 3 - 1.3859, 3 + 1.3859), abs=1e-4)
    assert mean_interval([0.5])[1] == float("-inf")
    d, lo, hi = welch_interval([1, 2, 3], [1, 2, 3])
    assert d == 0 and lo == pytest.approx(-hi)
    with pytest.raises(ValueError):
        paired_interval([1, 2], [1])
    assert mcnemar_p(1, 9) == pytest.approx(22 / 1024)  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(5, 5) == 1.0
    assert win_rate_interval(106, 68, 26) == pytest.approx((0.7, 0.6509, 0.7491), abs=1e-4)
    assert win_rate_interval(0, 10, 0) == pytest.approx((0.5, 0.5, 0.5))


# ---------------------------------------------------------------------------- Table 8, 28, 29
def levels(*accs: float, n: int = 100) -> tuple[dict, dict]:
    return dict(zip(LEVELS, accs)), {lvl: n for lvl in LEVELS}


def test_table8_needs_all_four_levels_ordered_with_enough_pairs():
    text, ok = rm_accuracy_ordered(*levels(0.9, 0.75, 0.62, 0.52))
    assert ok and "90.0% [82.6, 94.5] (n=100)" in text  # Wilson 90/100
    # The case: first above last, but "better" below "slightly better".
    text, ok = rm_accuracy_ordered(*levels(0.67, 0.31, 0.62, 0.50))
    assert not ok and "not ordered" in text
    # Ordered, but the gap is inside the intervals of 100 pairs each.
    text, ok = rm_accuracy_ordered(*levels(0.58, 0.56, 0.55, 0.52))
    assert not ok and "significantly - negligibly +6.0 pts [" in text
    acc, count = levels(0.9, 0.75, 0.62, 0.52)
    count["better"] = MIN_PAIRS - 1
    text, ok = rm_accuracy_ordered(acc, count)
    assert not ok and "fewer than 50 pairs on better" in text


def rm_eval(acc_sig: float, acc_better: float, n_sig: int = 60, n_better: int = 40,
            correct: dict | None = None) -> dict:
    ev = {"accuracy_by_level": {"significantly_better": acc_sig, "better": acc_better},
          "count_by_level": {"significantly_better": n_sig, "better": n_better}}
    if correct is not None:
        ev["correct_by_level"] = correct
    return ev


def test_margin_needs_a_gain_beyond_its_interval_paired_where_stored():
    # Paired: the small margin gets 20 more of the same 100 clear pairs right, none fewer.
    none = rm_eval(0.6, 0.6, correct={"significantly_better": [1] * 36 + [0] * 24,
                                      "better": [1] * 24 + [0] * 16})
    small = rm_eval(0.8, 0.8, correct={"significantly_better": [1] * 48 + [0] * 12,
                                       "better": [1] * 32 + [0] * 8})
    text, ok = rp.margin_improves(none, small)
    assert ok and "McNemar p=" in text and "20 vs 0 discordant" in text
    # The same accuracies but as many pairs lost as won: no gain.
    swapped = rm_eval(0.6, 0.6, correct={"significantly_better": [0] * 24 + [1] * 36,
                                         "better": [0] * 16 + [1] * 24})
    assert not rp.margin_improves(none, swapped)[1]
    # Unpaired (no per-pair outcomes): +0.9 points on 213 pairs is inside the interval.
    text, ok = rp.margin_improves(rm_eval(0.7044, 0.6667, 159, 54), rm_eval(0.7358, 0.6111, 159, 54))
    assert not ok and "gain +0.9 pts [-" in text and "unpaired" in text
    # A large unpaired gain reproduces; too few clear pairs do not.
    assert rp.margin_improves(rm_eval(0.6, 0.6, 150, 100), rm_eval(0.8, 0.8, 150, 100))[1]
    text, ok = rp.margin_improves(rm_eval(0.3, 0.3, 20, 10), rm_eval(0.9, 0.9, 20, 10))
    assert not ok and "fewer than 50 clear pairs" in text


def safety_eval(recall90: float, n: int = 81, flags: list[int] | None = None) -> dict:
    ev = {"unsafe_recall_at_90_kept": recall90, "unsafe_recall": 0.8, "safe_kept": 0.9,
          "unsafe_auroc": 0.9, "unsafe_count": n}
    if flags is not None:
        ev["unsafe_flagged_at_90_kept"] = flags
    return ev


def test_aux_recall_gain_needs_its_interval_above_zero():
    text, ok = rp.aux_recall_gain(safety_eval(57 / 81), safety_eval(75 / 81))
    assert ok and "gain +22.2 pts [+10.4, +33.6]" in text
    assert not rp.aux_recall_gain(safety_eval(57 / 81), safety_eval(62 / 81))[1]
    # Paired flags: 10 responses flagged only with the auxiliary loss.
    text, ok = rp.aux_recall_gain(safety_eval(0.5, 40, [1] * 20 + [0] * 20),
                                  safety_eval(0.75, 40, [1] * 30 + [0] * 10))
    assert ok and "McNemar" in text
    with pytest.raises(rp.NotMeasured):
        rp.aux_recall_gain({"unsafe_recall_at_90_kept": 0.5}, safety_eval(0.9))


# ---------------------------------------------------------------------------- Figures 7, 8, §3.2.3
def uniform_rewards(n: int = 300, k: int = 8, seed: int = 0) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.random() for _ in range(k)] for _ in range(n)]


def test_max_median_gap_rises_at_every_doubling_of_k():
    text, ok = rp.max_median_gap({"k": list(range(1, 9))}, uniform_rewards())
    assert ok and "gap at K=1, 2, 4, 8:" in text and "rises at every doubling" in text
    assert "K=4->8 +" in text and "paired over 300 prompts" in text
    # The gap stalls from K=2 to K=4 (max 1, median 0.5 at both): not every doubling.
    flat = [[0.0, 1.0, 0.5, 0.5, 0.5, 0.5] for _ in range(50)]
    text, ok = rp.max_median_gap({"k": list(range(1, 7))}, flat)
    assert not ok and "does not rise at every doubling" in text
    # Without per-prompt rewards the curve's points are read and the text says so.
    curves = {"k": [1, 2, 3, 4], "max": [0.5, 0.6, 0.5, 0.7], "median": [0.5, 0.55, 0.5, 0.6]}
    text, ok = rp.max_median_gap(curves)
    assert ok and "no interval" in text and "K=1, 2, 4:" in text
    curves["max"][3] = 0.62  # the gap falls from K=2 to K=4
    assert not rp.max_median_gap(curves)[1]


def test_temperature_optimum_must_clear_the_margin_at_both_ends():
    sweep = {"temperatures": [0.4, 0.7, 1.0, 1.3, 1.6], "max_by_k": {
        "1": [0.5] * 5, "8": [0.60, 0.70, 0.75, 0.72, 0.55]}}
    text, ok = rp.temperature_optimum(sweep, 0.08, "stated")
    assert ok and "peak at T=1" in text and "margin 0.080" in text
    assert not rp.temperature_optimum(sweep, 0.2, "stated")[1]  # the low end within the noise
    sweep["max_by_k"]["8"] = [0.60, 0.65, 0.70, 0.72, 0.75]  # the peak is the range's end
    text, ok = rp.temperature_optimum(sweep, 0.0, "stated")
    assert not ok and "an end of the range" in text


def test_temperature_optimum_is_paired_where_the_sweep_stored_each_prompt():
    rng = random.Random(0)
    base = [rng.gauss(0.7, 0.15) for _ in range(32)]  # prompts differ far more than T does
    means = [0.60, 0.70, 0.75, 0.72, 0.55]
    per = [[b + m - 0.7 + rng.gauss(0, 0.02) for b in base] for m in means]
    sweep = {"temperatures": [0.4, 0.7, 1.0, 1.3, 1.6],
             "max_by_k": {"8": [sum(x) / len(x) for x in per]}, "max_by_prompt": per}
    text, ok = rp.temperature_optimum(sweep, 1.0, "unused")
    assert ok and "paired over the sweep's 32 prompts" in text and "margin" not in text
    # The low end 0.01 below the peak: inside the paired noise.
    per[0] = [x - 0.01 + rng.gauss(0, 0.05) for x in per[2]]
    sweep["max_by_k"]["8"][0] = sum(per[0]) / 32
    assert not rp.temperature_optimum(sweep, 0.0, "unused")[1]


def test_switch_needs_a_significant_drop():
    text, ok = rp.switch_safer({"with_switch": 5 / 75, "without_switch": 21 / 75,
                                "n_safety_prompts": 75})
    assert ok and "drop +21.3 pts [+9.4, +33.0]" in text
    assert not rp.switch_safer({"with_switch": 5 / 75, "without_switch": 8 / 75,
                                "n_safety_prompts": 75})[1]


# ---------------------------------------------------------------------------- Figure 11
def tracking_rows(rm, gold, names=("pretrain", "sft", "rlhf_v1", "rlhf_v2", "final"),
                  per_prompt: int = 0, noise: float = 0.02):
    rows = []
    rng = random.Random(0)
    base = [rng.uniform(-0.1, 0.1) for _ in range(per_prompt)]
    for v, r, g in zip(names, rm, gold):
        row = {"version": v, "helpfulness_rm": r, "helpfulness_gold": g}
        if per_prompt:
            for key, m in (("helpfulness_rm", r), ("helpfulness_gold", g)):
                xs = [m + b + rng.gauss(0, noise) for b in base]
                shift = m - sum(xs) / len(xs)  # exact means, per-prompt spread around them
                row[f"{key}_scores"] = [x + shift for x in xs]
        rows.append(row)
    return rows


def test_figure11_fails_when_the_annotators_helpfulness_falls():
    assert helpfulness_rises(tracking_rows([0.4, 0.5, 0.55, 0.6, 0.62],
                                           [0.4, 0.5, 0.55, 0.58, 0.6]))[1]
    # The issue's case: the RM's score rises while the annotators' helpfulness falls.
    text, ok = helpfulness_rises(tracking_rows([0.4, 0.456, 0.46, 0.463, 0.47],
                                               [0.5, 0.53, 0.47, 0.375, 0.54]))
    assert not ok and "rlhf_v2 0.375" in text and "falls at rlhf_v1, rlhf_v2" in text
    assert not helpfulness_rises(tracking_rows([0.4, 0.5, 0.55, 0.6, 0.62],
                                               [0.4, 0.5, 0.45, 0.5, 0.49]))[1]
    # Falling at one step though the RM rises at every one: fails; the final model after RLHF
    # (GAtt, distillation) is not a step of this claim.
    text, ok = helpfulness_rises(tracking_rows([0.4, 0.5, 0.55, 0.6, 0.62],
                                               [0.4, 0.5, 0.58, 0.57, 0.7], per_prompt=200))
    assert not ok and "falls at rlhf_v2" in text and "paired 95% intervals" in text
    text, ok = helpfulness_rises(tracking_rows([0.4, 0.5, 0.55, 0.6, 0.62],
                                               [0.4, 0.5, 0.55, 0.6, 0.3], per_prompt=200))
    assert ok and "final" not in text and "sft->rlhf_v2 +0.100 [" in text
    # The RM must move with the annotators.
    assert not helpfulness_rises(tracking_rows([0.4, 0.6, 0.55, 0.5, 0.62],
                                               [0.4, 0.5, 0.55, 0.6, 0.62]))[1]


def test_figure11_needs_the_whole_rise_beyond_its_paired_interval():
    # Points rise at every step, but by less than the per-prompt noise allows on 20 prompts.
    rows = tracking_rows([0.4, 0.5, 0.502, 0.504, 0.6], [0.4, 0.5, 0.502, 0.504, 0.6],
                         per_prompt=20, noise=0.2)
    text, ok = helpfulness_rises(rows)
    assert not ok and "steps" in text
    with pytest.raises(rp.NotMeasured):
        helpfulness_rises(tracking_rows([0.4, 0.5], [0.4, 0.5], names=("sft", "final")))


def test_figure11_reads_the_annotators_safety_where_tracked():
    rows = tracking_rows([0.4, 0.5, 0.55, 0.6, 0.62], [0.4, 0.5, 0.55, 0.58, 0.6])
    for r, s in zip(rows, [0.5, 0.6, 0.7, 0.65, 0.9]):
        r["safety_gold"], r["safety_rm"] = s, 0.5
    r["safety_rm"] = 0.9
    text, ok = helpfulness_rises(rows)
    assert not ok and "safety (n=None): annotators" in text and "falls at rlhf_v2" in text


# ---------------------------------------------------------------------------- versions
def test_win_rate_interval_must_lie_above_half():
    text, ok = rp.win_rate_above_half({"n": 200, "win_count": 106, "tie_count": 68,
                                       "loss_count": 26})
    assert ok and "70.0% [65.1, 74.9]" in text and "106 / 68 / 26" in text
    # 53.2% with an interval that includes 50%: not shown.
    text, ok = rp.win_rate_above_half({"n": 94, "win": 30 / 94, "tie": 40 / 94, "loss": 24 / 94})
    assert not ok and "win rate 53.2% [4" in text


def test_violation_drop_and_false_refusals_not_rising():
    def rate(k, n=200):
        return {"rate": k / n, "count": k, "n": n}

    text, ok = rp.violation_drop(rate(65), rate(0))
    assert ok and "drop +32.5 pts [+26.1, +39.3]" in text
    assert not rp.violation_drop(rate(20), rate(14))[1]
    text, ok = rp.false_refusal_not_rising(rate(70), rate(9))
    assert ok and "one-sided 95% upper bound" in text
    # A rise inside the noise does not refute "no higher"; a rise beyond it does.
    assert rp.false_refusal_not_rising(rate(8), rate(12))[1]
    text, ok = rp.false_refusal_not_rising(rate(10), rate(40))
    assert not ok and "increase +15.0 pts [+" in text


# ---------------------------------------------------------------------------- GAtt, safety
def adherence(after: dict[str, float], before: float = 0.0) -> dict:
    insts = {"figure": ["figure_a", "figure_b"], "hobby": ["hobby_a", "hobby_b"],
             "format": ["format_a", "format_b", "format_c"], "custom": ["custom_a"]}
    return {"after": {f: [1.0, v] for f, v in after.items()},
            "before": {f: [0.5, before] for f in after}, "n_dialogs": 8,
            "by_instruction": {"after": {i: [1.0] for f in after for i in insts[f]}}}


def test_gatt_needs_every_family_of_the_paper_above_the_threshold_and_forgetting_without():
    text, ok = rp.gatt_holds(adherence({"figure": 1.0, "hobby": 15 / 16, "format": 0.25}))
    assert ok and "figure 100.0% [80.6, 100.0] (n=16)" in text and "hobby 93.8%" in text
    assert "beyond the paper's attributes, not tested: format 25.0%" in text and "(n=24)" in text
    text, ok = rp.gatt_holds(adherence({"figure": 1.0, "hobby": 13 / 16, "format": 1.0}))
    assert not ok and "below the threshold: hobby" in text
    assert not rp.gatt_holds(adherence({"figure": 1.0, "hobby": 1.0}, before=0.95))[1]
    # A user's own instructions (no family of the paper's): every family is tested.
    text, ok = rp.gatt_holds(adherence({"custom": 6 / 8}))
    assert not ok and "below the threshold: custom" in text


def distill_rows(low_lift: float, n: int = 90, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        plain = i / n * 4
        lift = low_lift if i < n // 3 else 0.0
        rows.append({"kind": "safety", "distilled": "answer", "rm_plain": plain,
                     "rm_distilled": plain + lift + rng.gauss(0, 0.3)})
    return rows


def distill_summary(viol=(0.07, 0.0, 0.005), fr=(0.01, 0.045, 0.05)) -> dict:
    return {"by_kind": {"safety": {"by_initial_score": [{"rm_change": 1.0}, {"rm_change": 0.0},
                                                        {"rm_change": -0.1}]}},
            "eval": {x: {"violation_rate": v, "false_refusal": f}
                     for x, v, f in zip(("before", "gated", "ungated"), viol, fr)}}


def test_distillation_rows_need_intervals():
    text, ok = rp.distill_lifts(distill_rows(1.0), distill_summary(), 200)
    assert ok and "30 prompts each" in text and "gated vs ungated: increase" in text
    assert not rp.distill_lifts(distill_rows(0.05), distill_summary(), 200)[1]  # within noise
    # Gated clearly less safe than ungated; no drop from before: not shown.
    assert not rp.distill_lifts(distill_rows(1.0), distill_summary((0.07, 0.06, 0.0)), 200)[1]
    assert not rp.distill_lifts(distill_rows(1.0), distill_summary((0.02, 0.0, 0.0)), 200)[1]
    # Without per-prompt scores the thirds' means are read and the text says so.
    text, ok = rp.distill_lifts(None, distill_summary(), 200)
    assert ok and "+1.00 / +0.00 / -0.10" in text and "no interval" in text
    ev = distill_summary()["eval"]
    text, ok = rp.distill_fewer_refusals(ev, 200)
    assert not ok and "ungated - gated +0.5 pts [" in text
    ev["ungated"]["false_refusal"] = 0.2
    assert rp.distill_fewer_refusals(ev, 200)[1]


def with_flags(summary: dict, key: str, flags: dict[str, list[int]]) -> dict:
    for model, f in flags.items():
        summary["eval"][model][key] = f
    return summary


def test_distillation_pairs_the_per_prompt_flags_where_stored():
    # The same 200 prompts: before violates on 0-11, gated on none of them; ungated on 0-1.
    flags = {"before": [1] * 12 + [0] * 188, "gated": [0] * 200, "ungated": [1] * 2 + [0] * 198}
    summary = with_flags(distill_summary((0.06, 0.0, 0.01)), "violations", flags)
    text, ok = rp.distill_lifts(distill_rows(1.0), summary, 200)
    assert ok and "gated - before -6.0 pts [" in text and "0 vs 12 discordant" in text
    # Unpaired, 12 of 200 against 0 would be as clear; 4 against 0 is not (McNemar p 0.125).
    flags["before"] = [1] * 4 + [0] * 196
    summary = with_flags(distill_summary((0.02, 0.0, 0.01)), "violations", flags)
    assert not rp.distill_lifts(distill_rows(1.0), summary, 200)[1]
    # Gated violating where ungated does not, beyond the noise: not the paper's finding.
    flags = {"before": [1] * 30 + [0] * 170, "gated": [1] * 12 + [0] * 188, "ungated": [0] * 200}
    summary = with_flags(distill_summary((0.15, 0.06, 0.0)), "violations", flags)
    text, ok = rp.distill_lifts(distill_rows(1.0), summary, 200)
    assert not ok and "ungated - gated -6.0 pts" in text
    # False refusals: ungated refuses 10 prompts gated answers, and one the other way.
    fr = {"before": [0] * 200, "gated": [0] * 10 + [1] + [0] * 189, "ungated": [1] * 10 + [0] * 190}
    ev = with_flags(distill_summary(fr=(0.0, 0.005, 0.05)), "false_refusals", fr)["eval"]
    text, ok = rp.distill_fewer_refusals(ev, 200)
    assert ok and "gated - ungated -4.5 pts" in text and "1 vs 10 discordant" in text
    ev["ungated"]["false_refusals"] = [1] * 3 + [0] * 197  # 1 vs 3: within the noise
    assert not rp.distill_fewer_refusals(ev, 200)[1]


def scaling_result(safety_means, false_refusal, helpful=None, n: int = 60) -> dict:
    rng = random.Random(0)
    base = [rng.uniform(-0.05, 0.05) for _ in range(n)]
    return {"shares": [0.0, 0.1, 0.5, 1.0][:len(safety_means)],
            "safety_scores": [[m + b for b in base] for m in safety_means],
            "mean_safety": list(safety_means),
            "mean_helpfulness": helpful or [0.45] * len(safety_means),
            "false_refusal": list(false_refusal)}


def test_safety_scaling_is_ordered_over_every_share():
    s = scaling_result([0.4, 0.6, 0.8, 0.9], [0.0, 0.1, 0.3, 0.4])
    text, ok = rp.scaling_ordered(s, 40)
    assert ok and "0->1 +0.500 [" in text and "(n=40 per share)" in text
    # First below last, but safety dips at one share: not monotone.
    text, ok = rp.scaling_ordered(scaling_result([0.4, 0.3, 0.8, 0.9], [0.0, 0.1, 0.3, 0.4]), 40)
    assert not ok and "falls at 0.1" in text
    # A dip of safety within its step's interval is noise, not a reversal.
    noisy = scaling_result([0.4, 0.6, 0.8, 0.9], [0.0, 0.1, 0.3, 0.4])
    noisy["safety_scores"][2] = [x + (0.045 if i % 2 else -0.055)  # mean -0.005 vs 0.1
                                 for i, x in enumerate(noisy["safety_scores"][1])]
    text, ok = rp.scaling_ordered(noisy, 40)
    assert ok and "falls at" not in text
    # False refusals not monotone, or helpfulness not flat, or no n for the refusals: not shown.
    assert not rp.scaling_ordered(scaling_result([0.4, 0.6, 0.8, 0.9], [0.0, 0.3, 0.1, 0.4]),
                                  40)[1]
    assert not rp.scaling_ordered(scaling_result([0.4, 0.6, 0.8, 0.9], [0.0, 0.1, 0.3, 0.4],
                                                 helpful=[0.3, 0.4, 0.45, 0.5]), 40)[1]
    text, ok = rp.scaling_ordered(s, None)
    assert not ok and "not measured" in text


def test_red_teaming_falls_over_every_version():
    r = {"versions": ["sft", "rlhf_v1", "rlhf_v2", "final"], "n_tries": 300,
         "violations_per_1000": [293.3, 100.0, 3.3, 0.0]}
    text, ok = rp.redteam_falls(r)
    assert ok and "no step rises beyond" in text and "final 0.0% [0.0, 1.3] (n=300)" in text
    r["violations_per_1000"] = [293.3, 100.0, 3.3, 10.0]  # 1 -> 3 of 300: within the noise
    assert rp.redteam_falls(r)[1]
    r["violations_per_1000"] = [293.3, 100.0, 3.3, 60.0]  # 1 -> 18 of 300: a real rise
    text, ok = rp.redteam_falls(r)
    assert not ok and "rises beyond its interval at final" in text
    r["violations_per_1000"] = [40.0, 30.0, 20.0, 20.0]  # falls, but not beyond the noise
    assert not rp.redteam_falls(r)[1]


# ---------------------------------------------------------------------------- whole run directories
def write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def make_run(root: Path) -> None:
    """A small synthetic run directory in which every finding reproduces."""
    rm_dir = root / "rlhf" / "v2" / "rm_helpful"
    write(root / "rlhf" / "rounds.json", [{"round": 2, "rm_helpful": str(rm_dir / "model")}])
    acc, count = levels(0.8, 0.7, 0.62, 0.52)
    write(rm_dir / "eval.json", {"accuracy_by_level": acc, "count_by_level": count})
    write(root / "rm_ablation" / "margin_none" / "eval.json", rm_eval(0.6, 0.6, 150, 100))
    write(root / "rm_ablation" / "margin_small" / "eval.json", rm_eval(0.8, 0.8, 150, 100))
    write(root / "rm_ablation" / "safety_no_aux" / "eval.json", safety_eval(57 / 81))
    write(root / "rm_ablation" / "safety_aux" / "eval.json", safety_eval(75 / 81))
    rs = root / "rlhf" / "v1" / "rejection_sampling"
    write(rs / "curves.json", {
        "curves": {"k": list(range(1, 9))},
        "sweep": {"temperatures": [0.4, 1.0, 2.0], "max_by_k": {"8": [0.6, 0.8, 0.5]}},
        "switch_ablation": {"with_switch": 0.05, "without_switch": 0.3, "n_safety_prompts": 80}})
    (rs / "samples.jsonl").write_text("".join(json.dumps({"rc": r}) + "\n"
                                              for r in uniform_rewards()))
    write(rs / "train" / "config.json", {"sweep_prompts": 32})
    write(root / "versions.json", {"sft": "s", "rlhf_v1": "r1", "rlhf_v2": "r2", "final": "f"})
    rows = tracking_rows([0.4, 0.5, 0.55, 0.6, 0.62], [0.4, 0.5, 0.55, 0.58, 0.6], per_prompt=200)
    write(root / "eval" / "tracking.json", {"rows": rows, "n_helpful": 200})
    for version, viol, fr in (("sft", 60, 40), ("final", 2, 30)):
        write(root / "eval" / version / "summary.json", {"suites": {
            "helpfulness": {"world": {"n": 200, "win_count": 106, "tie_count": 68,
                                      "loss_count": 26}},
            "safety": {"violation": {"rate": viol / 200, "count": viol, "n": 200},
                       "false_refusal": {"borderline": {"rate": fr / 200, "count": fr,
                                                        "n": 200}}}}})
    write(root / "gatt" / "adherence.json", adherence({"figure": 1.0, "format": 23 / 24}))
    write(root / "distill" / "summary.json", distill_summary(fr=(0.01, 0.02, 0.12)))
    write(root / "distill" / "config.json", {"n_eval_safety": 200, "n_eval_borderline": 200})
    (root / "distill" / "distilled.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in distill_rows(1.0)))
    write(root / "safety_scaling.json", {
        **scaling_result([0.4, 0.6, 0.8, 0.9], [0.0, 0.1, 0.3, 0.4]), "n_eval": {"borderline": 40}})
    write(root / "redteam.json", {"versions": ["sft", "rlhf_v1", "final"], "n_tries": 300,
                                  "violations_per_1000": [290.0, 100.0, 0.0]})


def test_a_run_where_every_finding_holds(tmp_path):
    make_run(tmp_path)
    table = rp.reproduction_table(tmp_path)
    assert len(table) == len(rp.FINDINGS)
    assert [r["finding"] for r in table if not r["reproduced"]] == []
    assert all("[" in r["measured"] or "margin" in r["measured"] for r in table)  # or a margin


def test_a_run_with_broken_findings(tmp_path):
    make_run(tmp_path)
    write(tmp_path / "eval" / "final" / "summary.json", {"suites": {
        "helpfulness": {"world": {"n": 94, "win_count": 30, "tie_count": 40, "loss_count": 24}},
        "safety": {"violation": {"rate": 0.25, "count": 50, "n": 200},
                   "false_refusal": {"borderline": {"rate": 0.5, "count": 100, "n": 200}}}}})
    write(tmp_path / "safety_scaling.json", scaling_result([0.4, 0.3, 0.8, 0.9],
                                                           [0.0, 0.1, 0.3, 0.4]))
    broken = {r["finding"].split(" (")[0] for r in rp.reproduction_table(tmp_path)
              if not r["reproduced"]}
    assert broken == {"The final model beats SFT on helpfulness",
                      "Safety RLHF lowers the violation rate",
                      "False refusals on the borderline set do not rise",
                      "Safety data scaling"}


def test_missing_files_are_not_measured_and_say_what_is_missing(tmp_path):
    table = rp.reproduction_table(tmp_path)
    assert not any(r["reproduced"] for r in table)
    assert all(r["measured"].startswith("not measured in this run") for r in table)
    assert "eval/tracking.json missing" in next(r["measured"] for r in table
                                                if "Figure 11" in r["finding"])
