"""Wiring of torch.distributed and FSDP2 for the engine (no home-made collectives).

Launch any training stage with `torchrun --nproc_per_node N -m llama2.cli <stage> ...` (or
the `llama2` script under torchrun). `init()` reads torchrun's environment and creates the
process group: gloo on CPU, nccl on CUDA. `shard_model()` applies FSDP2 `fully_shard` to
every block of every `nn.ModuleList` (the Transformer's layers, also inside a reward model)
and then to the root, and registers `hidden` as a forward method so the chunked loss can
call `model.hidden()` directly.

Checkpoints (choice): full, unsharded state dicts gathered with
`torch.distributed.checkpoint.state_dict.get_{model,optimizer}_state_dict(full_state_dict=
True, cpu_offload=True)` and written by rank 0 as one file. They are keyed by parameter
name, so a checkpoint written by a sharded run loads in a single process and vice versa,
and with any number of processes. (Fine up to a few billion parameters on one host; DCP's
sharded format would be the next step for 70B.)
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "auto") -> DistInfo:
    """Create the process group when launched with several processes; idempotent."""
    from llama2.utils import resolve_device

    dev = resolve_device(device)
    if not launched():
        return DistInfo(device=dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            # NCCL cannot put two ranks on one GPU; say so instead of a CUDA error later.
            raise RuntimeError(f"local rank {local_rank} has no GPU: this node has "
                               f"{torch.cuda.device_count()}; launch at most that many "
                               "processes per node, or set --train.device cpu (gloo)")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def shutdown() -> None:
    """Leave the process group. The barrier first avoids gloo aborting at exit (platform
    notes: 'terminate called without an active exception' without it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_model(model: nn.Module, info: DistInfo,
                forward_methods: tuple[str, ...] = ("hidden",)) -> nn.Module:
    """FSDP2: shard each block of every ModuleList, then the root (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name in forward_methods:
        for module in model.modules():  # e.g. a reward model's inner Transformer.hidden
            if hasattr(type(module), name) and hasattr(module, "_get_fsdp_state"):
                register_fsdp_forward_method(module, name)
    return model


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: object, info: DistInfo) -> list[object]:
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None
               ) -> tuple[dict, dict | None]:
    """Full (unsharded) CPU model and optimizer state dicts, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer else None
    return msd, osd


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    model_state: dict, optim_state: dict | None) -> None:
    """Load full state dicts (from `full_state`) into a plain or sharded model/optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    if optimizer is not None and optim_state is not None:
        # The kernel choice (fused for plain tensors, foreach for DTensors) belongs to this
        # run, not to the one that wrote the checkpoint.
        impl = {k: optimizer.param_groups[0].get(k) for k in ("fused", "foreach")}
        optim_state = {**optim_state,
                       "param_groups": [{**g, **impl} for g in optim_state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, optim_state, options=opts)


def local_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes this process holds for `tensors` (the local shard of a DTensor)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        loc = t.to_local() if isinstance(t, DTensor) else t
        total += loc.numel() * loc.element_size()
    return total
