"""CUDA check and throughput: parity with transformers on the GPU, KV-cached generation, and
pretraining tokens/s and MFU in bf16 autocast with the engine's loss and optimizer.

    python bench/bench_gpu.py [--steps 30] [--preset 15M] [--batch 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from llama2 import checkpoint
from llama2.engine import TrainConfig, causal_lm_loss, make_optimizer
from llama2.generation import generate
from llama2.model import ModelArgs, Transformer, preset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--preset", default="15M")
    ap.add_argument("--batch", type=int, default=32)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print("device", dev, torch.cuda.get_device_name() if dev.type == "cuda" else "")

    # 1. Parity with transformers on the device (fp32), GQA config.
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tiny = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300,
                                 multiple_of=16, max_seq_len=128))
    tiny.init_weights(0.1)
    with tempfile.TemporaryDirectory() as d:
        checkpoint.export_hf(tiny, None, d)
        peer = LlamaForCausalLM.from_pretrained(d).to(dev).eval()
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

    # 2. Pretraining throughput, bf16 autocast, fused AdamW.
    args = preset(a.preset)
    model = Transformer(args).to(dev)
    model.init_weights()
    cfg = TrainConfig(lr=3e-4, device=str(dev))
    opt = make_optimizer(model, cfg)
    T = args.max_seq_len
    n_params = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    flops_tok = 6 * n_params + 12 * args.n_layers * args.dim * T
    peak = 989e12 if dev.type == "cuda" else 1e12

    def step() -> float:
        tok = torch.randint(0, args.vocab_size, (a.batch, T + 1), device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss, _ = causal_lm_loss(model, tok[:, :-1], tok[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(3):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    tps = a.steps * a.batch * T / (time.perf_counter() - t0)
    print(f"pretrain {a.preset} bf16 batch {a.batch}x{T}: {tps:,.0f} tokens/s, "
          f"MFU {100 * tps * flops_tok / peak:.1f}% (peak {peak / 1e12:.0f} TFLOP/s), loss {loss:.3f}")

    # 3. Generation throughput.
    model.eval()
    for batch in (1, 16):
        p = torch.randint(3, args.vocab_size, (batch, 16)).tolist()
        generate(model, p, max_new_tokens=8, eos_id=None)
        t0 = time.perf_counter()
        generate(model, p, max_new_tokens=64, eos_id=None)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(f"generate batch {batch}: {batch * 64 / (time.perf_counter() - t0):,.0f} tokens/s")


if __name__ == "__main__":
    main()
