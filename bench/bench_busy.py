"""A busy machine: training (and decoding) steps with one core taken by another program, against
the idle machine, under llama2's thread settings (`llama2.runtime.configure`: threads for the
cores not kept busy, a short OpenMP spin; also with a load that starts after the process, which
then keeps its threads) and under torch's defaults.

Each measurement is a fresh child process (thread pools and the OpenMP wait policy are fixed
when torch loads); the busy program is a Python loop started before the child. The tiny preset,
fp32: a training step at batch 16 x 256 (AdamW) and a greedy 16-prompt, 48-token decode.

    python bench/bench_busy.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, os, statistics, sys, time
if sys.argv[1].startswith("llama2"):
    from llama2 import runtime
    if sys.argv[1] == "llama2, load after start":  # the sample saw no busy core
        runtime.busy_cpus = lambda cpus: 0
    runtime.configure()
import torch
from llama2.engine.losses import causal_lm_loss
from llama2.generation import generate
from llama2.model import Transformer, preset
torch.manual_seed(0)
m = Transformer(preset("tiny")); m.init_weights()
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
x = torch.randint(0, 1024, (16, 257))
def step():
    causal_lm_loss(m, x[:, :-1], x[:, 1:].contiguous())[0].backward()
    opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(3): step()
ts = []
for _ in range(12):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
m.eval()
g = torch.Generator().manual_seed(16)
prompts = [[1] + torch.randint(3, 1024, (int(n) - 1,), generator=g).tolist()
           for n in torch.randint(20, 61, (16,), generator=g)]
generate(m, prompts, max_new_tokens=48, eos_id=None, logprobs=False)
gs = []
for _ in range(5):
    t = time.perf_counter(); generate(m, prompts, max_new_tokens=48, eos_id=None, logprobs=False)
    gs.append(time.perf_counter() - t)
print(json.dumps({"train": statistics.median(ts) * 1e3, "decode": statistics.median(gs) * 1e3,
                  "threads": torch.get_num_threads()}))
"""

SETTINGS = ("llama2", "llama2, load after start", "torch defaults")


def measure(settings: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", CHILD, settings], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for machine in ("idle", "busy"):
            busy = (subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    if machine == "busy" else None)
            time.sleep(0.5 if busy else 0)
            try:
                for settings in SETTINGS:
                    results.setdefault((settings, machine), []).append(measure(settings))
            finally:
                if busy:
                    busy.kill()
    print(f"tiny preset, fp32, {os.cpu_count()} cores; median of {args.rounds} rounds "
          "(ms; threads used)")
    for settings in SETTINGS:
        med = {m: {k: statistics.median(r[k] for r in results[(settings, m)])
                   for k in ("train", "decode", "threads")} for m in ("idle", "busy")}
        idle, busy = med["idle"], med["busy"]
        print(f"  {settings:25s} train step idle {idle['train']:6.0f} ({idle['threads']:.0f}), "
              f"one core busy {busy['train']:6.0f} ({busy['threads']:.0f}): "
              f"{busy['train'] / idle['train']:.2f}x; decode idle {idle['decode']:5.0f}, "
              f"busy {busy['decode']:5.0f}: {busy['decode'] / idle['decode']:.2f}x")


if __name__ == "__main__":
    main()
