"""RLHF iteration time: one PPO iteration of this project against one step of TRL's RLOOTrainer.

TRL 1.16 has no PPO trainer (removed upstream); RLOO is its closest on-policy trainer. Both
sides, in this one process (same threads, same allocator settings: the script re-executes
itself with OMP_NUM_THREADS, GLIBC_TUNABLES (docs/platform-notes.md) and OMP_WAIT_POLICY set,
see bench_reward.py), run:

- the same policy weights (a fresh `Transformer`, saved with `checkpoint.save` for ours and
  `export_hf` for TRL's `LlamaForCausalLM`), a frozen reference copy for the KL term (beta 0.01);
- the same two reward models: a Helpfulness and a Safety RM, each the policy's trunk with a
  scalar head (`from_policy` + `save_reward_model` for ours; `LlamaForSequenceClassification`
  with the same trunk and head for TRL, passed as two reward models);
- the same prompts (world prompts, the pool `PPO` loads), `--prompts` per iteration, each
  sampled `--samples` times (ours: the prompt repeated in the batch; TRL: num_generations),
  temperature 1, no top-k/top-p;
- exactly `--new-tokens` new tokens per sample: EOS is disabled on both sides (ours: the
  generator gets eos_id=None; TRL: generation_kwargs min_new_tokens = max_completion_length);
- one optimizer step on all samples (ours: minibatch = batch, 1 PPO epoch, which also trains
  the value model; TRL: per_device_train_batch_size = samples, steps_per_generation 1).

Ours is `PPO.collect(prompts)` + `PPO.update(batch)`, the stage's own code. TRL's step is timed
from the end of one optimizer step to the end of the next (a global optimizer step hook), so it
holds generation, reward, reference and the update, as TRL runs them. The first `--warmup`
iterations of each run are not timed; with `--rounds R` each side runs R times, alternating
with the other. The best timed iteration of each side counts (the runs are short and other
processes may share the cores); the mean is shown too.

The output splits each side's best iteration into generation, the scoring forwards (log-probs
of the policy and the reference, values, reward models) and the update with the rest.

    python bench/bench_rlhf.py [--config 15M|tiny] [--prompts 4] [--samples 4] [--new-tokens 64]
                               [--iterations 3] [--warmup 1] [--rounds 1] [--threads 2]
                               [--omp-wait passive|active|runtime]
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_reward import (
    add_env_flags,
    env_line,
    hf_tokenizer,
    load_tokenizer,
    quiet_peers,
    reexec_with_env,
    step_clock,
)


def build_models(config: str, workdir: Path, seed: int = 0):
    """Policy + two RMs, saved in our formats; the policy also exported for transformers."""
    import torch

    from llama2 import checkpoint
    from llama2.model import Transformer, preset
    from llama2.reward import from_policy, save_reward_model

    tok = load_tokenizer(config, str(workdir))
    torch.manual_seed(seed)
    policy = Transformer(preset(config, vocab_size=tok.n_words))
    policy.init_weights()
    checkpoint.save(policy, tok, workdir / "policy")
    checkpoint.export_hf(policy, tok, workdir / "hf_policy")
    heads = {}
    for kind in ("helpfulness", "safety"):
        rm = from_policy(copy.deepcopy(policy))
        torch.nn.init.normal_(rm.score_head.weight, std=0.02)  # varied rewards, not all 0.5
        save_reward_model(rm, tok, workdir / f"rm_{kind}", kind)
        heads[kind] = rm.score_head.weight.detach().clone()
    return tok, policy.args, heads


class Ours:
    """The PPO stage, built once from the saved checkpoints; `run` times its iterations."""

    def __init__(self, workdir: Path, a, n_prompts: int):
        from llama2.stages.ppo import PPO, PPOConfig

        n = a.prompts * a.samples
        cfg = PPOConfig(model=str(workdir / "policy"), helpful_rm=str(workdir / "rm_helpfulness"),
                        safety_rm=str(workdir / "rm_safety"), out=str(workdir / "ppo"),
                        n_prompts=n_prompts, heldout_prompts=0, batch_prompts=n, minibatch=n,
                        ppo_epochs=1, max_new_tokens=a.new_tokens, beta=0.01, temperature=1.0,
                        device="cpu", seed=0)
        self.a, self.ppo = a, PPO(cfg)
        if len(self.ppo.pool) < n_prompts:
            raise ValueError(f"only {len(self.ppo.pool)} prompts in the pool")

    def run(self, batches: list[list]) -> dict:
        import llama2.respond as gen_mod  # PPO's rollouts: respond() calls generate() there

        gen_times: list[float] = []
        lengths: list[int] = []
        real_generate = gen_mod.generate

        def generate_fixed_length(*args, **kwargs):
            kwargs["eos_id"] = None  # exactly max_new_tokens per sample, like TRL's min_new_tokens
            t0 = time.perf_counter()
            out = real_generate(*args, **kwargs)
            gen_times.append(time.perf_counter() - t0)
            lengths.extend(len(t) for t in out.tokens)
            return out

        gen_mod.generate = generate_fixed_length
        rollout, update = [], []
        try:
            for unique in batches:
                prompts = [p for p in unique for _ in range(self.a.samples)]
                t0 = time.perf_counter()
                batch = self.ppo.collect(prompts)
                t1 = time.perf_counter()
                self.ppo.update(batch)
                t2 = time.perf_counter()
                self.ppo.iteration += 1
                rollout.append(t1 - t0)
                update.append(t2 - t1)
        finally:
            gen_mod.generate = real_generate
        w = self.a.warmup
        return {"iter": [r + u for r, u in zip(rollout, update)][w:], "generate": gen_times[w:],
                "scoring": [r - g for r, g in zip(rollout, gen_times)][w:], "new_tokens": lengths}


def run_trl(workdir: Path, a, tok, heads, prompts) -> dict:
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification, PrinterCallback
    from trl import RLOOConfig, RLOOTrainer

    from llama2.chat import encode_prompt

    hf_tok = hf_tokenizer(tok, merges=True)  # TRL tokenizes prompts and decodes completions
    texts = [tok.decode(encode_prompt(tok, p.dialog)) for p in prompts]
    policy = LlamaForCausalLM.from_pretrained(workdir / "hf_policy", dtype=torch.float32)
    rms = []
    for kind in ("helpfulness", "safety"):
        rm = LlamaForSequenceClassification.from_pretrained(workdir / "hf_policy", num_labels=1,
                                                            dtype=torch.float32)
        with torch.no_grad():
            rm.score.weight.copy_(heads[kind])
        rm.config.pad_token_id = hf_tok.pad_token_id
        rms.append(rm.eval())

    gen_times: list[float] = []
    shapes: list[tuple[int, int, float]] = []
    real_generate = policy.generate

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        out = real_generate(*args, **kwargs)
        gen_times.append(time.perf_counter() - t0)
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        shapes.append((out.shape[1] - ids.shape[1], ids.shape[0], float(mask.sum(1).float().mean())))
        return out

    policy.generate = timed_generate
    scoring: list[float] = []  # per step: no-grad forwards (old/ref log-probs) + reward models
    steps = a.warmup + a.iterations
    args = RLOOConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=a.prompts * a.samples,
        gradient_accumulation_steps=1, num_generations=a.samples,
        max_completion_length=a.new_tokens,
        generation_kwargs={"min_new_tokens": a.new_tokens},  # no early EOS: same length as ours
        temperature=1.0, top_p=1.0, top_k=0, beta=0.01, learning_rate=1e-6,
        lr_scheduler_type="constant", max_grad_norm=1.0, max_steps=steps,
        shuffle_dataset=False, bf16=False, use_cpu=True, activation_checkpointing=False,
        report_to=[], logging_steps=10**6, save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=True, seed=0)
    trainer = RLOOTrainer(model=policy, reward_funcs=rms, args=args,
                          train_dataset=Dataset.from_dict({"prompt": texts}),
                          processing_class=hf_tok, reward_processing_classes=[hf_tok, hf_tok])
    trainer.remove_callback(PrinterCallback)
    real_logps, real_rewards = trainer._get_per_token_logps_and_entropies, trainer._calculate_rewards
    pending = [0.0]

    def timed_logps(*args, **kwargs):
        t0 = time.perf_counter()
        out = real_logps(*args, **kwargs)
        if not torch.is_grad_enabled():  # old/ref log-probs of the rollout, not the loss
            pending[0] += time.perf_counter() - t0
        return out

    def timed_rewards(*args, **kwargs):
        t0 = time.perf_counter()
        out = real_rewards(*args, **kwargs)
        pending[0] += time.perf_counter() - t0
        scoring.append(pending[0])
        pending[0] = 0.0
        return out

    trainer._get_per_token_logps_and_entropies = timed_logps
    trainer._calculate_rewards = timed_rewards
    times, handle = step_clock()
    try:
        trainer.train()
    finally:
        handle.remove()
    if len(times) != steps:
        raise RuntimeError(f"TRL made {len(times)} optimizer steps, expected {steps}")
    walls = [t[0] for t in times]
    return {"iter": [walls[i] - walls[i - 1] for i in range(a.warmup, steps)],
            "generate": gen_times[a.warmup:], "scoring": scoring[a.warmup:], "shapes": shapes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="15M", choices=["15M", "tiny"])
    ap.add_argument("--prompts", type=int, default=4, help="unique prompts per iteration")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt (>= 2 for RLOO)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=3, help="timed iterations per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations per run (>= 1)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs per side, alternating ours/TRL; all timed iterations pooled")
    add_env_flags(ap)
    a = ap.parse_args()
    if a.warmup < 1 or a.iterations < 1 or a.samples < 2:
        ap.error("need --warmup >= 1, --iterations >= 1, --samples >= 2")
    reexec_with_env(a.threads, a.omp_wait)

    import torch
    import transformers
    import trl

    torch.set_num_threads(a.threads)
    quiet_peers()
    workdir = Path(tempfile.mkdtemp(prefix="bench_rlhf_"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    tok, args, heads = build_models(a.config, workdir)
    n = a.prompts * a.samples
    print(f"config {a.config}: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, vocab "
          f"{args.vocab_size}; {a.prompts} prompts x {a.samples} samples = {n} completions of "
          f"{a.new_tokens} tokens per iteration; {a.warmup} warm-up + {a.iterations} timed "
          f"iterations per run, {a.rounds} run(s) per side; {env_line()}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}", flush=True)

    steps = a.warmup + a.iterations
    ours_side = Ours(workdir, a, steps * a.prompts)
    used = ours_side.ppo.pool[: steps * a.prompts]
    batches = [used[i * a.prompts:(i + 1) * a.prompts] for i in range(steps)]
    runs: dict[str, list[dict]] = {"ours": [], "TRL": []}
    for r in range(a.rounds):
        runs["ours"].append(ours_side.run(batches))
        runs["TRL"].append(run_trl(workdir, a, tok, heads, used))
        print(f"  round {r + 1}: " + ", ".join(f"{k} {statistics.mean(v[-1]['iter']):.3f} s/iteration"
                                               for k, v in runs.items())
              + f" [load {os.getloadavg()[0]:.2f}]", flush=True)

    from llama2.chat import encode_prompt

    ours_new = {n for run in runs["ours"] for n in run["new_tokens"]}
    trl_new = {s[0] for run in runs["TRL"] for s in run["shapes"]}
    ours_prompt = statistics.mean(len(encode_prompt(tok, p.dialog)) for p in used)
    trl_prompt = statistics.mean(s[2] for s in runs["TRL"][0]["shapes"])
    print(f"new tokens per sample: ours {sorted(ours_new)}, TRL {sorted(trl_new)}; mean prompt "
          f"tokens: ours {ours_prompt:.1f}, TRL {trl_prompt:.1f} (TRL re-tokenizes the prompt text)")
    print("s/iteration   best    mean   [best iteration: generate | scoring forwards | update+rest]")
    best, mean = {}, {}
    for k, note in (("ours", "scoring: old+ref log-probs, values, 2 RMs; update: policy + value"),
                    ("TRL", "scoring: old+ref log-probs, 2 RMs; update: policy")):
        its = [(it, g, sc) for run in runs[k] for it, g, sc in
               zip(run["iter"], run["generate"], run["scoring"])]
        it, g, sc = min(its)
        best[k], mean[k] = (it, g), statistics.mean(x[0] for x in its)
        print(f"{k:6s}  {it:8.3f} {mean[k]:7.3f}   [{g:.3f} | {sc:.3f} | {it - g - sc:.3f}]  ({note})")
    print(f"ratio TRL/ours: {best['TRL'][0] / best['ours'][0]:.2f}x per iteration (best), "
          f"{mean['TRL'] / mean['ours']:.2f}x (mean); generate (best iterations) "
          f"{best['TRL'][1] / best['ours'][1]:.2f}x")


if __name__ == "__main__":
    main()
