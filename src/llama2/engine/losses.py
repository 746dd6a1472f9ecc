"""Language-model losses that never materialize the full [tokens, vocab] logits.

With a 32k vocabulary the output projection and its cross-entropy dominate a small model's
step: a [8192, 32000] fp32 logits tensor is 1 GB, and its softmax gradient another. The
chunked linear + cross-entropy below walks over blocks of tokens, computes each block's
logits, its loss and, in the same pass, its gradients with respect to the hidden states and
the output weight (softmax - onehot). Only one [chunk, vocab] block is alive at a time; the
backward pass is a multiply by the incoming scalar gradient. Same FLOPs as the plain
version (2 matmuls forward-equivalent + 2 for the gradients), far less memory traffic.

`causal_lm_loss(model, tokens, targets, loss_mask)` applies it to a llama2 `Transformer`
(anything with `.hidden(tokens, **kw)` and `.output.weight`): pretraining (recipe §1) and SFT
(§2: loss only on answer tokens, via targets == -100 or `loss_mask`) share it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100


def _chunk_rows(vocab: int, budget_bytes: int = 64 << 20) -> int:
    """Tokens per chunk so that one fp32 [chunk, vocab] block stays within `budget_bytes`."""
    rows = max(64, budget_bytes // (4 * max(vocab, 1)))
    return 1 << (rows.bit_length() - 1)  # a power of two: friendlier to the BLAS


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W^T, t_i), gradients computed during the forward pass."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                tok_w: torch.Tensor | None, chunk: int, dtype: torch.dtype) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_w else None
        w = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = min(chunk, h.shape[0])
        # Reused buffers: no per-chunk allocation of the [chunk, V] block.
        buf = torch.empty(rows, w.shape[0], dtype=dtype, device=h.device)
        buf32 = buf if dtype == torch.float32 else torch.empty_like(buf, dtype=torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk):
                hc = h[s:s + chunk].to(dtype)
                c = hc.shape[0]
                tc = targets[s:s + chunk].unsqueeze(1)
                logits = torch.mm(hc, w.t(), out=buf[:c])  # the only vocab-sized block
                if logits.dtype != torch.float32:
                    logits = buf32[:c].copy_(logits)  # softmax in fp32
                # One fused, row-wise pass (rows of 32k floats stay in cache), in place.
                logp = torch.log_softmax(logits, dim=-1, out=logits)
                nll = logp.gather(1, tc).squeeze(1).neg_()
                total += nll.sum() if tok_w is None else (nll * tok_w[s:s + chunk]).sum()
                if grad_h is None and grad_w is None:
                    continue
                # d CE / d logits = softmax - onehot (times the token's weight).
                g = logp.exp_()
                g.scatter_add_(1, tc, torch.full(tc.shape, -1.0, dtype=g.dtype,
                                                 device=g.device))
                if tok_w is not None:
                    g.mul_(tok_w[s:s + chunk].unsqueeze(1))
                if dtype != torch.float32:
                    g = buf[:c].copy_(g)
                if grad_h is not None:
                    if grad_h.dtype == dtype:
                        torch.mm(g, w, out=grad_h[s:s + chunk])
                    else:
                        grad_h[s:s + chunk] = g @ w
                if grad_w is not None:
                    if dtype == torch.float32:
                        grad_w.addmm_(g.t(), hc)
                    else:
                        grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        saved = list(ctx.saved_tensors)
        gh = saved.pop(0) * grad_out.to(saved[0].dtype) if ctx.has[0] else None
        gw = (saved.pop(0) * grad_out).to(ctx.w_dtype) if ctx.has[1] else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         token_weights: torch.Tensor | None = None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Sum over rows of `token_weights[i] * CE(h[i] @ weight.T, targets[i])` (a scalar).

    h: [N, D]; weight: [V, D]; targets: [N] int64, IGNORE_INDEX rows contribute nothing.
    Under autocast the matmuls run in the autocast dtype and the softmax in fp32, per chunk.
    """
    targets = targets.long()
    valid = targets != IGNORE_INDEX
    if token_weights is None and bool(valid.all()):
        tok_w = None  # every row counts once: skip the weighting pass
    else:
        tok_w = valid.float() if token_weights is None else token_weights.float() * valid
    targets = torch.where(valid, targets, torch.zeros_like(targets))
    chunk = chunk_size or _chunk_rows(weight.shape[0])
    dtype = _compute_dtype(h.device, torch.promote_types(h.dtype, weight.dtype))
    return _LinearCrossEntropy.apply(h, weight, targets, tok_w, chunk, dtype)


def causal_lm_loss(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor,
                   loss_mask: torch.Tensor | None = None, *, chunk_size: int | None = None,
                   **hidden_kwargs: Any) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over the counted tokens, and their number.

    tokens/targets: [B, T] (targets already shifted: targets[:, t] follows tokens[:, t]);
    a target of -100 or `loss_mask == 0` drops that position (SFT: only answer tokens are
    learned, recipe §2). Extra keyword arguments (positions, mask) go to `model.hidden`.
    Rows without a counted token are removed before the output projection, so masked
    prompts cost nothing there. Returns (loss, n_tokens); the loss is 0 when n_tokens is 0.
    """
    if loss_mask is not None:
        targets = torch.where(loss_mask.bool(), targets, torch.full_like(targets, IGNORE_INDEX))
    h = model.hidden(tokens, **hidden_kwargs)
    flat_t = targets.reshape(-1)
    keep = (flat_t != IGNORE_INDEX).nonzero().squeeze(1)
    n = int(keep.numel())
    h = h.reshape(-1, h.shape[-1])
    if n < flat_t.numel():
        h, flat_t = h.index_select(0, keep), flat_t.index_select(0, keep)
    total = linear_cross_entropy(h, model.output.weight, flat_t, chunk_size=chunk_size)
    return total / max(n, 1), n


def lm_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, float], int]:
    """The engine's loss_fn for batches {"tokens", "targets"[, "loss_mask", "mask"]}."""
    kw = {"mask": batch["mask"]} if "mask" in batch else {}
    loss, n = causal_lm_loss(model, batch["tokens"], batch["targets"], batch.get("loss_mask"),
                             **kw)
    return loss, {}, n
