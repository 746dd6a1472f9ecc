"""Reward models: the margin ranking loss, the auxiliary safety loss, the data mixes, scoring."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from llama2.model import ModelArgs, Transformer
from llama2.reward import (
    from_policy,
    load_reward_model,
    pack_pairs,
    pad_right,
    save_reward_model,
    score,
)
from llama2.stages.reward import (
    MARGINS,
    build_mix,
    evaluate_rm,
    make_collate,
    ranking_loss,
    read_pairs,
)
from llama2.tokenizer import train_tokenizer
from llama2.world.records import PreferencePair


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["The cat sat on the mat. What is two plus two? It is four."] * 50
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=300)


def tiny_rm(tok):
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words,
                              multiple_of=16, max_seq_len=128))
    m.init_weights()
    rm = from_policy(m)
    torch.nn.init.normal_(rm.score_head.weight, std=0.5)
    return rm


def test_margin_tables_are_the_papers():
    assert MARGINS["small"]["significantly_better"] == 1.0
    assert abs(MARGINS["small"]["better"] - 2 / 3) < 1e-9
    assert MARGINS["large"]["slightly_better"] == 1.0
    assert all(v == 0 for v in MARGINS["none"].values())


def test_ranking_loss_is_the_formula_with_margin_and_aux(tok):
    rm = tiny_rm(tok)
    pairs = [PreferencePair([{"role": "user", "content": "What is two plus two?"}], "It is four.",
                            "The cat.", level, bin_)
             for level, bin_ in [("significantly_better", "chosen_safe_other_unsafe"),
                                 ("slightly_better", "both_safe"), ("better", None)]]
    from llama2.stages.reward import encode_pair

    items = [encode_pair(tok, p, 128) for p in pairs]
    batch = make_collate("large")(items)
    loss, metrics, n = ranking_loss(rm, batch)
    # The packed batch's loss is the formula on each sequence scored alone.
    s = rm(*pad_right([i["chosen"] for i in items] + [i["rejected"] for i in items], tok.pad_id))
    c, r = s[:3], s[3:]
    want = -F.logsigmoid(c - r - torch.tensor([3.0, 1.0, 2.0])).mean()
    assert n == 3 and torch.allclose(loss, want)
    loss_aux, m_aux, _ = ranking_loss(rm, batch, aux_weight=1.0)
    # Known labels: pair 0 chosen safe / rejected unsafe, pair 1 both safe; pair 2 unknown.
    known = torch.stack([c[0], c[1], r[0], r[1]])
    labels = torch.tensor([1.0, 1.0, 0.0, 1.0])
    aux = F.binary_cross_entropy_with_logits(known, labels)
    assert torch.allclose(loss_aux, want + aux, atol=1e-6) and "aux_loss" in m_aux


def test_packed_pairs_score_as_each_sequence_alone():
    """Chosen and rejected packed in one row with a shared context (and several pairs in a
    row) score exactly as each sequence scored on its own."""
    torch.manual_seed(0)
    m = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                              multiple_of=16, max_seq_len=128))
    m.init_weights()
    rm = from_policy(m)
    torch.nn.init.normal_(rm.score_head.weight, std=0.5)
    torch.nn.init.normal_(rm.score_head.bias, std=0.5)
    rng = random.Random(0)

    def seq(n):
        return [rng.randrange(1, 64) for _ in range(n)]

    pairs = []
    for ctx, a, b in [(20, 5, 9), (3, 12, 2), (40, 1, 1), (7, 6, 6), (0, 4, 8), (11, 30, 3)]:
        context = seq(ctx)
        pairs.append((context + seq(a), context + seq(b)))
    first = seq(9)  # responses that share a first token: the prefix runs past the context
    pairs.append((first + [5, 6, 7], first + [5, 8]))
    pairs.append((first + [5, 6], first + [5, 6]))  # identical: each keeps its last token
    pairs.append((seq(25), seq(18)))  # nothing shared: two separate segments
    batch = pack_pairs(pairs)
    R, _, T, _ = batch["mask"].shape  # the attention layout: several pairs share a row
    N = batch["tokens"].shape[1]  # each shared context once
    assert R < len(pairs) and N < sum(len(c) + len(r) for c, r in pairs) and N <= R * T
    chosen, rejected = rm.forward_pairs(batch)
    alone = torch.cat([rm(torch.tensor([s]), torch.tensor([len(s) - 1]))
                       for s in [c for c, _ in pairs] + [r for _, r in pairs]])
    assert torch.allclose(torch.cat([chosen, rejected]), alone, atol=1e-5)
    assert alone.std() > 0.1  # the scores differ: the check has teeth
    # ... and so do the gradients (the scatter to the attention layout and back).
    weights = torch.randn(2 * len(pairs))
    packed = torch.autograd.grad((torch.cat([chosen, rejected]) * weights).sum(), rm.parameters())
    single = torch.autograd.grad((alone * weights).sum(), rm.parameters())
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(packed, single))


def test_mix_proportions():
    rng = random.Random(0)
    primary, secondary = list(range(100)), list(range(1000, 2000))
    assert len(build_mix(primary, secondary, 0.5, rng)) == 200  # equal parts
    mix = build_mix(primary, secondary, 0.1, rng)
    assert len(mix) == 111 and sum(x >= 1000 for x in mix) == 11  # 90/10
    assert build_mix(primary, [], 0.5, rng) == primary


def test_bad_preference_records_name_file_and_line(tmp_path):
    good = {"dialog": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b",
            "level": "better"}
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rejected": None}) + "\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl:2"):
        read_pairs([str(path)])
    path.write_text(json.dumps({**good, "level": "much_better"}) + "\n")
    with pytest.raises(ValueError, match=r"prefs.jsonl:1.*level"):
        read_pairs([str(path)])


def test_save_load_score_and_eval_per_level(tmp_path, tok):
    rm = tiny_rm(tok)
    save_reward_model(rm, tok, tmp_path / "rm", "safety")
    rm2, tok2, meta = load_reward_model(tmp_path / "rm")
    assert meta["kind"] == "safety"
    dialogs = [[{"role": "user", "content": "What is two plus two?"}]] * 3
    responses = ["It is four.", "The cat sat.", "four"]
    a, b = score(rm, tok, dialogs, responses), score(rm2, tok2, dialogs, responses)
    assert torch.allclose(a, b) and a.shape == (3,)
    # Batched scoring equals one at a time (padding does not leak into the score).
    one = torch.cat([score(rm, tok, [d], [r]) for d, r in zip(dialogs, responses)])
    assert torch.allclose(a, one, atol=1e-5)
    from llama2.stages.reward import encode_pair

    pairs = [PreferencePair(dialogs[0], responses[i], responses[j], lvl, "both_unsafe")
             for i, j, lvl in [(0, 1, "better"), (1, 2, "negligibly_better"), (2, 0, "better")]]
    ev = evaluate_rm(rm, [encode_pair(tok, p, 128) for p in pairs])
    assert ev["count_by_level"] == {"better": 2, "negligibly_better": 1}
    # Per pair, for the reproduction table's paired (McNemar) comparisons of two RMs.
    assert {k: len(v) for k, v in ev["correct_by_level"].items()} == ev["count_by_level"]
    assert sum(ev["correct_by_level"]["better"]) / 2 == ev["accuracy_by_level"]["better"]
    assert ev["unsafe_count"] == 6 and 0 <= ev["unsafe_recall"] <= 1
    assert "safe_kept" not in ev  # no safe response among these pairs
    mixed = [encode_pair(tok, PreferencePair(dialogs[0], responses[0], responses[1], "better", b),
                         128) for b in ("chosen_safe_other_unsafe", "both_safe")]
    ev = evaluate_rm(rm, mixed)
    from llama2.stages.reward import auroc, pair_scores, recall_at_kept

    c, r = pair_scores(rm, mixed)  # safe: both chosen and the both-safe rejected; unsafe: r[0]
    safe, unsafe = [float(c[0]), float(c[1]), float(r[1])], [float(r[0])]
    assert ev["unsafe_count"] == 1 and ev["unsafe_recall"] == float(unsafe[0] < 0)
    assert ev["safe_kept"] == pytest.approx(sum(x >= 0 for x in safe) / 3)
    assert ev["unsafe_auroc"] == pytest.approx(auroc(safe, unsafe))
    assert ev["unsafe_recall_at_90_kept"] == recall_at_kept(safe, unsafe, 0.9)
    assert ev["unsafe_flagged_at_90_kept"] == [int(unsafe[0] < torch.tensor(safe).quantile(0.1))]
    assert ev["safe_count"] == 3


def test_auroc_counts_ties_half():
    from llama2.stages.reward import auroc

    assert auroc([2.0, 3.0], [1.0, 2.0]) == pytest.approx(0.875)
    assert auroc([0.0], [1.0]) == 0.0 and auroc([1.0], [1.0]) == 0.5


def test_encode_pair_cuts_both_sides_at_the_same_context_point(tok):
    """A pair longer than max_len keeps both answers whole after the same visible context; when
    no common cut can keep them, each side is cut from the left on its own."""
    from llama2.reward import shared_prefix
    from llama2.stages.reward import encode_pair

    dialog = [{"role": "user", "content": "Tell me about the big red dog and the little cat. " * 6}]
    pair = PreferencePair(dialog, "It is a dog story.", "A long story about a dog and a cat "
                          "who play in the park all day until the sun goes down.", "better", None)
    full = encode_pair(tok, pair, 10_000)
    c, r = full["chosen"], full["rejected"]
    max_len = len(r) - 10  # the longer side loses 10 context tokens
    cut = encode_pair(tok, pair, max_len)
    assert cut["chosen"] == c[10:] and cut["rejected"] == r[10:] and len(cut["rejected"]) == max_len
    assert shared_prefix(cut["chosen"], cut["rejected"]) == shared_prefix(c, r) - 10
    tiny = encode_pair(tok, pair, 8)  # shorter than the rejected answer itself
    assert tiny["chosen"] == c[-8:] and tiny["rejected"] == r[-8:]


def test_aux_ablation_row_compares_recall_at_equal_safe_kept(tmp_path):
    """Without the auxiliary loss the score offset is free: a model flagging most safe answers
    has a high recall at 0.5 but a lower one where both keep 90% of safe answers (Table 29)."""
    from llama2.stages.reproduction import reproduction_table

    def row(no_recall90: float, aux_recall90: float) -> dict:
        for name, recall, kept, r90 in (("safety_no_aux", 0.95, 0.44, no_recall90),
                                        ("safety_aux", 0.86, 0.93, aux_recall90)):
            d = tmp_path / "rm_ablation" / name
            d.mkdir(parents=True, exist_ok=True)
            (d / "eval.json").write_text(json.dumps(
                {"unsafe_recall": recall, "safe_kept": kept, "unsafe_recall_at_90_kept": r90,
                 "unsafe_auroc": 0.9, "unsafe_count": 100}))
        return next(r for r in reproduction_table(tmp_path) if "Auxiliary" in r["finding"])

    better = row(0.50, 0.80)
    assert better["reproduced"] and "safe kept 44.0%" in better["measured"]
    assert not row(0.80, 0.50)["reproduced"]


def test_recall_at_kept_uses_the_safe_quantile():
    from llama2.stages.reward import recall_at_kept

    safe = [float(x) for x in range(10)]  # 90% kept: threshold 0.9, only 0 is flagged
    assert recall_at_kept(safe, [-1.0, 0.5, 3.0, 9.5], 0.9) == 0.5
    assert recall_at_kept(safe, [-1.0, 0.5, 3.0, 9.5], 0.5) == 0.75  # threshold 4.5
