"""SFT data: the loss mask covers exactly the answer tokens, packing never leaks across dialogs."""

from __future__ import annotations

import torch

from conftest import shared_file
from llama2.data.sft import collate_rows, encode_examples, pack, sft_loss
from llama2.engine.losses import IGNORE_INDEX
from llama2.model import ModelArgs, Transformer
from llama2.tokenizer import Tokenizer

DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "2 plus 2 is 4."},
    {"role": "user", "content": "And 3 plus 3?"},
    {"role": "assistant", "content": "3 plus 3 is 6."},
]


def test_loss_mask_is_exactly_the_answer_tokens_of_every_turn():
    tok = Tokenizer(shared_file("llama2-tokenizer", "tokenizer.model"))
    (ex,), _ = encode_examples(tok, [DIALOG], seq_len=512)
    batch = collate_rows(pack([ex], 512), 512, tok.pad_id)
    targets = batch["targets"][0]
    learned = [(t, int(targets[t])) for t in range(len(ex.ids)) if targets[t] != IGNORE_INDEX]
    # Every learned target is the next token, and it is an answer token.
    for t, tgt in learned:
        assert tgt == ex.ids[t + 1] and ex.mask[t + 1]
    # Token by token: the learned tokens are the two answers (+ trailing space + EOS) and nothing else.
    ids = [tgt for _, tgt in learned]
    text = tok.decode(ids)
    assert "2 plus 2 is 4." in text and "3 plus 3 is 6." in text
    assert "What is" not in text and "Be brief" not in text and "[INST]" not in text
    assert ids.count(tok.eos_id) == 2
    assert len(ids) == sum(ex.mask[1:])


def test_packing_isolates_dialogs():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                     max_seq_len=64)
    model = Transformer(args)
    model.init_weights()
    from llama2.data.sft import Example

    a = Example([1, 5, 6, 7, 8, 2], [False, False, False, True, True, True])
    b = Example([1, 9, 10, 11, 2], [False, False, True, True, True])
    packed = collate_rows(pack([a, b], 16), 16, 0)
    alone = collate_rows(pack([b], 16), 16, 0)
    assert len(pack([a, b], 16)) == 1 and len(pack([a, b], 8)) == 2
    with torch.no_grad():
        h_packed = model.hidden(packed["tokens"], positions=packed["positions"], mask=packed["mask"])
        h_alone = model.hidden(alone["tokens"], positions=alone["positions"], mask=alone["mask"])
    # b's hidden states are the same whether packed after a or alone: nothing leaks across.
    assert (h_packed[0, 6:11] - h_alone[0, :5]).abs().max() < 1e-5
    loss_p, _, n_p = sft_loss(model, packed)
    assert n_p == 6  # a learns 7, 8, EOS; b learns 10, 11, EOS
    assert torch.isfinite(loss_p)
