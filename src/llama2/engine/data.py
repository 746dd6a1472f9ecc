"""Data sources for the engine: a batch stream with a resumable position.

A data source is anything with `next_batch()`, `state_dict()` and `load_state_dict()`. The
ones here number the samples of the whole run 0, 1, 2, ... and give process `rank` of
`world_size`, on its k-th call, samples k*W*B + rank*B ... + B-1 (B = micro-batch size).
So one optimizer step sees the same global batch whether it runs in 1 process with G/B
accumulation steps or in W processes with G/(W*B) each, and the position is one integer
(samples consumed), valid for any process count.

`EpochSampler` (alias `ListBatches`) serves a list of pre-built examples (SFT dialogs,
preference pairs, ...), reshuffled every epoch with a seeded generator, grouped by the
stage's `collate(list_of_examples) -> batch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch


class DataSource(Protocol):
    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class IndexedStream:
    """Base class: sample indices of this process's next micro-batch, and the position."""

    def __init__(self, micro_batch_size: int | None = None, rank: int | None = None,
                 world_size: int | None = None):
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.round = 0  # calls of next_batch so far (the same on every process)

    def bind(self, micro_batch_size: int, rank: int, world_size: int) -> None:
        """Called by the Trainer: the micro-batch size and this process's place."""
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size

    def _layout(self) -> tuple[int, int, int]:
        if self.rank is None or self.world_size is None:
            self.rank, self.world_size = dist_rank_world()
        if not self.micro_batch_size:
            raise ValueError("data source has no micro_batch_size (pass it or call bind())")
        return self.micro_batch_size, self.rank, self.world_size

    def next_indices(self) -> list[int]:
        b, r, w = self._layout()
        first = self.round * w * b + r * b
        self.round += 1
        return list(range(first, first + b))

    def next_batch(self) -> Any:
        return self.make_batch(self.next_indices())

    def make_batch(self, indices: list[int]) -> Any:
        raise NotImplementedError

    def state_dict(self) -> dict:
        # Samples consumed over all processes: meaningful for any process count.
        b, _, w = self._layout()
        return {"samples": self.round * b * w}

    def load_state_dict(self, state: dict) -> None:
        b, _, w = self._layout()
        samples = int(state["samples"])
        if samples % (b * w):
            raise ValueError(f"data position {samples} is not a multiple of micro_batch_size "
                             f"{b} x {w} processes")
        self.round = samples // (b * w)


class EpochSampler(IndexedStream):
    """Endless epochs over `examples`, each a fresh seeded permutation; `collate` batches."""

    def __init__(self, examples: Sequence[Any], collate: Callable[[list[Any]], Any],
                 micro_batch_size: int | None = None, seed: int = 0, shuffle: bool = True,
                 rank: int | None = None, world_size: int | None = None):
        if len(examples) == 0:
            raise ValueError("EpochSampler: no examples")
        super().__init__(micro_batch_size, rank, world_size)
        self.examples, self.collate = examples, collate
        self.seed, self.shuffle = seed, shuffle
        self._perm_epoch, self._perm = -1, torch.arange(0)

    def __len__(self) -> int:
        return len(self.examples)

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            n = len(self.examples)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perm = torch.randperm(n, generator=g)
            else:
                self._perm = torch.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def example(self, i: int) -> Any:
        n = len(self.examples)
        return self.examples[int(self._order(i // n)[i % n])]

    @property
    def epoch(self) -> float:
        """Epochs consumed so far (fractional)."""
        b, _, w = self._layout()
        return self.round * b * w / len(self.examples)

    def make_batch(self, indices: list[int]) -> Any:
        return self.collate([self.example(i) for i in indices])

    def eval_batches(self, limit: int = 0, micro_batch_size: int | None = None) -> Iterator[Any]:
        """One ordered pass for evaluation, the same whatever the number of processes: the
        one-process pass is ceil(n / B) batches (the last one wrapping around to fill it), at
        most `limit`, and process `rank` gets batches rank, rank + W, ... Every process gets
        as many: where the pass runs out, a `Filler` (a batch the process runs only to keep
        step with the others, counted for nothing)."""
        b, r, w = self._layout()
        b = micro_batch_size or b
        n = len(self.examples)
        total = math.ceil(n / b)
        if limit:
            total = min(total, limit)

        def batch(k: int) -> Any:
            return self.collate([self.examples[i % n] for i in range(k * b, k * b + b)])

        for j in range(math.ceil(total / w)):
            k = j * w + r
            yield batch(k) if k < total else Filler(batch(0))


class Filler:
    """An evaluation batch that only keeps a process in step with the others (an FSDP forward
    is a collective): evaluated, counted for nothing."""

    def __init__(self, batch: Any):
        self.batch = batch


ListBatches = EpochSampler
