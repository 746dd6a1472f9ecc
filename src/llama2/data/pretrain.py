"""Pretraining corpora -> token shards: `llama2 prepare --input FILE... --tokenizer TOK --out DIR`.

Inputs (streamed, never loaded whole):
- `.txt`: UTF-8 plain text, documents separated by blank lines;
- `.jsonl` / `.jsonl.gz`: one JSON object per line with a "text" field;
- `hf:NAME[:SPLIT]`: a Hugging Face dataset's "text" column (needs `datasets` and a
  network; imported only then);
- in Python, any iterable of document strings (`prepare(documents, ...)`), e.g. the
  built-in world's corpus.
Documents are tokenized on all cores (multiprocessing, in order, so the result does not
depend on the core count), wrapped as BOS ... EOS, and appended to uint16/uint32 shards;
every ceil(1/val_fraction)-th document goes to the held-out `val` split. Files are written
under temporary names and `index.json` last: an interrupted run leaves no dataset behind.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing as mp
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from llama2.data.shards import FORMAT, INDEX, TokenShards, token_dtype, unigram_entropy
from llama2.tokenizer import Tokenizer
from llama2.utils import atomic_write_text

# ------------------------------------------------------------------------------- reading


def _check_inputs(inputs: list[str]) -> None:
    if not inputs:
        raise ValueError("no input corpus given (--input FILE...)")
    for name in inputs:
        if name.startswith("hf:"):
            continue
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: corpus file not found")


def _utf8_lines(path: Path) -> Iterator[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8", newline=None) as f:
            for lineno, line in enumerate(f, 1):  # noqa: B007 (lineno: in the error)
                yield line
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (line {lineno + 1}: {e.reason})") from None
    except (OSError, EOFError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: cannot read ({e})") from None


def iter_text_file(path: str | Path) -> Iterator[str]:
    """Documents of a plain-text file: runs of lines separated by blank lines."""
    doc: list[str] = []
    for line in _utf8_lines(Path(path)):
        if line.strip():
            doc.append(line)
        elif doc:
            yield "".join(doc).rstrip("\n")
            doc = []
    if doc:
        yield "".join(doc).rstrip("\n")


def iter_jsonl_file(path: str | Path, field: str = "text") -> Iterator[str]:
    path = Path(path)
    for lineno, line in enumerate(_utf8_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string {field!r} field")
        yield record[field]


def iter_hf_dataset(spec: str, field: str = "text") -> Iterator[str]:
    """`hf:NAME[:SPLIT]`, streamed."""
    name, _, split = spec[3:].partition(":")
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{spec}: reading Hugging Face datasets needs the `datasets` package "
                         "(pip install datasets)") from None
    for record in datasets.load_dataset(name, split=split or "train", streaming=True):
        yield record[field]


def iter_corpus(inputs: list[str]) -> Iterator[str]:
    """Every document of every input, in order (files are checked before reading any)."""
    _check_inputs(inputs)
    for name in inputs:
        if name.startswith("hf:"):
            yield from iter_hf_dataset(name)
        elif name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
            yield from iter_jsonl_file(name)
        else:
            yield from iter_text_file(name)


# ---------------------------------------------------------------------------- tokenizing
_TOKENIZER: Tokenizer | None = None


def _init_worker(model_proto: bytes) -> None:
    global _TOKENIZER
    _TOKENIZER = Tokenizer(model_proto)


def _encode(docs: list[str]) -> list[list[int]]:
    assert _TOKENIZER is not None
    return _TOKENIZER.encode_batch(docs, bos=True, eos=True)


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        if not isinstance(d, str):
            raise ValueError(f"documents must be strings, got {type(d).__name__}")
        if d.strip():
            batch.append(d)
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


class _ShardWriter:
    """Appends token arrays to `{split}_NNNNN.bin` shards under temporary names."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.files: list[dict[str, Any]] = []
        self.documents = 0
        self._f: Any = None
        self._n = 0

    def tmp_path(self, k: int) -> Path:
        return self.out / f".{self.split}_{k:05d}.bin.tmp"

    def write(self, ids: np.ndarray) -> None:
        self.documents += 1
        while len(ids):
            if self._f is None:
                self._f = open(self.tmp_path(len(self.files)), "wb")
                self._n = 0
            take = ids[: self.shard_tokens - self._n]
            take.astype(self.dtype).tofile(self._f)
            self._n += len(take)
            ids = ids[len(take):]
            if self._n >= self.shard_tokens:
                self._close()

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
            self.files.append({"name": f"{self.split}_{len(self.files):05d}.bin",
                               "tokens": self._n})

    def finish(self) -> dict[str, Any]:
        self._close()
        return {"files": self.files, "tokens": sum(f["tokens"] for f in self.files),
                "documents": self.documents}


