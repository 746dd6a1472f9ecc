"""Attention on the system message (paper Figure 10): how much attention each layer pays to
the system-message tokens, per turn of a dialog, before and after Ghost Attention.

The model runs its own forward; a hook on each attention module takes the input it receives
(the normalized hidden states and the rotary tables) and recomputes softmax(QK^T / sqrt(d))
from the module's own projections, since scaled-dot-product attention does not return weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from llama2.chat import B_INST, B_SYS, Dialog, encode_dialog
from llama2.model import apply_rope
from llama2.stages.common import as_policy
from llama2.world.instructions import Persistent, world_tasks


def system_span(tok, dialog: Dialog) -> tuple[int, int]:
    """Token positions [start, end) of the system message in the encoded dialog (approximate
    by one token where the text merges with its neighbours)."""
    if dialog[0]["role"] != "system":
        raise ValueError("the dialog has no system message")
    head = tok.encode(f"{B_INST} {B_SYS}", bos=True)
    upto = tok.encode(f"{B_INST} {B_SYS}{dialog[0]['content']}", bos=True)
    return len(head), len(upto)


@torch.inference_mode()
def attention_weights(model, tokens: list[int]) -> list[torch.Tensor]:
    """softmax(QK^T / sqrt(d)) per layer [n_heads, T, T] for one sequence, from the input each
    attention module receives in the model's own forward pass."""
    device = model.output.weight.device
    x = torch.tensor([tokens], device=device)
    T = x.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    out: list[torch.Tensor] = []

    def probe(att, args) -> None:
        xn, cos, sin = args[:3]
        q = apply_rope(att.wq(xn).view(1, T, att.n_heads, att.head_dim), cos, sin)
        k = apply_rope(att.wk(xn).view(1, T, att.n_kv_heads, att.head_dim), cos, sin)
        q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
        k = k.repeat_interleave(att.n_heads // att.n_kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(att.head_dim)
        out.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0].cpu())

    hooks = [layer.attention.register_forward_pre_hook(probe) for layer in model.layers]
    try:
        model.hidden(x)
    finally:
        for h in hooks:
            h.remove()
    return out


def attention_to_system(model: Any, dialog: Dialog, device: str = "auto") -> dict[str, Any]:
    """Attention mass on the system-message tokens (Figure 10): per layer (mean over heads and
    the answer tokens of every turn), per layer and turn, and per token (max over layers)."""
    loaded = as_policy(model, device)
    tok = loaded.tokenizer
    ids, learn = encode_dialog(tok, dialog, learn="all")
    if len(ids) > loaded.args.max_seq_len:
        raise ValueError(f"the dialog has {len(ids)} tokens, over the context")
    s, e = system_span(tok, dialog)
    weights = attention_weights(loaded.model, ids)
    mass = torch.stack([w[:, :, s:e].sum(-1).mean(0) for w in weights])  # [L, T]
    turn = torch.cumsum(torch.tensor([i == tok.bos_id for i in ids]), 0) - 1  # turn per token
    answer = torch.tensor(learn)
    n_turns = int(turn.max()) + 1
    per_turn = [[float(mass[layer, answer & (turn == t)].mean()) for t in range(n_turns)]
                for layer in range(mass.shape[0])]
    return {"per_layer": mass[:, answer].mean(1).tolist(), "per_layer_turn": per_turn,
            "per_token": mass.max(0).values.tolist(), "system_tokens": [s, e],
            "n_tokens": len(ids), "tokens": [tok.id_to_piece(i) for i in ids]}


def figure10_dialog(instruction: Persistent, tok, limit: int, world_seed: int = 0) -> Dialog:
    """An obeying dialog (gold answers through `apply`) with as many turns as fit `limit`."""
    tasks = world_tasks(world_seed, 200, "eval")
    d: Dialog = [{"role": "system", "content": instruction.verbose}]
    for task in tasks:
        nxt = d + [{"role": "user", "content": task.user},
                   {"role": "assistant", "content": instruction.apply(task.answer)}]
        if len(encode_dialog(tok, nxt)[0]) > limit:
            break
        d = nxt
    if len(d) < 3:
        raise ValueError("not even one turn fits the context")
    return d
