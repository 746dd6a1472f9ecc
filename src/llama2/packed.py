"""A CPU fast path for decoding: a twin of the model that computes each layer's projections in
fewer, larger products, its large fp32 linears holding oneDNN-packed weights.

A decoding step multiplies a few rows by each matrix, so on CPU it pays per operation and the
BLAS streams a large matrix far below memory bandwidth. The twin (1) computes queries, keys and
values in one product and the SwiGLU's gate and up projections in another (as gpt-fast's
`wqkv`), (2) holds oneDNN's prepacked weights (the kernel inductor uses for frozen CPU
inference) for the large ones and (3) normalizes in fewer operations; bench/bench_model.py
times it. `packed_twin` makes a twin that shares every tensor of the model except the fused and
packed weights, cheaply enough to make one per `generate` call. Its lifetime is its
holder's (a `generation.Decoder`), and it is valid only while the model's weights do not change.
It steps aside (None) off CPU, outside fp32, and where the packed kernel is missing or does not
reproduce `F.linear` on this CPU it keeps plain fused weights.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llama2.model import Attention, FeedForward, RMSNorm

# From this many elements up (the 15M config's feed-forward and output matrices): smaller ones
# multiply as fast or faster through the BLAS at one row.
MIN_NUMEL = 2**17 + 1


class PackedLinear(nn.Module):
    """A bias-free nn.Linear for inference through oneDNN's packed fp32 weight."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


@functools.cache
def available() -> bool:
    """oneDNN's fp32 packed linear exists on this build and CPU and gives F.linear's values."""
    if not (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        g = torch.Generator().manual_seed(0)
        lin = nn.Linear(64, 96, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(96, 64, generator=g))
            x = torch.randn(5, 64, generator=g)
            return torch.allclose(PackedLinear(lin)(x), F.linear(x, lin.weight), atol=1e-4)
    except RuntimeError:
        return False


class FusedAttention(Attention):
    """`Attention` whose `project` is one product: [wq; wk; wv] stacked (the same forward)."""

    def __init__(self, attn: Attention, linear: Callable[[nn.Module], nn.Module]):
        nn.Module.__init__(self)  # not Attention's: it would allocate the separate weights
        self.layer_id = attn.layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.n_qk = (attn.n_heads + attn.n_kv_heads) * attn.head_dim
        self.wqkv = linear(stacked(attn.wq, attn.wk, attn.wv))
        self.wo = linear(attn.wo)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.wqkv(x)
        return y[..., :self.n_qk], y[..., self.n_qk:]


class FusedFeedForward(nn.Module):
    """SwiGLU with the gate and up projections in one product: [w1; w3] stacked."""

    def __init__(self, ffn: FeedForward, linear: Callable[[nn.Module], nn.Module]):
        super().__init__()
        self.w13 = linear(stacked(ffn.w1, ffn.w3))
        self.w2 = linear(ffn.w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, -1)
        return self.w2(F.silu(gate) * up)


class FastRMSNorm(nn.Module):
    """`RMSNorm` for fp32 inference in four operations, the model's values bit for bit:
    `F.rms_norm`'s CPU path, made for mixed precision, costs more a call at decoding's few
    rows (it copies through its accumulation dtype)."""

    def __init__(self, norm: RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (x * x).mean(-1, keepdim=True).add_(self.eps).rsqrt_() * self.weight


def stacked(*linears: nn.Linear) -> nn.Linear:
    """One bias-free linear whose output is the given linears' outputs side by side."""
    weight = torch.cat([m.weight.detach() for m in linears])
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")  # no init
    out.weight = nn.Parameter(weight, requires_grad=False)
    return out


def packed_twin(model: nn.Module, min_numel: int = MIN_NUMEL) -> nn.Module | None:
    """A decoding twin of `model` (a `model.Transformer`): fused projections, linears of at
    least `min_numel` weights packed, every other tensor shared; None off CPU or outside fp32."""
    w = model.output.weight
    if w.device.type != "cpu" or w.dtype != torch.float32 or type(w.data) is not torch.Tensor:
        return None  # FSDP's DTensors, bf16 and GPU weights decode as they are
    pack = available()

    def linear(m: nn.Module) -> nn.Module:
        return PackedLinear(m) if pack and m.weight.numel() >= min_numel else m

    def twin_of(module: nn.Module) -> nn.Module:
        # A shallow copy with its own table of children: its tensors are the model's, and
        # replacing its children leaves the model's. Cheaper than a deepcopy, which a generate
        # call without a held Decoder would pay every time.
        if isinstance(module, Attention):
            return FusedAttention(module, linear)
        if isinstance(module, FeedForward):
            return FusedFeedForward(module, linear)
        if type(module) is RMSNorm:
            return FastRMSNorm(module)
        if type(module) is nn.Linear and module.bias is None:
            return linear(module)
        if not module._modules:
            return module
        twin = copy.copy(module)
        twin._modules = {name: twin_of(child) for name, child in module._modules.items()}
        return twin

    return twin_of(model)
