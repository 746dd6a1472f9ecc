"""The Llama 2 architecture in plain PyTorch, readable top to bottom.

Follows Meta's reference `llama/model.py` (parameter names included: wq wk wv wo, w1 w2 w3,
attention_norm, ffn_norm, norm, output) so Meta checkpoints load without renaming:
pre-normalization with RMSNorm, SwiGLU feed-forward, rotary embeddings on adjacent pairs,
grouped-query attention through `scaled_dot_product_attention`, no biases, untied embeddings
(paper §2.2, A.2.1). Adds a preallocated KV cache for batched incremental decoding and a
`hidden()` entry point for the reward model and the PPO value head.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, replace
from typing import Any

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


_DIVISORS: dict[int, torch.Tensor] = {}  # RMSNorm's dim as a 0-dim fp32 tensor, per dim


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not torch.is_grad_enabled():
            # Inference in fp32: the same arithmetic in fewer operations and allocations
            # (decoding pays per operation; mean is sum, then divide, here by a tensor: an
            # integer divisor is converted to one on every call).
            n = _DIVISORS.get(x.shape[-1])
            if n is None:
                n = _DIVISORS[x.shape[-1]] = torch.tensor(float(x.shape[-1]))
            ms = (x * x).sum(-1, keepdim=True).div_(n)
            return x * ms.add_(self.eps).rsqrt_() * self.weight
        # Normalize in fp32 as the reference does, then cast back (matters under bf16).
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


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
    rows. The pairwise layout keeps it to a handful of operations per call (decoding pays
    per operation)."""
    xf = x if x.dtype == torch.float32 else x.float()  # (a cast to its own dtype still costs a call)
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    out = xf * cos.unsqueeze(2) + swapped * sin.unsqueeze(2)
    return out if out.dtype == x.dtype else out.type_as(x)


# Inside `inference_copies()` (a generation call, or a longer block that its caller holds while
# the weights cannot change), CPU matmuls multiply by contiguous copies of the transposed (and,
# for q/k/v and w1/w3, concatenated) weights, cut into INFERENCE_BLOCKS blocks: one batched
# product over the blocks runs them on all cores, where the BLAS runs a decoding step's
# matrix-vector product (x [1-16, in]) on one core (15M config, weights streamed from memory:
# the 32k-vocabulary projection 1.9 -> 1.4 ms per token; bench_model batch-1 decoding 1.9x ->
# 2.5x transformers). A batch cuts the copy along the output dimension, [blocks, in, out /
# blocks]; one sequence keeps the whole transposed matrix [1, in, out] and cuts its one row's
# product along the input dimension (`project`). One product also replaces two or three.
# The copies are made only with autograd off, for matrices up to this size and up to
# INFERENCE_COPY_BUDGET bytes per block (a 7B model on CPU keeps its memory: the layers past
# the budget multiply by their own weights). Within a block the weights must not change;
# between blocks a copy of up to INFERENCE_KEEP_NUMEL elements stays on its layer (one per
# layout) and is reused while the weights are the ones it was made from (`_same_source`), so
# separate generate calls with unchanged weights (evaluation loops, sampling K answers,
# `llama2 generate` prompts) skip the copying (15M config: ~8 of a batch-1 call's 14 ms before
# its first new token).
INFERENCE_COPY_MAX_NUMEL = 64 * 2**20
INFERENCE_COPY_BUDGET = 2 * 2**30
INFERENCE_BLOCKS = 4
INFERENCE_KEEP_NUMEL = 16 * 2**20  # 64 MB (fp32) per matrix group
# A large fp32 matrix times two rows or more (batched decoding, prefill, scoring) goes through
# oneDNN's prepacked GEMM instead, the kernel inductor uses for CPU inference with frozen
# weights: it beats the BLAS on this CPU from 2 rows on (15M config, 32k x 288 head: 16 rows
# 4.5 -> 2.1 ms, 256 rows 46 -> 22 ms), where one row streams faster through the blocked copy.
# From the 15M config's layer matrices up (221k-442k elements, kept between calls like the
# other copies): batch-16 decoding 7.2 -> 7.0, 8.9 -> 7.9, 9.8 -> 9.1 ms a step (same-process
# A/Bs on a noisy machine). Matrices of up to 2^17 elements (every one of the tiny configs, the
# 15M config's wo) stay as they were.
PACKED_MIN_NUMEL = 2**17 + 1
# Greedy decoding needs each row's largest logit, not the logits: from a vocabulary projection
# of this size up (the 15M config's 32k x 288 head: 37 MB of fp32 read per step, 295 MFLOP at
# 16 rows), a cheaper copy (`Screen`) screens the tokens and only those that can still be a
# row's largest are multiplied in fp32 (`generation.screened_greedy`). Same-process A/Bs of
# whole generate calls (64 new tokens), median: 16 rows 474 -> 420 ms, 4 rows 288 -> 252
# (bf16 copy); one row 223 -> 206 (bf16) -> 176 ms (int8: torch's int8 kernel reads its 9 MB
# faster than oneDNN's one-row bf16 product reads 18, where bf16 beats int8 from 2 rows on).
# Tiny configs stay below it.
SCREEN_MIN_NUMEL = 2**22
_COPIES: ContextVar[dict | None] = ContextVar("inference_copies", default=None)
# The kept copies of each layer, {layout: (source, copy)}; beside the modules rather than in
# them, so that pickling or deep-copying a model neither carries nor duplicates them.
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def inference_copies(packed: bool = True):
    """Enable the cached weight copies for the block (nested blocks share the outer cache).

    Each `generate` call opens one; a caller whose weights stay fixed over many calls (a chat
    session, the server's worker) holds one open around them all, so even the copies too large
    to keep between blocks are made once (a 7B model on CPU: up to its 2 GB budget).

    packed=False: no oneDNN copies, for work that is mostly one row at a time (decoding one
    sequence): packing a 32k x 288 head costs 16 ms, more than its prefill saves."""
    if _COPIES.get() is not None:
        yield
        return
    token = _COPIES.set({"packed": packed})
    try:
        yield
    finally:
        _COPIES.reset(token)


