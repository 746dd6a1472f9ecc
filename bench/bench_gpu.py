"""CUDA check and throughput (runs on CPU too, where it checks the same paths, slowly):

1. parity: logits and greedy generation equal transformers' on the device (fp32, GQA config);
2. train: pretraining tokens/s and MFU in bf16 autocast with the engine's loss and optimizer;
3. fsdp: FSDP2 (`fully_shard`) over a one-rank process group (nccl on CUDA, gloo on CPU)
   trains to the same losses as the unsharded model;
4. generate: KV-cached generation tokens/s against transformers' `generate`, same weights.
5. decode: the decode step eager vs compiled (CUDA graphs) at batch 1, for the 15M and a ~1B
   shape, with the share of memory bandwidth the weights' reads take.

    python bench/bench_gpu.py [--sections parity,train,fsdp,generate,decode] [--peak-gbs 3350] [--preset 15M]
        [--dim D --n-layers L --n-heads H --seq T] [--batch 32] [--steps 30] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist

from llama2 import checkpoint
from llama2.engine import TrainConfig, causal_lm_loss, make_optimizer
from llama2.engine.distributed import DistInfo, shard_model
from llama2.engine.trainer import flops_per_token, peak_flops
from llama2.generation import generate
from llama2.model import ModelArgs, Transformer, preset


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def hf_peer(model: Transformer, dev: torch.device):
    """transformers' LlamaForCausalLM with `model`'s weights (through the HF export), on `dev`."""
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as d:
        checkpoint.export_hf(model, None, d)
        return LlamaForCausalLM.from_pretrained(d).to(dev).eval()


def check_parity(dev: torch.device) -> None:
    torch.manual_seed(0)
    tiny = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                                 multiple_of=16, max_seq_len=128))
    tiny.init_weights(0.1)
    peer = hf_peer(tiny, dev)
    tiny = tiny.to(dev).eval()
    x = torch.randint(0, 300, (3, 50), device=dev)
    with torch.no_grad():
        diff = (tiny(x) - peer(x).logits).abs().max().item()
    prompts = [[1, 5, 6, 7], [1, 9]]
    ours = generate(tiny, prompts, max_new_tokens=16, eos_id=None)
    same = all(peer.generate(torch.tensor([p], device=dev), max_new_tokens=16, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0, len(p):].tolist() == t
               for p, t in zip(prompts, ours.tokens))
    print(f"parity on {dev}: max |logits diff| {diff:.2e}; greedy generation equal: {same}")


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, tok: torch.Tensor) -> float:
    with torch.autocast(tok.device.type, dtype=torch.bfloat16):
        loss, _ = causal_lm_loss(model, tok[:, :-1], tok[:, 1:])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def bench_train(args: ModelArgs, dev: torch.device, batch: int, steps: int, compile_: bool,
                label: str) -> None:
    torch.manual_seed(0)
    model = Transformer(args).to(dev)
    model.init_weights()
    if compile_:
        for block in model.layers:
            block.compile()
    opt = make_optimizer(model, TrainConfig(lr=3e-4, device=str(dev)))
    T = args.max_seq_len
    n_params = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    flops_tok, peak = flops_per_token(model, T), peak_flops(dev, "bfloat16")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def tokens() -> torch.Tensor:  # fresh random tokens each step: nothing to memorize
        return torch.randint(0, args.vocab_size, (batch, T + 1), device=dev)

    for _ in range(3):
        train_step(model, opt, tokens())
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = train_step(model, opt, tokens())
    sync(dev)
    tps = steps * batch * T / (time.perf_counter() - t0)
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" \
        if dev.type == "cuda" else ""
    print(f"train {label} ({n_params / 1e6:.0f}M non-embedding params) bf16 batch {batch}x{T}"
          f"{' compiled' if compile_ else ''}: {tps:,.0f} tokens/s, "
          f"MFU {100 * tps * flops_tok / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s{mem}, "
          f"loss {loss:.3f}")


def check_fsdp(dev: torch.device, steps: int = 4) -> None:
    """FSDP2 over a real one-rank process group against the same model unsharded."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = Transformer(ModelArgs(dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                                      vocab_size=512, multiple_of=32, max_seq_len=128)).to(dev)
        plain.init_weights()
        sharded = shard_model(copy.deepcopy(plain), DistInfo(0, 1, 0, dev))
        cfg = TrainConfig(lr=1e-3, device=str(dev))
        opts = [make_optimizer(m, cfg) for m in (plain, sharded)]
        data = torch.randint(0, 512, (8, 129), device=dev)
        losses = [[train_step(m, o, data) for _ in range(steps)]
                  for m, o in zip((plain, sharded), opts)]
        gap = max(abs(a - b) for a, b in zip(*losses))
        kind = type(next(sharded.parameters())).__name__
        print(f"FSDP2 over {backend} (1 rank, {kind} parameters): losses "
              f"{' '.join(f'{v:.4f}' for v in losses[1])}; max gap to unsharded {gap:.1e}")
    finally:
        dist.destroy_process_group()


