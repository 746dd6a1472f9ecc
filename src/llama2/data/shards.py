"""Token shards on disk and the fixed-length window sampler over them.

A prepared dataset is a folder with `index.json` and flat binary shards
(`train_00000.bin`, `val_00000.bin`, ...) of uint16 token ids (uint32 when the vocabulary
has 65536 pieces or more), documents concatenated as BOS ... EOS BOS ... EOS. Shards are
opened with np.memmap, so a corpus larger than memory trains without being loaded.

`WindowSampler` draws random windows of seq_len + 1 tokens (inputs and shifted targets).
Window i of the run is a pure function of (seed, i), so the position to resume from is a
single counter and the global batch is the same for any number of processes (engine.data).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama2.engine.data import EpochSampler, IndexedStream

INDEX = "index.json"
FORMAT = "llama2-pretrain-shards"
_BLOCK = 4096  # windows drawn per RNG call


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def read_index(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: prepared dataset not found (run `llama2 prepare`)")
    path = folder / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {folder} is not a prepared dataset "
                                "(or its preparation did not finish)")
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} index")
    return index


class TokenShards:
    """One split of a prepared dataset (or in-memory arrays) as a list of 1-D token arrays."""

    def __init__(self, arrays: list[np.ndarray], bos_id: int = 1, eos_id: int = 2,
                 vocab_size: int | None = None, name: str = "tokens"):
        self.arrays = [a for a in arrays if len(a)]
        self.bos_id, self.eos_id, self.name = bos_id, eos_id, name
        self.vocab_size = vocab_size

    @classmethod
    def open(cls, folder: str | Path, split: str = "train") -> TokenShards:
        folder = Path(folder)
        index = read_index(folder)
        if split not in index["splits"]:
            raise ValueError(f"{folder}: no {split!r} split (has {', '.join(index['splits'])})")
        dtype = np.dtype(index["dtype"])
        arrays = []
        for f in index["splits"][split]["files"]:
            path = folder / f["name"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in {folder / INDEX} is missing")
            if path.stat().st_size != f["tokens"] * dtype.itemsize:
                raise ValueError(f"{path}: size does not match {INDEX} (truncated shard?)")
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        return cls(arrays, index["bos_id"], index["eos_id"], index["vocab_size"],
                   f"{folder}:{split}")

    @property
    def tokens(self) -> int:
        return sum(len(a) for a in self.arrays)


def _batch(windows: list[np.ndarray], bos_id: int, doc_mask: bool) -> dict[str, torch.Tensor]:
    x = torch.from_numpy(np.stack(windows).astype(np.int64))
    batch = {"tokens": x[:, :-1].contiguous(), "targets": x[:, 1:].contiguous()}
    if doc_mask:  # attend within documents only (each BOS starts a new one)
        from llama2.model import document_mask

        batch["mask"] = document_mask(torch.cumsum(batch["tokens"] == bos_id, dim=1))
    return batch


class WindowSampler(IndexedStream):
    """Random windows of seq_len + 1 tokens, seeded, resumable, split over processes."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int = 0,
                 micro_batch_size: int | None = None, doc_mask: bool = False,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__(micro_batch_size, rank, world_size)
        self.shards, self.seq_len, self.seed, self.doc_mask = shards, seq_len, seed, doc_mask
        # Starting offsets per shard: a window never crosses a shard boundary.
        self._starts = np.array([max(0, len(a) - seq_len) for a in shards.arrays], np.int64)
        if self._starts.sum() == 0:
            raise ValueError(f"{shards.name}: {shards.tokens} tokens, fewer than one window of "
                             f"seq_len + 1 = {seq_len + 1}; use more data or a shorter seq_len")
        self._cum = np.cumsum(self._starts)
        self._block, self._block_id = np.zeros(0, np.int64), -1

    def _draw(self, i: int) -> tuple[int, int]:
        block = i // _BLOCK
        if block != self._block_id:
            rng = np.random.default_rng([self.seed, block])
            self._block = rng.integers(0, int(self._cum[-1]), size=_BLOCK, dtype=np.int64)
            self._block_id = block
        u = int(self._block[i % _BLOCK])
        shard = int(np.searchsorted(self._cum, u, side="right"))
        return shard, u - (int(self._cum[shard - 1]) if shard else 0)

    def window(self, i: int) -> np.ndarray:
        shard, off = self._draw(i)
        return np.asarray(self.shards.arrays[shard][off:off + self.seq_len + 1])

    def make_batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return _batch([self.window(i) for i in indices], self.shards.bos_id, self.doc_mask)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seq_len", self.seq_len) != self.seq_len:
            raise ValueError(f"checkpoint was taken with seq_len {state['seq_len']}, the config "
                             f"says {self.seq_len}")
        super().load_state_dict(state)


class SequentialWindows:
    """Non-overlapping windows from the start of a split: the fixed evaluation set."""

    def __init__(self, shards: TokenShards, seq_len: int, limit: int = 0):
        self.shards, self.seq_len = shards, seq_len
        self.items = [(s, off) for s, a in enumerate(shards.arrays)
                      for off in range(0, len(a) - seq_len, seq_len)]
        if limit:
            self.items = self.items[:limit]
        if not self.items:
            raise ValueError(f"{shards.name}: {shards.tokens} tokens, fewer than one window of "
                             f"seq_len + 1 = {seq_len + 1}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        s, off = self.items[i]
        return np.asarray(self.shards.arrays[s][off:off + self.seq_len + 1])


def eval_sampler(shards: TokenShards, seq_len: int, micro_batch_size: int, limit: int = 0,
                 doc_mask: bool = False) -> EpochSampler:
    """An EpochSampler over the fixed evaluation windows (use its `.eval_batches()`)."""
    windows = SequentialWindows(shards, seq_len, limit)
    return EpochSampler(windows, lambda ws: _batch(ws, shards.bos_id, doc_mask),
                        micro_batch_size=micro_batch_size, shuffle=False)


def unigram_entropy(shards: TokenShards, vocab_size: int) -> float:
    """Entropy (nats/token) of the split's token frequencies: the loss of a model that
    ignores context, the bar a trained language model must clear."""
    counts = np.zeros(vocab_size, np.int64)
    for a in shards.arrays:
        for s in range(0, len(a), 1 << 24):
            counts += np.bincount(np.asarray(a[s:s + (1 << 24)]), minlength=vocab_size)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
