"""AdamW with decoupled weight decay on weight matrices only, and the LR schedule.

Paper §2.2: AdamW beta1 0.9, beta2 0.95, eps 1e-5, weight decay 0.1, cosine schedule with
linear warmup to a final LR of 10% of the peak. Norm gains (and any other 1-D parameter)
are not decayed. PPO (§3.2.3) uses the same optimizer with `schedule = "constant"`.

`ModelOptimizer(model, cfg)` holds a model's AdamW and schedule and ends a training step:
scale, clip, step, advance the schedule, zero the gradients; its `state_dict()` is the model,
optimizer and schedule state a checkpoint holds. The Trainer has one, PPO one per model.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llama2.engine import distributed
from llama2.engine.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (embeddings and projections) decayed, 1-D parameters not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _impl_kwargs(impl: str, model: nn.Module) -> dict:
    if impl == "loop":
        return {"foreach": False}
    if impl == "foreach":
        return {"foreach": True}
    if impl == "fused":
        return {"fused": True}
    # auto: the fused kernel (CPU and CUDA) is fastest for plain tensors; FSDP2's DTensor
    # parameters take the foreach path, which supports them.
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        return {"foreach": True}
    return {"fused": True}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with the paper's betas/eps, decay on matrices only, initial LR = lr_at(0)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **_impl_kwargs(cfg.optimizer_impl, model))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Linear warmup from lr/warmup to lr over `cfg.warmup()` steps, then either constant or a
    cosine decay reaching min_lr_ratio * lr at step max_steps (and staying there).
    """
    warmup = cfg.warmup()
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    floor = cfg.min_lr_ratio * cfg.lr
    span = max(1, cfg.max_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_at`; its state (the step) is saved in checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.lr)


class ModelOptimizer:
    """A model's AdamW (`make_optimizer`), its LR schedule (`make_scheduler`) and gradient
    clipping at `cfg.grad_clip` (paper §2.2: 1.0; 0 measures the norm without clipping)."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg)

    def step(self, grad_scale: float = 1.0) -> dict[str, float]:
        """Multiply the gradients by `grad_scale`, clip them, take the AdamW step at the
        schedule's LR, advance the schedule and zero the gradients.

        Returns {"lr": the step's LR, "grad_norm": the norm before clipping}."""
        if grad_scale != 1.0:
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], grad_scale)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or float("inf"),
                                              foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm over every shard
            norm = norm.full_tensor()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": float(norm)}

    def state_dict(self) -> dict[str, Any]:
        """{"model", "optimizer", "scheduler"}: full (unsharded) CPU state keyed by parameter
        name, so a checkpoint moves between sharded and single-process runs. Under FSDP2 every
        process calls it (it gathers the shards)."""
        msd, osd = distributed.full_state(self.model, self.optimizer)
        return {"model": msd, "optimizer": osd, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        distributed.load_full_state(self.model, self.optimizer, state["model"],
                                    state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
