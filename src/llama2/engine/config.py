"""`TrainConfig`: the settings every training stage shares (the `[train]` section of a config).

Defaults are the paper's pretraining settings (recipe §1, paper §2.2): AdamW (0.9, 0.95),
eps 1e-5, weight decay 0.1, gradient clipping 1.0, cosine schedule with 2000 warmup steps
down to 10% of the peak. Later stages override lr, schedule, batch and warmup.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainConfig:
    # Schedule (paper §2.2: cosine, 2000 warmup steps, final LR 10% of peak).
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 2000
    # Warmup as a fraction of max_steps; the larger of the two wins (RM: 3%, at least 5).
    warmup_ratio: float = 0.0
    max_steps: int = 0  # 0: derived from `epochs` and the dataset length
    epochs: float = 0.0
    # Batch: sequences per forward pass per process, and the global batch per optimizer step
    # in sequences or tokens (paper: 4M tokens); accumulation makes up the difference.
    micro_batch_size: int = 8
    global_batch: int = 0  # sequences; 0: micro_batch_size x processes (no accumulation)
    global_batch_tokens: int = 0  # alternative to global_batch (needs a fixed seq_len)
    # AdamW (paper §2.2).
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-5
    grad_clip: float = 1.0  # 0 disables clipping
    optimizer_impl: Literal["auto", "fused", "foreach", "loop"] = "auto"
    # bfloat16: autocast, fp32 master weights; auto: bfloat16 where the hardware does it fast
    dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    # Evaluation, logging, checkpoints (in steps; 0 disables the periodic one).
    eval_every: int = 0
    eval_batches: int = 8  # micro-batches per evaluation, over all processes (0: all)
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    device: str = "auto"
    compile: bool = False  # torch.compile each block (platform notes: ~30 s cold on CPU)
    resume: bool = False
    progress: bool = True
    tensorboard: bool = False
    peak_flops: float = 0.0  # hardware peak for MFU; 0: a per-device estimate

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.micro_batch_size < 1:
            raise ValueError(f"train.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.global_batch and self.global_batch_tokens:
            raise ValueError("set only one of train.global_batch and train.global_batch_tokens")
        if self.max_steps < 0 or self.epochs < 0:
            raise ValueError("train.max_steps and train.epochs must not be negative")

    def warmup(self) -> int:
        """Warmup steps: max(warmup_steps, ceil(warmup_ratio * max_steps))."""
        return max(self.warmup_steps, math.ceil(self.warmup_ratio * self.max_steps))

    def global_sequences(self, world_size: int, seq_len: int | None = None) -> int:
        """Sequences per optimizer step over all processes."""
        if self.global_batch_tokens:
            if not seq_len:
                raise ValueError("train.global_batch_tokens needs a data source with a fixed "
                                 "seq_len; use train.global_batch (sequences)")
            return max(1, self.global_batch_tokens // seq_len)
        return self.global_batch or self.micro_batch_size * world_size

    def check_world(self, world_size: int, seq_len: int | None = None,
                    where: str = "train") -> int:
        """The global batch in sequences, which must split evenly over `world_size` processes
        (each takes an equal share of every step); else a one-line LaunchError naming the field
        (`where`: the section's dotted path). The micro-batch adapts, the global batch does
        not: it is the step the settings describe."""
        from llama2.engine.distributed import LaunchError

        total = self.global_sequences(world_size, seq_len)
        if total % world_size:
            field = (f"{where}.global_batch_tokens {self.global_batch_tokens} ({total} "
                     "sequences)" if self.global_batch_tokens else
                     f"{where}.global_batch {self.global_batch}")
            raise LaunchError(f"{field}: a global batch of {total} sequences does not split "
                              f"over {world_size} processes; launch a number of processes "
                              f"that divides it, or make it a multiple of {world_size}")
        return total

    def micro_batch(self, world_size: int, seq_len: int | None = None) -> int:
        """The micro-batch size for `world_size` processes: micro_batch_size, or where that
        does not split a process's share of the global batch evenly, the largest size below
        it that does. The global batch stays what the config says whatever the process count
        (the micro-batch size only trades memory for steps); it must split over the processes
        (`check_world`)."""
        total = self.check_world(world_size, seq_len)
        per_rank = total // world_size
        return max(m for m in range(1, min(self.micro_batch_size, per_rank) + 1)
                   if per_rank % m == 0)

    def accumulation(self, world_size: int, seq_len: int | None = None) -> int:
        """Micro-batches per optimizer step in each process."""
        total = self.global_sequences(world_size, seq_len)
        per_round = self.micro_batch_size * world_size
        if total % per_round:
            raise ValueError(f"global batch of {total} sequences is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size} x {world_size} processes")
        return total // per_round