def inference_weight(*linears: nn.Linear, packed: bool = False) -> torch.Tensor | None:
    """The cached [blocks, in, sum(out) / blocks] copy of `linears`' weights (blocks =
    INFERENCE_BLOCKS in a batch's block; 1, the transposed matrix, in one sequence's or where the
    output width does not divide), or with `packed` oneDNN's prepacked copy of the
    [sum(out), in] matrix; None where it does not apply (outside `inference_copies`, autograd
    on, not CPU, FSDP DTensor, too large, past the block's budget; packed: too small, not fp32,
    no oneDNN op)."""
    return _per_block((linears, packed), lambda store: _make_copy(store, linears, packed))


def _per_block(key: tuple, make: Callable[[dict], Any]) -> Any:
    """The block's copy under `key`, decided once per block (`make(store)`: the copy, or None);
    None outside `inference_copies` or with autograd on."""
    store = _COPIES.get()
    if store is None or torch.is_grad_enabled():
        return None
    if key not in store:
        store[key] = make(store)
    return store[key]


def _copyable(w: torch.Tensor, numel: int) -> bool:
    """A plain CPU tensor (not an FSDP DTensor) of at most INFERENCE_COPY_MAX_NUMEL elements."""
    return w.device.type == "cpu" and type(w.data) is torch.Tensor and numel <= INFERENCE_COPY_MAX_NUMEL


def _make_copy(store: dict, linears: tuple[nn.Linear, ...], packed: bool) -> torch.Tensor | None:
    w0 = linears[0].weight
    numel = len(linears) * w0.numel()
    if not _copyable(w0, numel):
        return None
    if packed and (not store["packed"] or numel < PACKED_MIN_NUMEL or w0.dtype != torch.float32
                   or not _onednn()):
        return None
    if not _charge(store, numel * w0.element_size()):
        return None
    # A batch (the block's packed=True): blocks along the output dimension, or oneDNN's packed
    # copy; one sequence, one row at a time: the whole transposed matrix (see `project`).
    kind = "packed" if packed else INFERENCE_BLOCKS if store["packed"] else 1

    def make(stale: torch.Tensor | None) -> torch.Tensor:
        w = torch.cat([lin.weight.detach() for lin in linears]) if len(linears) > 1 else w0.detach()
        if packed:
            return torch.ops.mkldnn._reorder_linear_weight(w)
        return _blocked_copy(w, stale, kind)

    return _kept_copy(linears, kind, make)


