"""Load benchmark of `llama2 serve`: N concurrent streaming clients, batched against one at a time.

Starts `llama2 serve` (a subprocess, so clients and server do not share a GIL, on a free local
port) twice on the same tiny model: with --max-batch-size 1 (requests served one after
another) and with --max-batch-size N (requests batched into shared `generate` calls). Each
time, N httpx clients stream one chat completion each, all at once. Prints throughput
(completion tokens/s over the wall time), p50/p99 time to first token (first content delta,
not the role chunk sent on admission), p50 total latency, and the speedup of batching.

    python bench/bench_serve.py [--model PATH] [--clients 16] [--max-tokens 64] [--threads 1]

Without --model it uses ../shared/data/tinyllamas-stories260K/stories260K.bin when present,
else a random tiny model (native checkpoint) with a freshly trained tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

import llama2

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO.parent / "shared" / "data" / "tinyllamas-stories260K" / "stories260K.bin"
TOPICS = ["a cat", "a dog", "a bird", "a fish", "a tree", "the sun", "a ball", "a boat", "a girl",
          "a boy", "the sea", "a cake", "a frog", "a bear", "a car", "the moon"]


@dataclass
class Result:
    wall: float
    tokens: int
    ttft: list[float]
    latency: list[float]


def tiny_random_model(folder: str) -> str:
    from llama2.model import ModelArgs, Transformer
    from llama2.tokenizer import train_tokenizer

    texts = [f"{t} went to see {u} and they played all day long." for t in TOPICS for u in TOPICS]
    tok = train_tokenizer(texts, Path(folder) / "tokenizer.model", vocab_size=300, num_threads=1)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=tok.n_words,
                                  max_seq_len=256))
    llama2.save(model, tok, Path(folder) / "model")
    return str(Path(folder) / "model")


@contextlib.contextmanager
def serve(model: str, batch: int, clients: int, threads: int) -> Iterator[str]:
    """`llama2 serve` in a subprocess; yields its base URL once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("LLAMA2_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "llama2.cli", "serve", "--model", model,
                             "--port", str(port), "--max-batch-size", str(batch), "--max-queue",
                             str(clients), "--threads", str(threads), "--log-level", "warning"],
                            env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/health", timeout=2).raise_for_status()
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def one_client(c: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[float, float, int]:
    body = {"messages": [{"role": "user", "content": f"Tell me a story about {TOPICS[i % 16]}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    return first or float("nan"), time.perf_counter() - t0, tokens


async def load(url: str, clients: int, max_tokens: int) -> Result:
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        # Warm-up: open all the connections (and pay first-call costs) before timing.
        await asyncio.gather(*(one_client(c, i, 2) for i in range(clients)))
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one_client(c, i, max_tokens) for i in range(clients)))
        wall = time.perf_counter() - t0
    return Result(wall, sum(r[2] for r in runs), [r[0] for r in runs], [r[1] for r in runs])


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="the server's torch threads (1 suits tiny models; `llama2 serve` picks "
                    "1 for them by itself)")
    a = ap.parse_args()
    model = a.model or (str(STORIES) if STORIES.is_file() else tiny_random_model(tempfile.mkdtemp()))
    args = llama2.load(model).args
    print(f"model: {args.num_params() / 1e6:.2f}M parameters, context {args.max_seq_len}; "
          f"{a.clients} concurrent streaming clients, max_tokens {a.max_tokens}, greedy, "
          f"torch threads {a.threads}")
    results: dict[int, Result] = {}
    for batch in (1, a.clients):
        with serve(model, batch, a.clients, a.threads) as url:
            results[batch] = r = asyncio.run(load(url, a.clients, a.max_tokens))
        print(f"max-batch-size {batch:>3}: {r.tokens} tokens in {r.wall:6.2f} s = "
              f"{r.tokens / r.wall:8.1f} tokens/s | first token p50 {pct(r.ttft, 0.5) * 1e3:7.0f} ms"
              f"  p99 {pct(r.ttft, 0.99) * 1e3:7.0f} ms | latency p50 "
              f"{statistics.median(r.latency) * 1e3:7.0f} ms")
    one, many = results[1], results[a.clients]
    print(f"batching speedup: {(many.tokens / many.wall) / (one.tokens / one.wall):.1f}x throughput, "
          f"{pct(one.ttft, 0.5) / pct(many.ttft, 0.5):.1f}x lower median time to first token")


if __name__ == "__main__":
    main()
