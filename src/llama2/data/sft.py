"""Dialog examples for supervised fine-tuning (SFT, rejection-sampling FT, GAtt, distillation).

A dialog becomes (ids, mask) through the Llama 2 chat format (`chat.encode_dialog`): the mask
marks the assistant-answer tokens, the only ones learned (recipe §2: the loss on user-prompt
tokens is zeroed). Examples are packed into fixed-length rows to fill the sequence (§2:
"prompts and answers of the training set are concatenated"); each dialog keeps its own
rotary positions and a block-diagonal attention mask, so no dialog attends to another.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch

from llama2.chat import Dialog, encode_dialog
from llama2.engine.losses import IGNORE_INDEX, causal_lm_loss
from llama2.model import document_mask
from llama2.tokenizer import Tokenizer


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # True where the token is learned (as a target)


@dataclass
class Row:
    """One training row: several examples end to end, up to seq_len tokens."""

    examples: list[Example]


def encode_examples(tok: Tokenizer, dialogs: Iterable[Dialog], seq_len: int,
                    learn: Literal["all", "last"] = "all") -> tuple[list[Example], int]:
    """Encode dialogs; those longer than seq_len are cut (counted in the second value)."""
    out, cut = [], 0
    for d in dialogs:
        ids, mask = encode_dialog(tok, d, learn=learn)
        if len(ids) > seq_len:
            ids, mask = ids[:seq_len], mask[:seq_len]
            cut += 1
        if any(mask[1:]):
            out.append(Example(ids, mask))
    return out, cut


def pack(examples: list[Example], seq_len: int) -> list[Row]:
    """First-fit packing in the given order into rows of at most seq_len tokens."""
    rows: list[Row] = []
    room: list[int] = []
    for ex in examples:
        n = len(ex.ids)
        for i, r in enumerate(room):
            if r >= n:
                rows[i].examples.append(ex)
                room[i] -= n
                break
        else:
            rows.append(Row([ex]))
            room.append(seq_len - n)
    return rows


def collate_rows(rows: list[Row], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """tokens/targets/positions [B, T] and the block-diagonal attention mask [B, 1, T, T].

    targets[t] = tokens[t+1] when that token is learned and in the same dialog, else -100.
    """
    B, T = len(rows), seq_len
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for k, ex in enumerate(row.examples):
            n = len(ex.ids)
            ids = torch.tensor(ex.ids)
            learn = torch.tensor(ex.mask[1:])
            tokens[b, at:at + n] = ids
            targets[b, at:at + n - 1] = torch.where(learn, ids[1:], IGNORE_INDEX)
            positions[b, at:at + n] = torch.arange(n)
            doc[b, at:at + n] = k
            at += n
        # Padding: its own "document" so that it attends to itself only.
        doc[b, at:] = torch.arange(T - at) + len(row.examples)
    return {"tokens": tokens, "targets": targets, "positions": positions,
            "mask": document_mask(doc)}


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float], int]:
    """The engine's loss_fn: mean cross-entropy over the learned answer tokens."""
    loss, n = causal_lm_loss(model, batch["tokens"], batch["targets"],
                             positions=batch["positions"], mask=batch["mask"])
    return loss, {}, n