@dataclass
class Screen:
    """A cheaper copy of a vocabulary projection for greedy decoding (`generation.screened_greedy`):
    approximate logits, and per row a bound on their distance from the fp32 logits.

    kind "int8" (one row: torch's int8 weight-only kernel; each row of weights as int8 times a
    bf16 step, 9 of the 15M head's 37 MB) or "bf16" (a batch: oneDNN's packed bf16 GEMM)."""

    kind: str
    weight: torch.Tensor
    steps: torch.Tensor | None  # int8: the bf16 step of each row of weights
    max_norm: float  # the largest |w_j| over the rows of the fp32 weights
    max_step: float

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        x = h.bfloat16()
        if self.kind == "int8":
            return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.steps)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")

    def bound(self, h: torch.Tensor) -> torch.Tensor:
        """[rows]: |approximate - fp32 logit| of every token is at most this (h [rows, dim])."""
        dim = h.shape[-1]
        u, sums = 2**-8, 3 * dim * 2**-24  # bf16's unit roundoff; fp32 sums of dim terms
        # h and the output rounded to bf16, u each (and the bf16 weights: u); sum_i |h_i w_i|
        # <= |h| |w| (Cauchy-Schwarz).
        if self.kind == "bf16":
            return (1.05 * (3 * u + 3 * u * u + sums) * self.max_norm) * h.norm(dim=-1)
        # int8: each weight lies within step / 2 of its int8 value times the step.
        w = self.max_norm + self.max_step * math.sqrt(dim) / 2
        return 1.05 * (self.max_step / 2 * (1 + u) * h.abs().sum(-1)
                       + (2 * u + 2 * u * u + sums) * w * h.norm(dim=-1))


def screen_weight(linear: nn.Linear) -> Screen | None:
    """For greedy decoding: a `Screen` of a large fp32 vocabulary projection, int8 where the
    block decodes one sequence, bf16 for a batch, kept like the other copies; None where it does
    not apply (outside `inference_copies`, autograd on, not a CPU fp32 matrix of
    SCREEN_MIN_NUMEL elements up, no kernel for it, past the copies' budget)."""
    return _per_block((linear, "screen"), lambda store: _make_screen(store, linear))


def _make_screen(store: dict, linear: nn.Linear) -> Screen | None:
    w = linear.weight
    kind = "bf16" if store["packed"] else "int8"
    has_kernel = (_bf16_instructions() and _onednn() if kind == "bf16" else
                  w.shape[1] % 16 == 0 and hasattr(torch.ops.aten, "_weight_int8pack_mm"))
    if not (_copyable(w, w.numel()) and w.dtype == torch.float32 and has_kernel
            and w.numel() >= SCREEN_MIN_NUMEL
            and _charge(store, w.numel() * (1 if kind == "int8" else 2))):
        return None

    def make(_: object) -> Screen:
        w = linear.weight.detach()
        norm = float(w.norm(dim=1).max())
        if kind == "bf16":
            return Screen(kind, torch.ops.mkldnn._reorder_linear_weight(w.bfloat16()), None,
                          norm, 0.0)
        # A bf16 step of at least max |w_j| / 127 (bf16 rounds by 2^-8 at most), so that every
        # weight rounds to an int8 within half a step.
        step = (w.abs().amax(1).clamp_min(2**-100) * (1 + 2**-7) / 127).bfloat16()
        q = torch.round(w / step.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
        return Screen(kind, q, step, norm, float(step.max()))

    return _kept_copy((linear,), "screen " + kind, make)


def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_reorder_linear_weight")


def _bf16_instructions() -> bool:
    """bf16 products in hardware (AVX512-BF16 or AMX): elsewhere oneDNN emulates them, slower
    than fp32."""
    return any(getattr(torch.cpu, f, lambda: False)()
               for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _charge(store: dict, nbytes: int) -> bool:
    """Count a new copy against the block's INFERENCE_COPY_BUDGET; False where it would not fit."""
    if store.get("bytes", 0) + nbytes > INFERENCE_COPY_BUDGET:
        return False
    store["bytes"] = store.get("bytes", 0) + nbytes
    return True


def _kept_copy(linears: tuple[nn.Linear, ...], kind: object, make):
    """The copy of `linears`' weights in layout `kind`: the one kept from an earlier block
    while the weights are those it was made from, else `make(stale copy or None)`, kept for
    later blocks when the weights hold up to INFERENCE_KEEP_NUMEL elements."""
    kept = _KEPT.setdefault(linears[0], {})
    entry = kept.get(kind)
    if entry is not None and _same_source(entry[0], linears):
        return entry[1]
    copy = make(None if entry is None else entry[1])
    if sum(lin.weight.numel() for lin in linears) <= INFERENCE_KEEP_NUMEL:
        kept[kind] = (_source(linears), copy)
    else:
        kept.pop(kind, None)
    return copy


def _sampled(w: torch.Tensor) -> torch.Tensor:
    flat = w.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 64) | 1]  # odd stride: never one column only


