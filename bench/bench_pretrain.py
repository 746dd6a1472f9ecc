"""Pretraining throughput and memory: this engine vs a plain transformers + AdamW loop.

Same model (llama2.c's 15M config: dim 288, 6 layers, 6 heads, vocab 32000, seq 256),
same batch, fp32 and bf16 autocast. The plain loop is what a user writes first:
`LlamaForCausalLM(input_ids, labels=...)` (full [B*T, 32000] fp32 logits and
cross-entropy), `torch.optim.AdamW` with its default (per-parameter) CPU kernel, clipping
at 1.0. The engine runs its real `Trainer` (chunked linear+CE that never materializes the
full logits, fused AdamW, the same clipping and schedule).

Speed: both loops in this one process, their steps interleaved (A B A B ...), so they
share the allocator and the machine's load (the project's machines are shared); the
median step time of each. Memory: each loop alone in a child process, peak RSS above the
RSS before its model was built. The benchmark re-executes itself with GLIBC_TUNABLES set
as in docs/platform-notes.md (glibc's default malloc costs up to 1.8x in training speed)
unless it is already set, so both loops, and all children, run with the same allocator.
Bound: the work no engine can skip (matrix products, attention, the cross-entropy's softmax,
the AdamW step), each timed alone at its best, summed: a step faster than any engine could run
here, printed as a ratio against the plain loop.

    python bench/bench_pretrain.py [--batch 8] [--steps 10] [--warmup 3] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
SEQ = 256


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    # VmHWM belongs to this process image; ru_maxrss would carry over the parent's
    # high-water mark through fork + exec.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model_args():
    from llama2.model import preset

    return preset("15M")  # dim 288, 6 layers, 6 heads, vocab 32000, max_seq_len 256


class Plain:
    """The first loop a user writes with transformers: full logits, default AdamW."""

    def __init__(self, batch: int, dtype: str):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        a = _model_args()
        cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim,
                          intermediate_size=a.ffn_hidden_dim, num_hidden_layers=a.n_layers,
                          num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                          max_position_embeddings=a.max_seq_len, rms_norm_eps=a.norm_eps,
                          rope_theta=a.rope_theta, tie_word_embeddings=False)
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(cfg).train()
        self.model.config._attn_implementation = "sdpa"
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, betas=(0.9, 0.95),
                                     eps=1e-5, weight_decay=0.1)
        self.data = iter(_batches(batch, a.vocab_size))
        self.dtype = dtype

    def step(self) -> float:
        import torch

        x = next(self.data)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bfloat16"):
            loss = self.model(input_ids=x[:, :-1], labels=x[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())


class Engine:
    """This project's Trainer, driven one optimizer step at a time."""

    def __init__(self, batch: int, dtype: str, compile_: bool = False):
        import torch

        from llama2.engine import TrainConfig, Trainer, lm_loss_fn
        from llama2.engine.data import IndexedStream
        from llama2.model import Transformer

        a = _model_args()
        data = _batches(batch, a.vocab_size)

        class Synthetic(IndexedStream):
            seq_len = SEQ

            def make_batch(self, indices: list[int]) -> dict:
                x = next(data)
                return {"tokens": x[:, :-1], "targets": x[:, 1:]}

        torch.manual_seed(0)
        model = Transformer(a)
        model.init_weights()
        cfg = TrainConfig(lr=3e-4, warmup_steps=2, max_steps=10**6, micro_batch_size=batch,
                          dtype=dtype, progress=False, compile=compile_, device="cpu")
        self._dir = tempfile.TemporaryDirectory()
        self.trainer = Trainer(model, lm_loss_fn, Synthetic(), cfg, self._dir.name,
                               seq_len=SEQ)
        self.trainer.setup()

    def step(self) -> float:
        return self.trainer.train_step()["loss"]


def _batches(batch: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, vocab, (batch, SEQ + 1), generator=g)


def _make(kind: str, batch: int, dtype: str) -> Plain | Engine:
    if kind == "plain":
        return Plain(batch, dtype)
    return Engine(batch, dtype, compile_=kind == "engine+compile")


def child_memory(kind: str, batch: int, steps: int, dtype: str) -> dict:
    """Alone in a fresh process: peak RSS above the RSS before the model was built."""
    import torch  # noqa: F401 (imported before the baseline)

    if kind == "plain":
        import transformers  # noqa: F401
    base = _rss_mb()
    loop = _make(kind, batch, dtype)
    for _ in range(steps):
        loop.step()
    return {"peak_mb": _maxrss_mb() - base}


