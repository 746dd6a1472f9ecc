"""Reproduction rows test the paper's claims strictly: an ordering over every level or version,
enough pairs per level, the annotators' judgement beside the RM's; tests build failing cases."""

from __future__ import annotations

from llama2.stages.reproduction import LEVELS, MIN_PAIRS, helpfulness_rises, rm_accuracy_ordered


def levels(*accs: float, n: int = 100) -> tuple[dict, dict]:
    return dict(zip(LEVELS, accs)), {lvl: n for lvl in LEVELS}


def test_table8_needs_all_four_levels_ordered_with_enough_pairs():
    assert rm_accuracy_ordered(*levels(0.9, 0.75, 0.62, 0.52))[1]
    # The case: first above last, but "better" below "slightly better".
    text, ok = rm_accuracy_ordered(*levels(0.67, 0.31, 0.62, 0.50))
    assert not ok and "not ordered" in text
    # Ordered, but the gap is inside the intervals of 100 pairs each.
    assert not rm_accuracy_ordered(*levels(0.58, 0.56, 0.55, 0.52))[1]
    acc, count = levels(0.9, 0.75, 0.62, 0.52)
    count["better"] = MIN_PAIRS - 1
    text, ok = rm_accuracy_ordered(acc, count)
    assert not ok and "fewer than 50 pairs on better" in text


def test_figure11_fails_when_the_annotators_helpfulness_falls():
    def rows(rm, gold):
        names = ["pretrain", "sft", "rlhf_v1", "rlhf_v2", "final"]
        return [{"version": v, "helpfulness_rm": r, "helpfulness_gold": g}
                for v, r, g in zip(names, rm, gold)]

    assert helpfulness_rises(rows([0.4, 0.5, 0.55, 0.6, 0.62], [0.4, 0.5, 0.55, 0.58, 0.6]))[1]
    # The issue's case: the RM's score rises while the annotators' helpfulness falls.
    text, ok = helpfulness_rises(rows([0.4, 0.456, 0.46, 0.463, 0.47], [0.5, 0.53, 0.47, 0.375, 0.54]))
    assert not ok and "annotators 0.375" in text
    assert not helpfulness_rises(rows([0.4, 0.5, 0.55, 0.6, 0.62], [0.4, 0.5, 0.45, 0.5, 0.49]))[1]
