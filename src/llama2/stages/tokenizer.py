"""The tokenizer stage: a BPE tokenizer trained on the pretraining corpora.

    llama2 tokenizer train --input FILE... --vocab-size N --out tok.model

Trains a SentencePiece BPE model with the Llama settings (paper §2.2: digits split, byte
fallback) on the same corpora `llama2 prepare` reads (.txt, .jsonl[.gz], hf:NAME).
"""

from __future__ import annotations

import argparse
import itertools

from llama2.data.pretrain import iter_corpus
from llama2.tokenizer import train_tokenizer


def main(argv: list[str]) -> None:
    if not argv or argv[0] != "train":
        raise ValueError("usage: llama2 tokenizer train --input FILE... --vocab-size N "
                         "--out tok.model")
    p = argparse.ArgumentParser(prog="llama2 tokenizer train")
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--out", required=True)
    p.add_argument("--max-documents", type=int, default=0,
                   help="train on the first N documents only (0: all)")
    args = p.parse_args(argv[1:])
    if args.vocab_size < 8:
        raise ValueError(f"--vocab-size must be at least 8, got {args.vocab_size}")
    docs = iter_corpus(args.input)
    if args.max_documents:
        docs = itertools.islice(docs, args.max_documents)
    tok = train_tokenizer(docs, args.out, vocab_size=args.vocab_size)
    print(f"{args.out}: {tok.n_words} pieces")
