"""Model benchmark: this model against transformers' LlamaForCausalLM, same config, same process.

Prints forward+backward tokens/s and generation tokens/s (batch 1 and 16) for both, and the
ratio. The 15M config of llama2.c (dim 288, 6 layers, 6 heads, vocab 32000, seq 256).

Forward+backward is timed twice: the model's logits through the same `F.cross_entropy` on both
sides (the model alone), and a training step's loss as each library computes it (ours: the
trainer's `causal_lm_loss`, the output projection and cross-entropy chunked so the [tokens,
32000] logits never exist whole; transformers: `labels=`, its own loss on the full logits).

Generation is greedy on both sides, without log-probabilities (ours then screens the vocabulary
with an int8 (one sequence) or bf16 (a batch) copy of the output projection and multiplies in
fp32 only the tokens that can be a row's largest logit: `generation.screened_greedy`). Each
generation call makes or reuses the decoding weight copies (model.py: kept between calls while
the weights are unchanged), as the first timed call's warm-up has left them. For generation it
also prints a bound: one decoding step's matrix products alone (every weight read once, through
the same kernels and weight copies `generate` uses), timed back to back, and the ratio to
transformers a generator that did nothing else would reach on this machine now. At batch 1 the
products stream the weights from memory, so the bound moves with the memory bandwidth other
tenants leave.

    python bench/bench_model.py [--dtype float32|bfloat16] [--steps 5] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from llama2 import checkpoint
from llama2.engine.losses import causal_lm_loss
from llama2.generation import generate
from llama2.model import inference_copies, preset, project, screen_weight


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


def products_alone(model, rows: int, steps: int, rounds: int) -> float:
    """Median seconds for `steps` decoding steps' matrix products and nothing else."""
    args = model.args
    x, xh = torch.randn(rows, 1, args.dim), torch.randn(rows, 1, args.ffn_hidden_dim)

    def decode_steps():
        for _ in range(steps):
            for layer in model.layers:
                att, ffn = layer.attention, layer.feed_forward
                project(x, att.wq, att.wk, att.wv)
                project(x, att.wo)
                project(x, ffn.w1, ffn.w3)
                project(xh, ffn.w2)
            if screen is None:
                project(x[:, -1], model.output)
            else:  # greedy decoding screens the vocabulary (generation.screened_greedy)
                screen.logits(x[:, -1])

    with torch.inference_mode(), inference_copies(packed=rows > 1):
        screen = screen_weight(model.output)
        return paired_times(decode_steps, lambda: None, rounds)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5, help="timed forward+backward rounds")
    ap.add_argument("--rounds", type=int, default=5, help="timed generation rounds")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
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
    for batch in (1, 16):
        prompts = torch.randint(3, args.vocab_size, (batch, 16))
        n_new = a.new_tokens

        def gen_ours(prompts=prompts, n_new=n_new):
            generate(ours, prompts.tolist(), max_new_tokens=n_new, eos_id=None, logprobs=False)

        def gen_peer(prompts=prompts, n_new=n_new):
            with torch.inference_mode():
                peer.generate(prompts, max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, pad_token_id=0)

        n = batch * n_new
        t_ours, t_peer = paired_times(gen_ours, gen_peer, a.rounds)
        print(f"generate batch {batch:2d}  ours {n / t_ours:9.0f} tok/s  "
              f"transformers {n / t_peer:9.0f} tok/s  ratio {t_peer / t_ours:.2f}x")
        t_bound = products_alone(ours, batch, n_new, a.rounds)
        print(f"  the matrix products alone {n / t_bound:.0f} tok/s, {t_peer / t_bound:.2f}x")


if __name__ == "__main__":
    main()
