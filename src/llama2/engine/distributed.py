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

The rule every command follows under `torchrun` (the same command runs as one process):
each rank does a share of the work and the results meet through collectives; only rank 0
writes files (`utils.atomic_write`, the one writer of every result file, asks `is_main()`;
plots and removals ask it themselves) and logs (`rank0_logs`: the other ranks' stdout and
stderr go nowhere, an error still shows). A stage's marker is decided and written by rank 0
with a barrier after (stages/contract.py). Generation and scoring split their inputs over the
ranks of `current()` (respond.py, reward.score); training shards the model (Trainer). A stage
that is not distributed (yet) runs through `rank0_only(name, fn)`: one line says so, rank 0
runs it alone (inside, `launched()` is False: the stage sees one process) and the others wait
at a barrier, so nothing is done twice; `on_rank0(fn)` does the same for work too small to
share, without the notice. A bad launch that every rank finds the same way (settings that do
not fit the process count, a run directory another launch holds) is a `LaunchError`, which
the command line prints once, from rank 0.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
_ALONE = False  # inside rank0_only's body on rank 0: the code sees one process
_WAIT: Any = None  # the gloo group non-main ranks wait in during rank0_only (long timeout)
WAIT_TIMEOUT = datetime.timedelta(days=7)
LAUNCH_ERROR_GRACE_S = 10.0  # how long a rank other than 0 waits for rank 0 to say a LaunchError


class LaunchError(ValueError):
    """A bad launch (settings that do not fit the process count, a run directory another launch
    holds, models that do not fit together), found the same way on every rank: from what every
    rank reads, or from rank 0's answer broadcast. The command line prints it once, from rank 0
    (`exit_on_launch_error`)."""


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
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1), except inside
    `rank0_only`'s body, which runs as one process."""
    return not _ALONE and int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    """Whether this process writes files and logs: rank 0 under torchrun, a lone process
    always (no process group needed: torchrun's RANK says it)."""
    return _ALONE or int(os.environ.get("RANK", "0")) == 0


def current() -> DistInfo:
    """The processes the calling code shares its work with: those of the process group once
    `init` made it, else this process alone (also inside `rank0_only`'s body). `device` is
    where the group's collectives take tensors."""
    if not launched() or not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


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
    """Leave the process group (the command line does, once a command is over). Models the
    command dropped are freed and the ranks meet at a barrier first: gloo aborts at exit now
    and then otherwise ('terminate called without an active exception', platform notes; FSDP2
    modules still alive when the group goes)."""
    global _WAIT
    if _ALONE:
        return
    if dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    _WAIT = None


def rank0_only(name: str, fn: Callable[[], T]) -> T | None:
    """Run `fn` (a stage that is not distributed yet) on rank 0 alone: one line says so, the
    other ranks wait at a barrier and get None. Inside, `launched()` is False, so the stage
    (its Trainer, its `respond` calls) runs as one process. Without torchrun: just `fn()`.

    The waiting ranks sit in a gloo group of their own with a long timeout (a stage may run
    for hours); if rank 0 fails, torchrun ends them."""
    if launched() and is_main():
        print(f"{name}: not distributed yet: runs on rank 0 while the other "
              f"{int(os.environ['WORLD_SIZE']) - 1} process(es) wait", file=sys.stderr,
              flush=True)
    return on_rank0(fn)


def on_rank0(fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 alone (inside, `launched()` is False) while the other ranks wait at
    a barrier and get None; without torchrun just `fn()`. For work too small to share (the
    world's corpus, a tokenizer, the report); `rank0_only` is this with a notice."""
    global _ALONE, _WAIT
    if not launched():
        return fn()
    if not dist.is_initialized():
        init("cpu")  # only the barrier needs it; the stage picks its own device on rank 0
    if _WAIT is None:
        _WAIT = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    result = None
    if dist.get_rank() == 0:
        _ALONE = True
        try:
            result = fn()
        finally:
            _ALONE = False
    dist.barrier(group=_WAIT)
    return result


@contextmanager
def rank0_logs() -> Iterator[None]:
    """Only rank 0 logs: on the other ranks stdout and stderr go to /dev/null while the block
    runs; they come back before an error leaves it, so the error still shows."""
    if is_main() or not launched():
        yield
        return
    out, err = sys.stdout, sys.stderr
    with open(os.devnull, "w") as null:
        sys.stdout = sys.stderr = null
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err


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


def all_reduce_tensor(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of `t` over the processes (a new tensor on t's device; `t` itself alone)."""
    if not info.distributed:
        return t
    out = t.detach().to(info.device, copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def all_gather_object(obj: object, info: DistInfo) -> list[object]:
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def broadcast_object(obj: T, info: DistInfo) -> T:
    """Rank 0's `obj` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_shares(local: list[tuple[int, Any]], n: int, info: DistInfo) -> list[Any]:
    """Every rank's (index, value) pairs put together in index order: a list of n values
    (None where no rank gave one). One process: its own pairs."""
    out: list[Any] = [None] * n
    for part in all_gather_object(local, info):
        for i, value in part:  # type: ignore[union-attr]
            out[i] = value
    return out


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is FSDP2-sharded (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gathered(model: nn.Module) -> nn.Module:
    """A plain module with `model`'s full parameters on every rank, gathered once (one
    collective: every rank calls it): what a generation phase decodes with, so that its steps,
    which differ between ranks, need no collective. `model` itself when not sharded. For a
    module whose class takes its `args` (a Transformer)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    device = next(iter(state.values())).device
    from torch.distributed.fsdp import FSDPModule

    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with torch.device("meta"):  # FSDP2 made the module's class FSDP<cls>: build a plain cls
        plain = cls(model.args)
    plain = plain.to_empty(device=device)
    plain.load_state_dict(state)
    live = dict(model.named_buffers())
    for name, buf in plain.named_buffers():  # rope tables etc. are not in the state dict
        buf.copy_(live[name])
    return plain.eval()


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


def held_bytes(models: list[nn.Module], optimizers: list[torch.optim.Optimizer]
               ) -> dict[str, int]:
    """{"param_bytes", "optimizer_bytes"}: what this process holds of the models' parameters
    and the optimizers' per-parameter state (AdamW's moments; scalar steps not counted)."""
    states = [t for o in optimizers for s in o.state.values() for t in s.values()
              if isinstance(t, torch.Tensor) and t.dim() > 0]
    return {"param_bytes": local_bytes([p for m in models for p in m.parameters()]),
            "optimizer_bytes": local_bytes(states)}


def exit_on_launch_error(message: str) -> None:
    """End this process for a `LaunchError`: rank 0 (or a lone process) exits with `message`;
    another rank exits silently, after giving rank 0 a moment to print (torchrun ends it as
    soon as rank 0 exits, so the message is rank 0's and appears once)."""
    import time

    if is_main() or not launched():
        sys.exit(message)
    time.sleep(LAUNCH_ERROR_GRACE_S)
    sys.exit(1)
