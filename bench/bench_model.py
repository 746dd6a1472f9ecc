"""Model benchmark: this model against transformers' LlamaForCausalLM, same config, same process,
and the decoding workloads against an earlier commit of this project, alternating processes.

Prints forward+backward tokens/s and generation tokens/s (batch 1 and 16) for both, and the
ratio. The 15M config of llama2.c (dim 288, 6 layers, 6 heads, vocab 32000, seq 256).

Forward+backward is timed twice: the model's logits through the same `F.cross_entropy` on both
sides (the model alone), and a training step's loss as each library computes it (ours: the
trainer's `causal_lm_loss`, the output projection and cross-entropy chunked so the [tokens,
32000] logits never exist whole; transformers: `labels=`, its own loss on the full logits).

Generation is greedy on both sides, without log-probabilities, eager (the CPU default); ours
with a held `Decoder` (as the server and `llama2 chat` hold one: its CPU twin, with fused
and packed weights, is built once) and with a new one per call (the twin rebuilt every call).

`--previous COMMIT` (default 4c06921, the design with the CPU weight-copy cache) times the
pipeline's decoding workload (the tiny preset, greedy, prompts of 20-60 tokens, batch 1, 16 and
64, 48 new tokens) and the 15M config at batch 1 and 16 in two processes, one importing this
checkout and one that commit's `src/` (from `git archive`), alternating rounds, same weights.

    python bench/bench_model.py [--dtype float32|bfloat16] [--steps 5] [--new-tokens 64]
        [--previous COMMIT | --previous none] [--ab-rounds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llama2 import checkpoint
from llama2.engine.losses import causal_lm_loss
from llama2.generation import generate
from llama2.model import preset

WORKLOADS = [("tiny", 1), ("tiny", 16), ("tiny", 64), ("15M", 1), ("15M", 16)]


def paired_times(ours, peer, rounds: int) -> tuple[float, float]:
    """Median seconds per call of each, timed alternately (ours, peer, ours, ...) after a
    warm-up, so load that comes and goes on a shared machine hits both sides alike."""
    ours(), peer()
    t_ours, t_peer = [], []
    for _ in range(rounds):
        for fn, out in ((ours, t_ours), (peer, t_peer)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(t_ours), statistics.median(t_peer)


def worker(weights: str, calls: int) -> None:
    """One round of the decoding workloads in this process's `llama2` (this checkout or the
    earlier commit's): prints {workload: median seconds per generate call} as JSON."""
    from llama2.model import Transformer

    out = {}
    for name, batch in WORKLOADS:
        model = Transformer(preset(name)).eval()
        model.load_state_dict(torch.load(f"{weights}/{name}.pt"))
        g = torch.Generator().manual_seed(batch)
        prompts = [[1] + torch.randint(3, model.args.vocab_size, (int(n) - 1,), generator=g).tolist()
                   for n in torch.randint(20, 61, (batch,), generator=g)]
        times = []
        for i in range(calls + 1):
            t0 = time.perf_counter()
            generate(model, prompts, max_new_tokens=48, eos_id=None, logprobs=False)
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
        out[f"{name} batch {batch}"] = statistics.median(times)
    print(json.dumps(out))


def against_previous(commit: str, rounds: int) -> None:
    """The decoding workloads in this checkout and at `commit`, alternating processes."""
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "-C", str(root), "archive", commit, "src"], check=True,
                             capture_output=True).stdout
    old_src = tmp / "previous"
    old_src.mkdir()
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(old_src, filter="data")
    torch.manual_seed(0)
    for name in {w for w, _ in WORKLOADS}:
        model = checkpoint.Transformer(preset(name))
        model.init_weights()
        torch.save(model.state_dict(), tmp / f"{name}.pt")
    sides = {"this checkout": root / "src", commit: old_src / "src"}
    results: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(rounds):
        for label, src in sides.items():
            env = {**os.environ, "PYTHONPATH": str(src)}
            r = subprocess.run([sys.executable, __file__, "--worker", str(tmp)], env=env,
                               capture_output=True, text=True, check=True)
            results[label].append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"decoding, greedy, 48 new tokens: this checkout vs {commit} "
          f"(median of {rounds} alternating rounds, each the median of 3 calls)")
    for key in results["this checkout"][0]:
        new = statistics.median(r[key] for r in results["this checkout"])
        old = statistics.median(r[key] for r in results[commit])
        print(f"  {key:14s}  this {new * 1e3:8.1f} ms  {commit} {old * 1e3:8.1f} ms  "
              f"speed ratio {old / new:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5, help="timed forward+backward rounds")
    ap.add_argument("--rounds", type=int, default=5, help="timed generation rounds")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--previous", default="4c06921",
                    help="commit to time the decoding workloads against ('none': skip)")
    ap.add_argument("--ab-rounds", type=int, default=5)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, calls=3)
    if a.previous != "none":
        against_previous(a.previous, a.ab_rounds)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    args = preset("15M")
    ours = checkpoint.Transformer(args)
    ours.init_weights()
    folder = tempfile.mkdtemp()
    checkpoint.export_hf(ours, None, folder)
    peer = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours, peer = ours.to(dtype), peer.to(dtype)
    print(f"config 15M ({args.num_params() / 1e6:.1f}M params), dtype {a.dtype}, "
          f"threads {torch.get_num_threads()}")

    x = torch.randint(0, args.vocab_size, (a.batch, args.max_seq_len + 1))
    inp, tgt = x[:, :-1], x[:, 1:].contiguous()

    def fb_ours():
        loss = F.cross_entropy(ours(inp).float().flatten(0, 1), tgt.flatten())
        loss.backward()

    def fb_peer():
        logits = peer(input_ids=inp).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        loss.backward()

    def step_ours():
        causal_lm_loss(ours, inp, tgt)[0].backward()

    def step_peer():  # shift_labels: the targets as given, no second shift
        peer(input_ids=inp, labels=tgt, shift_labels=tgt).loss.backward()

    ntok = inp.numel()
    for label, pair in (("forward+backward, logits + F.cross_entropy", (fb_ours, fb_peer)),
                        ("forward+backward, each one's training loss", (step_ours, step_peer))):
        t_ours, t_peer = paired_times(*pair, a.steps)
        print(f"{label}  ours {ntok / t_ours:9.0f} tok/s  transformers "
              f"{ntok / t_peer:9.0f} tok/s  ratio {t_peer / t_ours:.2f}x")

    ours.eval()
    peer.eval()
    from llama2.generation import Decoder  # not in the earlier commit the workers may import

    held = Decoder(ours)  # a caller that decodes many times with fixed weights holds one
    for batch in (1, 16):
        prompts = torch.randint(3, args.vocab_size, (batch, 16))
        n_new = a.new_tokens

        def gen_peer(prompts=prompts, n_new=n_new):
            with torch.inference_mode():
                peer.generate(prompts, max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, pad_token_id=0)

        n = batch * n_new
        for how, decoder in (("held Decoder", held), ("a Decoder per call", None)):
            def gen_ours(prompts=prompts, n_new=n_new, decoder=decoder):
                generate(ours, prompts.tolist(), max_new_tokens=n_new, eos_id=None,
                         logprobs=False, decoder=decoder)

            t_ours, t_peer = paired_times(gen_ours, gen_peer, a.rounds)
            print(f"generate batch {batch:2d}, {how:18s}  ours {n / t_ours:7.0f} tok/s  "
                  f"transformers {n / t_peer:7.0f} tok/s  ratio {t_peer / t_ours:.2f}x")

if __name__ == "__main__":
    main()
