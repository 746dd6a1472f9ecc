"""Model tools on the command line: `llama2 convert` and `llama2 generate`."""

from __future__ import annotations

import argparse
import sys

import torch

from llama2 import checkpoint
from llama2.respond import respond

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_sampling_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)


def load_for_inference(path: str, tokenizer: str | None = None, dtype: str = "float32",
                       device: str = "auto") -> checkpoint.Loaded:
    from llama2.utils import resolve_device

    loaded = checkpoint.load(path, dtype=DTYPES[dtype], tokenizer=tokenizer,
                             device=resolve_device(device))
    if loaded.tokenizer is None:
        raise ValueError(f"{path}: no tokenizer.model found beside the checkpoint "
                         "(pass --tokenizer PATH)")
    return loaded


def main_convert(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="llama2 convert",
                                 description="Convert a checkpoint (HF, Meta, llama2.c, native).")
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--to", choices=["hf", "native"], default="native")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    a = ap.parse_args(argv)
    loaded = checkpoint.load(a.src, dtype=DTYPES[a.dtype], tokenizer=a.tokenizer)
    if a.to == "hf":
        checkpoint.export_hf(loaded.model, loaded.tokenizer, a.dst)
    else:
        checkpoint.save(loaded.model, loaded.tokenizer, a.dst)
    print(f"wrote {a.to} checkpoint to {a.dst} ({loaded.format} -> {a.to}, "
          f"{loaded.args.num_params() / 1e6:.2f}M parameters)")


def main_generate(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="llama2 generate", description="Continue text prompts.")
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--prompt", action="append", default=None,
                    help="a prompt (repeat for a batch); empty = start from BOS")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--device", default="auto")
    add_sampling_args(ap)
    a = ap.parse_args(argv)
    from llama2.engine import distributed

    distributed.init(a.device)  # under torchrun: the ranks share the prompts
    loaded = load_for_inference(a.model, a.tokenizer, a.dtype, a.device)
    tok = loaded.tokenizer
    texts = a.prompt or [""]
    prompts = [tok.encode(t, bos=True) for t in texts]
    stream = len(prompts) == 1 and sys.stdout.isatty()
    if stream:
        sys.stdout.write(tok.decode(prompts[0]))

    def show(row: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    # A continuation is decoded after its prompt's last tokens, so prompt + continuation read
    # as one text (SentencePiece drops a leading space otherwise).
    answers = respond(loaded.model, tok, prompts, a.max_new_tokens, format="text",
                      temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
                      fit="shrink", stream=show if stream else None, max_batch_tokens=None,
                      full=True)
    if stream:
        print()
        return
    for answer in answers:
        print(tok.decode(answer.prompt) + answer.text)
        if len(texts) > 1:
            print("-" * 40)