def prepare(documents: Iterable[str], tokenizer: Tokenizer | str | os.PathLike,
            out_dir: str | os.PathLike, val_fraction: float = 0.01, workers: int = 0,
            shard_tokens: int = 1 << 28, progress: bool = True,
            sources: list[str] | None = None) -> dict[str, Any]:
    """Tokenize `documents` into a shard folder; return its index (also in out/index.json)."""
    from tqdm import tqdm

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer(tokenizer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.n_words)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    workers = workers or os.cpu_count() or 1
    n_docs = 0
    pool = mp.get_context("fork").Pool(workers, _init_worker, (tok.model_proto,)) \
        if workers > 1 else None
    try:
        if pool is None:
            _init_worker(tok.model_proto)
        batches = _batches(documents, 256)
        encoded = pool.imap(_encode, batches) if pool else map(_encode, batches)
        with tqdm(desc="tokenizing", unit="doc", disable=not progress) as bar:
            for batch in encoded:
                for ids in batch:
                    # Every ceil(1/f)-th document (the first included) is held out.
                    is_val = val_fraction > 0 and \
                        math.ceil((n_docs + 1) * val_fraction) > math.ceil(n_docs * val_fraction)
                    writers["val" if is_val else "train"].write(np.asarray(ids, np.int64))
                    n_docs += 1
                bar.update(len(batch))
        splits = {s: w.finish() for s, w in writers.items()}
        if n_docs == 0:
            raise ValueError(f"empty corpus: no documents in {', '.join(sources or ['input'])}")
        if splits["train"]["tokens"] == 0:
            raise ValueError(f"corpus too small: all {n_docs} documents went to the validation "
                             "split; lower --val-fraction")
        # Publish: drop the old index, move shards into place, tokenizer, index last.
        (out / INDEX).unlink(missing_ok=True)
        for w in writers.values():
            for k, f in enumerate(w.files):
                os.replace(w.tmp_path(k), out / f["name"])
        tok.save(out / "tokenizer.model")
        train = TokenShards([np.memmap(out / f["name"], dtype=dtype, mode="r")
                             for f in splits["train"]["files"]])
        index = {"format": FORMAT, "version": 1, "dtype": dtype.name,
                 "vocab_size": tok.n_words, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                 "tokenizer": "tokenizer.model", "val_fraction": val_fraction,
                 "sources": sources or [], "splits": splits,
                 "unigram_entropy": unigram_entropy(train, tok.n_words)}
        atomic_write_text(out / INDEX, json.dumps(index, indent=2) + "\n")
        return index
    finally:
        if pool is not None:
            pool.terminate()
        for w in writers.values():
            if w._f is not None:
                w._f.close()
        for tmp in out.glob(".*.bin.tmp"):
            tmp.unlink(missing_ok=True)


def prepare_files(inputs: list[str], tokenizer: Tokenizer | str | os.PathLike,
                  out_dir: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
    _check_inputs(inputs)
    return prepare(iter_corpus(inputs), tokenizer, out_dir, sources=list(inputs), **kwargs)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="llama2 prepare",
                                description="Tokenize corpora into pretraining shards.")
    p.add_argument("--input", nargs="+", required=True,
                   help=".txt (blank-line separated documents), .jsonl[.gz] with 'text', "
                        "or hf:NAME[:SPLIT]")
    p.add_argument("--tokenizer", required=True, help="SentencePiece tokenizer.model")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val-fraction", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (0: all cores)")
    p.add_argument("--shard-tokens", type=int, default=1 << 28)
    args = p.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"{args.out}: exists and is not a folder")
    index = prepare_files(args.input, args.tokenizer, args.out, val_fraction=args.val_fraction,
                          workers=args.workers, shard_tokens=args.shard_tokens)
    s = index["splits"]
    print(f"{args.out}: train {s['train']['tokens']:,} tokens ({s['train']['documents']:,} "
          f"docs), val {s['val']['tokens']:,} tokens ({s['val']['documents']:,} docs), "
          f"{index['dtype']}, unigram entropy {index['unigram_entropy']:.3f} nats/token")
