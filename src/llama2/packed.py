"""A CPU fast path for decoding: a twin of the model whose large fp32 linears hold oneDNN-packed
weights.

On CPU, torch's fp32 products of a few rows by a large matrix (a decoding step) go through the
BLAS, which on the project's machines streams a large matrix far below memory bandwidth;
oneDNN's prepacked weights (the kernel inductor uses for frozen CPU inference) read it several
times faster (bench/bench_model.py). `packed_twin` makes a twin that shares every tensor of the
model except those linears' weights, which it holds packed. Its lifetime is its holder's (a
`generation.Decoder`), and it is valid only while the model's weights do not change. Where the
kernel is missing or does not reproduce `F.linear` on this CPU, it steps aside (None).
"""

from __future__ import annotations

import copy
import functools
import itertools

import torch
import torch.nn.functional as F
from torch import nn

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


def packed_twin(model: nn.Module, min_numel: int = MIN_NUMEL) -> nn.Module | None:
    """A twin of `model` with its large plain-CPU fp32 nn.Linear modules packed, sharing every
    other tensor; None where nothing would be packed or the kernel is not available."""
    def packable(m: nn.Module) -> bool:
        w = getattr(m, "weight", None)
        return (type(m) is nn.Linear and m.bias is None and w.numel() >= min_numel
                and w.device.type == "cpu" and w.dtype == torch.float32
                and type(w.data) is torch.Tensor)  # not an FSDP DTensor

    if not any(packable(m) for m in model.modules()) or not available():
        return None
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, shared)
    for parent in twin.modules():
        for name, child in parent.named_children():
            if packable(child):
                setattr(parent, name, PackedLinear(child))
    return twin
