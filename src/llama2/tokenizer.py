"""SentencePiece tokenizer: the Llama 2 one, or a new BPE model trained with Llama's settings."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    """Encode/decode with a SentencePiece model (file path or serialized bytes)."""

    def __init__(self, model: str | os.PathLike | bytes):
        if isinstance(model, (str, os.PathLike)):
            path = Path(model)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: tokenizer model not found")
            model = path.read_bytes()
        self.model_proto: bytes = model
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model)
        except Exception as e:  # sentencepiece raises a bare RuntimeError/OSError
            raise ValueError(f"not a SentencePiece model: {e}") from None
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        # Llama's tokenizer has no pad piece (pad_id -1); padding uses EOS and a mask.
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        out = self.sp.encode(texts)
        return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))

    def save(self, path: str | os.PathLike) -> None:
        from llama2.utils import atomic_write

        atomic_write(path, lambda tmp: Path(tmp).write_bytes(self.model_proto))


def train_tokenizer(
    texts: Iterable[str] | Iterator[str],
    out_path: str | os.PathLike,
    vocab_size: int = 32000,
    max_sentence_length: int = 16384,
    input_sentence_size: int = 2_000_000,
    num_threads: int | None = None,
) -> Tokenizer:
    """Train a BPE SentencePiece model with the Llama settings (paper §2.2).

    Digits are split into single digits, unknown UTF-8 falls back to bytes, text is not
    normalized, whitespace-only pieces are allowed; ids: unk 0, bos 1, eos 2, no pad.
    `texts` is any iterable of documents (lines of a corpus). The model is written to
    `out_path` atomically and returned.
    """
    buf = io.BytesIO()
    n_docs = 0

    def sentences() -> Iterator[str]:
        nonlocal n_docs
        for t in texts:
            for line in t.split("\n"):
                if line.strip():
                    n_docs += 1
                    yield line

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=buf,
            model_type="bpe",
            vocab_size=vocab_size,
            split_digits=True,
            byte_fallback=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            character_coverage=0.99995,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            hard_vocab_limit=False,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as e:
        if n_docs == 0:
            raise ValueError("cannot train a tokenizer on an empty corpus") from None
        raise ValueError(f"tokenizer training failed: {str(e).splitlines()[0]}") from None
    tok = Tokenizer(buf.getvalue())
    tok.save(out_path)
    return tok