def bench_generate(args: ModelArgs, dev: torch.device, new_tokens: int = 64) -> None:
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    peer = hf_peer(model, dev)
    model = model.to(dev).eval()
    for batch in (1, 16):
        prompt = torch.randint(3, args.vocab_size, (batch, 16), device=dev)

        def ours(n: int = new_tokens, prompt: torch.Tensor = prompt) -> None:
            generate(model, prompt.tolist(), max_new_tokens=n, eos_id=None, logprobs=False)

        def theirs(n: int = new_tokens, prompt: torch.Tensor = prompt) -> None:
            peer.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, pad_token_id=0)

        times = []
        for fn in (ours, theirs):
            fn(8)
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times.append(time.perf_counter() - t0)
        tok = batch * new_tokens
        print(f"generate batch {batch} (fp32): ours {tok / times[0]:,.0f} tokens/s, transformers "
              f"{tok / times[1]:,.0f} tokens/s, ratio {times[1] / times[0]:.2f}x")


# ~1B parameters: Llama 2's shape at 2048 wide, 22 layers (TinyLlama's size), GQA 32/4.
PRESET_1B = ModelArgs(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000,
                      hidden_dim=5632, max_seq_len=2048)


def bench_decode(dev: torch.device, new_tokens: int = 128, peak_gbs: float | None = None) -> None:
    """Eager vs compiled decode step (generation.Decoder; on CUDA mode="reduce-overhead", CUDA
    graphs) at batch 1, bf16 weights, for the 15M and the ~1B shape: tokens/s and the share of
    the memory bandwidth that reading every weight once per token takes."""
    from llama2.generation import Decoder

    if dev.type != "cuda":
        print("decode: skipped (the CUDA graphs comparison needs a GPU)")
        return
    for name, args in (("15M", preset("15M")), ("~1B", PRESET_1B)):
        torch.manual_seed(0)
        model = Transformer(args)
        model.init_weights()
        model = model.to(dev, torch.bfloat16).eval()
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        prompt = torch.randint(3, args.vocab_size, (1, 16)).tolist()
        rates = {}
        for compiled in (False, True):
            decoder = Decoder(model, compile=compiled)
            t0 = time.perf_counter()
            generate(model, prompt, max_new_tokens=new_tokens, eos_id=None, logprobs=False,
                     decoder=decoder)  # compiles (once a process)
            sync(dev)
            first = time.perf_counter() - t0
            best = math.inf
            for _ in range(3):
                t0 = time.perf_counter()
                generate(model, prompt, max_new_tokens=new_tokens, eos_id=None, logprobs=False,
                         decoder=decoder)
                sync(dev)
                best = min(best, time.perf_counter() - t0)
            rates[compiled] = new_tokens / best
            bw = nbytes * rates[compiled] / 1e9
            share = f", {100 * bw / peak_gbs:.0f}% of {peak_gbs:.0f} GB/s" if peak_gbs else ""
            print(f"decode {name} ({nbytes / 1e9:.2f} GB bf16) batch 1, "
                  f"{'compiled' if compiled else 'eager'}: {rates[compiled]:,.1f} tokens/s "
                  f"(weights read {bw:,.0f} GB/s{share}); first call {first:.1f} s")
        print(f"decode {name}: compiled / eager {rates[True] / rates[False]:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="parity,train,fsdp,generate,decode")
    ap.add_argument("--peak-gbs", type=float, help="the GPU's memory bandwidth, GB/s (H100 SXM 3350)")
    ap.add_argument("--preset", default="15M")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--n-layers", type=int)
    ap.add_argument("--n-heads", type=int)
    ap.add_argument("--seq", type=int, help="training sequence length (max_seq_len)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--compile", action="store_true", help="torch.compile each block")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("device", dev, torch.cuda.get_device_name() if dev.type == "cuda" else "",
          "torch", torch.__version__)
    overrides = {k: v for k, v in (("dim", a.dim), ("n_layers", a.n_layers),
                                   ("n_heads", a.n_heads), ("max_seq_len", a.seq)) if v}
    args = preset(a.preset, **overrides)
    label = a.preset + (f" {overrides}" if overrides else "")
    sections = a.sections.split(",")
    if "parity" in sections:
        check_parity(dev)
    if "train" in sections:
        bench_train(args, dev, a.batch, a.steps, a.compile, label)
    if "fsdp" in sections:
        check_fsdp(dev)
    if "generate" in sections:
        bench_generate(args, dev)
    if "decode" in sections:
        bench_decode(dev, peak_gbs=a.peak_gbs)


if __name__ == "__main__":
    main()