def _source(linears: tuple[nn.Linear, ...]) -> tuple:
    """What a kept copy was made from: the weight tensors (by weak reference), their storage
    and version counters, and a sample of their values."""
    ws = [lin.weight for lin in linears]
    return ([weakref.ref(w) for w in ws], [(w.data_ptr(), w._version) for w in ws],
            [_sampled(w).clone() for w in ws])


def _same_source(source: tuple, linears: tuple[nn.Linear, ...]) -> bool:
    """True when `linears` still hold exactly the weights a kept copy was made from. PyTorch
    bumps a tensor's version counter on every in-place write through an operator (optimizer
    steps, load_state_dict, init); writes that bypass it (through `.data`, numpy) change the
    values the sample holds."""
    refs, stamps, samples = source
    ws = [lin.weight for lin in linears]
    return (len(refs) == len(ws) and all(r() is w for r, w in zip(refs, ws))
            and all((w.data_ptr(), w._version) == st for w, st in zip(ws, stamps))
            and all(torch.equal(_sampled(w), sa) for w, sa in zip(ws, samples)))


def _blocked_copy(w: torch.Tensor, out: torch.Tensor | None, blocks: int) -> torch.Tensor:
    """w [out, in] transposed and cut along the output dimension: [blocks, in, out / blocks]
    (one block where it does not divide)."""
    n_out, n_in = w.shape
    blocks = blocks if n_out % blocks == 0 else 1
    src = w.view(blocks, n_out // blocks, n_in).transpose(1, 2)
    # Into the stale kept copy where there is one: a fresh allocation of that size is paged in
    # on first touch, which costs 2-3x the copy itself (18 vs 7 ms for a 32k x 288 head).
    if out is None or out.shape != src.shape or out.dtype != src.dtype:
        out = torch.empty(src.shape, dtype=src.dtype)
    # Transpose in strips of 256 output columns: a strip's source rows stay in L2 while it is
    # written (32k x 288 head: 9 -> 5 ms, where one strided copy misses cache on every row).
    for j in range(0, src.shape[2], 256):
        out[:, :, j:j + 256].copy_(src[:, :, j:j + 256])
    return out


def project(x: torch.Tensor, *linears: nn.Linear) -> tuple[torch.Tensor, ...]:
    """x through each of `linears` (no biases), through the cached copy when inferring: one
    product for all of them, split into views. (Decoding calls this ~25 times per token, so its
    Python work is one lookup of a plan made once per block.)"""
    store = _COPIES.get()
    if store is None or torch.is_grad_enabled():
        return tuple(lin(x) for lin in linears)
    n_in = x.shape[-1]
    if x.numel() == n_in:
        rows = "one"
    # (Under autocast the products follow autocast's dtype: the blocked copy's bmm does.)
    elif x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"):
        rows = "several"
    else:
        rows = "several, not packed"
    plan = store.get((linears, rows))
    if plan is None:
        plan = store[(linears, rows)] = _plan(linears, rows)
    how, w, sizes = plan
    if how == "row by input blocks":  # [1, width], or [1, 1, width] for a [1, 1, in] row
        out = torch.bmm(x.reshape(w.shape[0], 1, -1), w).sum(0, keepdim=x.dim() == 3)
    elif how == "row":  # [blocks, 1, width] is already the row's layout
        out = torch.bmm(x.reshape(1, 1, n_in).expand(w.shape[0], 1, n_in), w)
    elif how == "rows":  # [blocks, rows, width] -> [rows, blocks * width]
        out = torch.bmm(x.reshape(1, -1, n_in).expand(w.shape[0], -1, -1), w).transpose(0, 1)
    elif how == "packed":
        out = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    else:
        return tuple(lin(x) for lin in linears)
    if out.shape[:-1] != x.shape[:-1]:
        out = out.reshape(*x.shape[:-1], -1)
    return (out,) if sizes is None else out.split_with_sizes(sizes, -1)


def _plan(linears: tuple[nn.Linear, ...], rows: str) -> tuple[str, torch.Tensor | None, list | None]:
    """How `project` multiplies `rows` by `linears` in this block: (how, weight, split sizes)."""
    sizes = [lin.out_features for lin in linears] if len(linears) > 1 else None
    if rows == "several" and (w := inference_weight(*linears, packed=True)) is not None:
        return "packed", w, sizes
    if (w := inference_weight(*linears)) is None:
        return "linears", None, sizes
    blocks, n_in, width = w.shape
    if blocks == 1 and rows == "one" and n_in % INFERENCE_BLOCKS == 0:
        # One row times the whole transposed matrix: blocks along the input dimension, each a
        # contiguous [in / blocks, out] slab streamed by one core, and their partial products
        # summed (15M config, batch-1 decoding 3.6 -> 3.3 ms a token against blocks along the
        # output dimension, which stream narrow [in, out / blocks] ones).
        return "row by input blocks", w.view(INFERENCE_BLOCKS, -1, width), sizes
    if blocks == 1 and width % INFERENCE_BLOCKS == 0:  # column blocks, as views
        w = w.view(n_in, INFERENCE_BLOCKS, -1).transpose(0, 1)
    return "row" if rows == "one" else "rows", w, sizes


class KVCache:
    """Preallocated keys/values for every layer: [B, n_kv_heads, max_len, head_dim]."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.n_layers)]
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, H, T, D] at positions start..start+T; return the keys/values so far."""
        end = start + k.shape[2]
        self.k[layer].narrow(2, start, k.shape[2]).copy_(k)
        self.v[layer].narrow(2, start, v.shape[2]).copy_(v)
        return self.k[layer].narrow(2, 0, end), self.v[layer].narrow(2, 0, end)

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (drop finished sequences)."""
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, start: int = 0,
                slots: torch.Tensor | None = None):
        B, T, _ = x.shape
        q, k, v = project(x, self.wq, self.wk, self.wv)
        # Rotate queries and keys in one call: they share positions.
        qk = apply_rope(torch.cat((q, k), -1).view(B, T, -1, self.head_dim), cos, sin)
        q, k = qk.split_with_sizes((self.n_heads, self.n_kv_heads), 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if slots is not None:  # unpadded tokens [1, T]: attend in the mask's padded layout
            q, k, v = (to_slots(t[0], slots, mask.shape[0], mask.shape[-1]) for t in (q, k, v))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_id, start, k, v)
        causal = mask is None and T > 1 and start == 0
        # GQA: each kv head serves n_heads / n_kv_heads query heads; SDPA shares them without
        # materializing repeated keys and values.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        out = out.transpose(1, 2)
        if slots is not None:
            out = out.flatten(0, 1)[slots]
        return project(out.reshape(B, T, -1), self.wo)[0]


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
        gate, up = project(x, self.w1, self.w3)
        return project(F.silu(gate) * up, self.w2)[0]  # SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, mask=None, cache=None, start=0, slots=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, start, slots)
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
               mask: torch.Tensor | None = None, cache: KVCache | None = None,
               start: int = 0, slots: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, T, dim] after the last RMSNorm.

        positions: rotary positions [B, T] (default start..start+T); mask: boolean
        [B, 1, T, S] (True = attend) for padding or packed documents; cache/start: write this
        chunk's keys and values at cache positions start..start+T and attend to all before.
        slots: for unpadded tokens [1, N] (packed sequences, e.g. `reward.pack_pairs`), their
        flat indices [N] in a padded [R, T'] layout that `mask` [R, 1, T', T'] describes; only
        attention runs in that layout, everything else on the N tokens.
        """
        B, T = tokens.shape
        if positions is None:
            if start + T > self.args.max_seq_len:
                raise ValueError(
                    f"sequence of {start + T} tokens exceeds the context of {self.args.max_seq_len}")
            cos = self.rope_cos[start:start + T].unsqueeze(0)
            sin = self.rope_sin[start:start + T].unsqueeze(0)
        else:
            if int(positions.max()) >= self.args.max_seq_len:
                raise ValueError(f"position {int(positions.max())} exceeds the context of "
                                 f"{self.args.max_seq_len}")
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if mask is None and start > 0 and T > 1:  # chunked prefill: causal with an offset
            mask = causal_padding_mask(torch.ones(B, start + T, dtype=torch.bool,
                                                  device=tokens.device), start)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache, start, slots)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Logits [B, T, vocab]; keyword arguments as in `hidden`."""
        return self.logits(self.hidden(tokens, **kwargs))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The vocabulary projection of hidden states [..., dim]."""
        if not isinstance(self.output, nn.Linear):  # a reward model's transformer
            return self.output(h)
        return project(h, self.output)[0]

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.output.weight
        return KVCache(self.args, batch_size, max_len or self.args.max_seq_len, p.dtype, p.device)


def causal_padding_mask(valid: torch.Tensor, start: int = 0, total: int | None = None) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, S] for queries at start..start+T over keys 0..S.

    valid: [B, S] True where the key is a real token (False for left padding). Every query
    also sees itself so that padding rows never attend to nothing (which gives NaN).
    """
    B, S = valid.shape
    total = total or S
    T = total - start
    q = torch.arange(start, total, device=valid.device).view(1, T, 1)
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