def _child(args: argparse.Namespace, kind: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--dtype", dtype, "--batch",
           str(args.batch), "--steps", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if out.returncode:
        raise SystemExit(f"{kind} {dtype} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(args: argparse.Namespace, kinds: list[str], dtype: str) -> dict[str, float]:
    """Tokens/s of each loop in this one process, steps interleaved (A B A B ...) so that
    both see the same machine load; the median step time of each."""
    loops = {k: _make(k, args.batch, dtype) for k in kinds}
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for i in range(args.warmup + args.steps):
        for k, loop in loops.items():
            t0 = time.perf_counter()
            loop.step()
            if i >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: args.batch * SEQ / statistics.median(v) for k, v in times.items()}


def step_bound(batch: int, dtype: str) -> float:
    """Seconds one training step needs at least on this machine: the sum of the work no engine
    can skip, each piece timed alone at its best (min of repeats, outputs preallocated): the
    matrix products (forward, input and weight gradients of every linear layer and of the
    vocabulary projection), attention forward+backward (the fastest of SDPA's kernels and a
    plain matmul-softmax-matmul), the cross-entropy's softmax over the [tokens, vocab] logits
    (log-softmax and its exp, in place, fp32) and the fused AdamW step. Everything else (norms,
    rotary, SwiGLU, casts) counts as free, so bound / the plain loop's step time is more than
    any engine could show here."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dt = getattr(torch, dtype)
    a = _model_args()
    n, d, h, v = batch * SEQ, a.dim, a.ffn_hidden_dim, a.vocab_size
    kv = a.n_kv_heads * a.head_dim

    def best(f, reps: int = 8) -> float:
        f()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    def mm(m: int, k: int, cols: int) -> float:
        x, y = torch.randn(m, k, dtype=dt), torch.randn(k, cols, dtype=dt)
        out = torch.empty(m, cols, dtype=dt)
        return best(lambda: torch.mm(x, y, out=out))

    layer = sum(mm(n, i, o) + mm(n, o, i) + mm(o, n, i)  # forward, grad input, grad weight
                for i, o in ((d, d + 2 * kv), (d, d), (d, 2 * h), (h, d)))
    head = mm(n, d, v) + mm(n, v, d) + mm(v, n, d)
    q = torch.randn(batch, a.n_heads, SEQ, a.head_dim, dtype=dt, requires_grad=True)
    k, val = (torch.randn(batch, a.n_heads, SEQ, a.head_dim, dtype=dt, requires_grad=True)
              for _ in range(2))
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()

    def sdpa(backend: SDPBackend) -> float:
        with sdpa_kernel(backend):
            return best(lambda: F.scaled_dot_product_attention(q, k, val, is_causal=True)
                        .sum().backward())

    def plain() -> None:
        s = (q @ k.transpose(-1, -2) * a.head_dim ** -0.5).masked_fill(~causal, float("-inf"))
        (torch.softmax(s.float(), -1).to(dt) @ val).sum().backward()

    attention = min(sdpa(SDPBackend.FLASH_ATTENTION), sdpa(SDPBackend.MATH), best(plain))
    logits = torch.randn(n, v)
    softmax = best(lambda: torch.log_softmax(logits, -1, out=logits).exp_())
    params = [torch.zeros(p.shape) for p in _plain_params()]
    grads, m1, m2 = ([torch.zeros_like(p) for p in params] for _ in range(3))
    steps = [torch.tensor(1.0) for _ in params]
    adamw = best(lambda: torch._fused_adamw_(params, grads, m1, m2, [], steps, lr=1e-4,
                                             beta1=0.9, beta2=0.95, weight_decay=0.1, eps=1e-5,
                                             amsgrad=False, maximize=False))
    return a.n_layers * (layer + attention) + head + softmax + adamw


def _plain_params():
    """The parameter shapes of the 15M model, without building it."""
    import torch

    from llama2.model import Transformer

    with torch.device("meta"):
        return list(Transformer(_model_args()).parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--compile", action="store_true", help="also time the engine compiled")
    p.add_argument("--child", choices=["plain", "engine"], help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child_memory(args.child, args.batch, args.steps, args.dtype)))
        return
    if os.environ.get("GLIBC_TUNABLES") is None:  # same allocator for both, set before start
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "GLIBC_TUNABLES": TUNABLES})
    import torch

    from llama2.engine.trainer import flops_per_token, peak_flops
    from llama2.model import Transformer

    with torch.device("meta"):
        fpt = flops_per_token(Transformer(_model_args()), SEQ)
    print(f"15M config (dim 288, 6 layers, 6 heads, vocab 32000), batch {args.batch} x {SEQ} "
          f"tokens, {torch.get_num_threads()} threads, GLIBC_TUNABLES="
          f"{os.environ['GLIBC_TUNABLES']}")
    print(f"{'dtype':<9} {'loop':<16} {'tokens/s':>9} {'MFU':>6} {'peak MB':>8}")
    kinds = ["plain", "engine"] + (["engine+compile"] if args.compile else [])
    for dtype in args.dtypes.split(","):
        peak = peak_flops(torch.device("cpu"), dtype)
        mem = {k: _child(args, k, dtype)["peak_mb"] for k in ("plain", "engine")}
        tps = speed(args, kinds, dtype)
        for k in kinds:
            name = "transformers" if k == "plain" else k
            m = f"{mem[k]:>8,.0f}" if k in mem else f"{'-':>8}"
            print(f"{dtype:<9} {name:<16} {tps[k]:>9,.0f} {tps[k] * fpt / peak:>6.1%} {m}")
        print(f"{dtype:<9} engine/transformers: {tps['engine'] / tps['plain']:.2f}x tokens/s, "
              f"{mem['engine'] / mem['plain']:.2f}x peak memory")
        bound = args.batch * SEQ / step_bound(args.batch, dtype)
        print(f"{dtype:<9} bound: the work no engine can skip allows at most {bound:,.0f} "
              f"tokens/s = {bound / tps['plain']:.2f}x transformers")
        if args.compile:
            print(f"{dtype:<9} engine+compile/transformers: "
                  f"{tps['engine+compile'] / tps['plain']:.2f}x tokens/s")


if __name__ == "__main__":
    main()
