"""The Llama 2 architecture in plain PyTorch, readable top to bottom.

Follows Meta's reference `llama/model.py` (parameter names included: wq wk wv wo, w1 w2 w3,
attention_norm, ffn_norm, norm, output) so Meta checkpoints load without renaming:
pre-normalization with RMSNorm, SwiGLU feed-forward, rotary embeddings on adjacent pairs,
grouped-query attention through `scaled_dot_product_attention`, no biases, untied embeddings
(paper §2.2, A.2.1). Attention writes keys and values into a cache the caller passes in (the
static one of `generation.KVCache`), and `hidden()` serves the reward model and the PPO value
head.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    # Explicit feed-forward width; None derives it like Meta's code. llama2.c checkpoints
    # (e.g. stories260K, hidden 172) store a width the formula does not give.
    hidden_dim: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim {self.dim // self.n_heads} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self) -> int:
        d, h, v, L = self.dim, self.ffn_hidden_dim, self.vocab_size, self.n_layers
        kv = self.n_kv_heads * self.head_dim
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * h + 2 * d
        return 2 * v * d + L * per_layer + d


PRESETS: dict[str, ModelArgs] = {
    "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32),
    "13B": ModelArgs(dim=5120, n_layers=40, n_heads=40),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                     ffn_dim_multiplier=1.3, multiple_of=4096),
    # llama2.c's tinyllamas sizes and smaller ones for tests and the embedded default.
    "15M": ModelArgs(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32,
                     max_seq_len=256),
    "260K": ModelArgs(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512,
                      hidden_dim=172, max_seq_len=512),
    "tiny": ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=1024,
                      multiple_of=32, max_seq_len=512),
    "micro": ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                       multiple_of=16, max_seq_len=128),
}


def preset(name: str, **overrides) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 as the reference does, then cast back (matters under bf16); an fp32
        # input skips the casts (decoding pays per operation).
        xf = x if x.dtype == torch.float32 else x.float()
        out = F.rms_norm(xf, xf.shape[-1:], eps=self.eps)  # x * rsqrt(mean(x^2) + eps)
        return (out if out.dtype == x.dtype else out.type_as(x)) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables [max_len, head_dim] in the pairwise layout `apply_rope` uses: each pair's
    cosine twice, and its sine with the sign of the rotation (-sin, +sin)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), freqs)
    cos, sin = angles.cos(), angles.sin()
    return cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of `x` [B, T, H, D] as Meta's complex product does:
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); cos/sin are [B or 1, T, D] `rope_tables`
    rows."""
    xf = x if x.dtype == torch.float32 else x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    out = xf * cos.unsqueeze(2) + swapped * sin.unsqueeze(2)
    return out if out.dtype == x.dtype else out.type_as(x)


class Cache(Protocol):
    """Where attention keeps keys and values between calls (`generation.KVCache`)."""

    max_len: int

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys side by side [B, T, (n_heads + n_kv_heads) * head_dim], and values
        (`llama2.packed`'s decoding twin computes all three in one product)."""
        return torch.cat((self.wq(x), self.wk(x)), -1), self.wv(x)

    def forward(self, x, cos, sin, mask=None, cache: Cache | None = None,
                input_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None):
        B, T, _ = x.shape
        qk, v = self.project(x)
        # Rotate queries and keys in one call: they share positions (decoding pays per call).
        qk = apply_rope(qk.view(B, T, -1, self.head_dim), cos, sin)
        q, k = qk.split_with_sizes((self.n_heads, self.n_kv_heads), 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if slots is not None:  # unpadded tokens [1, T]: attend in the mask's padded layout
            q, k, v = (to_slots(t[0], slots, mask.shape[0], mask.shape[-1]) for t in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_id, input_pos, k, v)
        # GQA: each kv head serves n_heads / n_kv_heads query heads; SDPA shares them without
        # materializing repeated keys and values.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        out = out.transpose(1, 2)
        if slots is not None:
            out = out.flatten(0, 1)[slots]
        return self.wo(out.reshape(B, T, -1))


def to_slots(x: torch.Tensor, slots: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Scatter x [N, ...] to the flat positions `slots` [N] of a zero [rows, cols, ...] layout."""
    out = x.new_zeros(rows * cols, *x.shape[1:]).index_copy(0, slots, x)
    return out.unflatten(0, (rows, cols))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None, input_pos=None, slots=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, input_pos, slots)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 style init for training from scratch; residual projections scaled by depth."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.args.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def hidden(self, tokens: torch.Tensor, *, positions: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, cache: Cache | None = None,
               input_pos: torch.Tensor | None = None, slots: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Final hidden states [B, T, dim] after the last RMSNorm.

        positions: rotary positions [B, T] (default 0..T, or input_pos with a cache); mask:
        boolean [B, 1, T, S] (True = attend) for padding or packed documents (default causal).
        cache/input_pos: write this chunk's keys and values at cache positions input_pos [T]
        and attend over the whole cache (S = its length; default mask: causal by input_pos).
        slots: for unpadded tokens [1, N] (packed sequences, e.g. `reward.pack_pairs`), their
        flat indices [N] in a padded [R, T'] layout that `mask` [R, 1, T', T'] describes; only
        attention runs in that layout, everything else on the N tokens.
        """
        B, T = tokens.shape
        if cache is not None and mask is None:
            keys = torch.arange(cache.max_len, device=tokens.device)
            mask = (keys.view(1, -1) <= input_pos.view(-1, 1)).view(1, 1, T, -1)
        if positions is None and cache is not None:
            positions = input_pos.view(1, T)
        if positions is None:
            if T > self.args.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds the context of {self.args.max_seq_len}")
            cos, sin = self.rope_cos[:T].unsqueeze(0), self.rope_sin[:T].unsqueeze(0)
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, input_pos, slots)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits [B, T, vocab]; keyword arguments as in `hidden`."""
        return self.output(self.hidden(tokens, **kwargs))


def causal_padding_mask(valid: torch.Tensor, queries: int | None = None) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, S] for queries at positions 0..T (T = `queries`, default
    S) over keys 0..S.

    valid: [B, S] True where the key is a real token (False for left padding). Every query
    also sees itself so that padding rows never attend to nothing (which gives NaN).
    """
    B, S = valid.shape
    T = S if queries is None else queries
    q = torch.arange(T, device=valid.device).view(1, T, 1)
    k = torch.arange(S, device=valid.device).view(1, 1, S)
    mask = (k <= q) & valid.view(B, 1, S)
    mask = mask | (k == q)
    return mask.unsqueeze(1)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask [B, 1, T, T] for packed sequences: no attention across docs."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    return (same & causal).unsqueeze(1)
