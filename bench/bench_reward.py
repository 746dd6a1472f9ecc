"""Reward-model training throughput: this engine against TRL's RewardTrainer, in one process.

Both sides train the same reward model (the same initial weights: ours is `from_policy` of a
fresh `Transformer`, TRL's is `LlamaForSequenceClassification` loaded from `export_hf` of that
Transformer, with its score head copied) on the same preference pairs in the same order
(HH-RLHF helpful-base test pairs in the chat format, encoded with `encode_pair`, cut to
`--max-len` tokens from the left), with the same batch of pairs, number of steps, AdamW,
gradient clipping at 1.0 and dtype. Our side runs the engine as `train_reward_model` does
(`Trainer` + `EpochSampler` + `make_collate` + `ranking_loss`; no periodic checkpoints, no
progress bar; `make_collate` packs each pair so that the dialog context chosen and rejected
share is computed once: `llama2.reward.pack_pairs`). TRL's side is `RewardTrainer` on the
pre-tokenized pairs (`chosen_ids` / `rejected_ids`) with sequential sampling; its gradient
checkpointing, on by default in `RewardConfig`, is turned OFF here (it recomputes the forward:
not a fair comparison).

Only optimizer steps are timed (a global optimizer step hook, the same for both): from the end
of step `--warmup` to the end of the last step, so startup, warm-up and final saving are
excluded. Tokens are the real (non-pad) tokens of chosen + rejected, counted from each side's
own batches (they are the same batches). Each side runs `--rounds` times, alternating with the
other, and its fastest run counts (other processes may share the cores); process CPU seconds
are printed as a cross-check. Both sides run in this process with the same thread count and
allocator settings: the script re-executes itself with OMP_NUM_THREADS (`--threads`, default 2),
GLIBC_TUNABLES (docs/platform-notes.md) and OMP_WAIT_POLICY (`--omp-wait`, default passive) set.

Config 15M: dim 288, 6 layers, 6 heads, Meta's 32,000-piece tokenizer; tiny: the `tiny` preset
with a 1,024-piece tokenizer trained here by `train_tokenizer`.

    python bench/bench_reward.py [--config 15M|tiny] [--dtype float32|bfloat16|both]
                                 [--batch 8] [--steps 6] [--warmup 1] [--rounds 2] [--max-len 256]
                                 [--threads 2] [--omp-wait passive|active|runtime]
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
SHARED = Path(__file__).resolve().parents[1] / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
HH = SHARED / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"
LLAMA_TOKENIZER = SHARED / "llama2-tokenizer" / "tokenizer.model"


def reexec_with_env(threads: int, omp_wait: str = "passive") -> None:
    """Fix the thread count, the allocator and the OpenMP wait policy before torch starts: the
    same for both sides. PASSIVE waiting keeps 2-thread timings sane when other processes share
    the cores: with spinning waits both sides ran several times slower at load 5, erratically."""
    want = {"OMP_NUM_THREADS": str(threads), "GLIBC_TUNABLES": TUNABLES}
    drop = omp_wait == "runtime"
    if not drop:
        want["OMP_WAIT_POLICY"] = omp_wait.upper()
    if all(os.environ.get(k) == v for k, v in want.items()) and not (
            drop and "OMP_WAIT_POLICY" in os.environ):
        return
    os.environ.update(want)
    if drop:
        os.environ.pop("OMP_WAIT_POLICY", None)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def add_env_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for both sides")
    ap.add_argument("--omp-wait", default="passive", choices=["passive", "active", "runtime"],
                    help="OMP_WAIT_POLICY for both sides (runtime: leave it unset); passive keeps "
                         "2-thread timings sane on a shared machine")


def env_line() -> str:
    import torch

    return (f"threads {torch.get_num_threads()}, OMP_WAIT_POLICY "
            f"{os.environ.get('OMP_WAIT_POLICY', 'default')}, load {os.getloadavg()[0]:.2f}")


def quiet_peers() -> None:
    """Silence the peers' logging and progress bars (they would interleave with ours)."""
    import logging

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def load_tokenizer(config: str, workdir: str):
    """15M: Meta's Llama 2 tokenizer (32,000 pieces); tiny: a 1,024-piece BPE trained here."""
    from llama2.tokenizer import Tokenizer, train_tokenizer

    if config == "15M":
        return Tokenizer(LLAMA_TOKENIZER)
    from llama2.world.adapters import load_hh_rlhf

    texts = [p.chosen for p in load_hh_rlhf(HH)[:1500]]
    return train_tokenizer(texts, Path(workdir) / "tok.model", vocab_size=1024, num_threads=1)


def model_args(config: str, vocab: int):
    from llama2.model import preset

    return preset(config, vocab_size=vocab)


def hf_tokenizer(tok, merges: bool = False, pad_token: str = "<unk>"):
    """A transformers LlamaTokenizer with the same pieces as our SentencePiece model.

    (transformers 5 cannot convert the .model file here: no protobuf.) `merges=True` derives
    the BPE merges so that it encodes text (RLOO needs that); pre-tokenized data does not.
    The pad token is <unk>, not EOS: HF's sequence classifier reads the score at the last
    non-pad token, and our answers end with EOS, where our RM reads it.
    """
    from transformers import LlamaTokenizer

    vocab = {tok.id_to_piece(i): i for i in range(tok.n_words)}
    merge_list = []
    if merges:
        from transformers.tokenization_utils_base import generate_merges

        merge_list = generate_merges(vocab)
    hf = LlamaTokenizer(vocab=vocab, merges=merge_list, add_bos_token=True)
    hf.pad_token = pad_token
    return hf


def step_clock():
    """(wall, process CPU) times at the end of every optimizer step of any torch optimizer
    (TRL's included). CPU seconds are a cross-check when other processes share the cores."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    times: list[tuple[float, float]] = []
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: times.append((time.perf_counter(), time.process_time())))
    return times, handle


def timed_window(times: list[tuple[float, float]], tokens: list[int], warmup: int) -> dict:
    """Wall and CPU seconds and tokens of steps warmup+1 .. last (step i's batch is tokens[i])."""
    n = len(times)
    if n <= warmup or len(tokens) < n:
        raise RuntimeError(f"only {n} steps / {len(tokens)} batches recorded")
    return {"wall": times[n - 1][0] - times[warmup - 1][0],
            "cpu": times[n - 1][1] - times[warmup - 1][1], "tokens": sum(tokens[warmup:n]),
            "per_step": tokens}


def run_ours(rm, items, a, dtype: str, workdir: str) -> dict:
    from llama2.engine import EpochSampler, TrainConfig, Trainer
    from llama2.stages.reward import make_collate, ranking_loss

    tokens: list[int] = []

    def loss_fn(model, batch):
        tokens.append(int(batch["lengths"].sum()))
        return ranking_loss(model, batch, 0.0)

    data = EpochSampler(items, make_collate("none"), shuffle=False)
    cfg = TrainConfig(lr=1e-5, warmup_steps=1, micro_batch_size=a.batch, global_batch=a.batch,
                      max_steps=a.steps, dtype=dtype, save_every=0, log_every=a.steps,
                      progress=False, device="cpu", seed=0)
    times, handle = step_clock()
    try:
        Trainer(rm, loss_fn, data, cfg, Path(workdir) / f"ours_{dtype}").fit()
    finally:
        handle.remove()
    return timed_window(times, tokens, a.warmup)


def run_trl(peer, hf_tok, items, a, dtype: str, workdir: str) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    tokens: list[int] = []
    inner = DataCollatorForPreference(pad_token_id=hf_tok.pad_token_id)

    def collate(examples):
        batch = inner(examples)
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    ds = Dataset.from_dict({"chosen_ids": [i["chosen"] for i in items],
                            "rejected_ids": [i["rejected"] for i in items]})
    args = RewardConfig(
        output_dir=str(Path(workdir) / f"trl_{dtype}"), per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1, max_steps=a.steps, learning_rate=1e-5,
        lr_scheduler_type="constant", max_grad_norm=1.0, max_length=a.max_len,
        activation_checkpointing=False,  # TRL's default is True: off for a fair comparison
        bf16=dtype == "bfloat16", use_cpu=True, report_to=[], logging_steps=10**6,
        save_strategy="no", train_sampling_strategy="sequential", dataloader_num_workers=0,
        disable_tqdm=True, seed=0)
    trainer = RewardTrainer(model=peer, args=args, train_dataset=ds, processing_class=hf_tok,
                            data_collator=collate)
    trainer.remove_callback(PrinterCallback)
    flag = ("is_activation_checkpointing" if hasattr(type(trainer.model), "is_activation_checkpointing")
            else "is_gradient_checkpointing")
    if getattr(trainer.model, flag, False):
        raise RuntimeError("TRL's model still has activation checkpointing on")
    times, handle = step_clock()
    try:
        trainer.train()
    finally:
        handle.remove()
    return timed_window(times, tokens, a.warmup)


def check_same_scores(rm, peer, items, pad_id: int, hf_pad_id: int) -> float:
    """Max |score difference| of the two initial models on one padded batch (same weights)."""
    import torch

    from llama2.reward import pad_right

    seqs = [i["chosen"] for i in items[:4]] + [i["rejected"] for i in items[:4]]
    tokens, last = pad_right(seqs, pad_id)
    hf_tokens, _ = pad_right(seqs, hf_pad_id)
    mask = (torch.arange(tokens.shape[1]).view(1, -1) <= last.view(-1, 1)).long()
    with torch.no_grad():
        torch.nn.init.normal_(rm.score_head.weight, std=0.02)
        peer.score.weight.copy_(rm.score_head.weight)
        ours = rm(tokens, last)
        theirs = peer(input_ids=hf_tokens, attention_mask=mask).logits.squeeze(-1)
        diff = float((ours - theirs).abs().max())
        rm.score_head.weight.zero_()
        peer.score.weight.zero_()
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="15M", choices=["15M", "tiny"])
    ap.add_argument("--dtype", default="both", choices=["float32", "bfloat16", "both"])
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="steps not timed (>= 1)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs per side, alternating ours/TRL; the best of each side counts")
    ap.add_argument("--max-len", type=int, default=256)
    add_env_flags(ap)
    a = ap.parse_args()
    if a.warmup < 1 or a.steps <= a.warmup:
        ap.error("need 1 <= --warmup < --steps")
    reexec_with_env(a.threads, a.omp_wait)

    import random

    import torch
    import transformers
    import trl
    from transformers import LlamaForSequenceClassification

    from llama2 import checkpoint
    from llama2.model import Transformer
    from llama2.reward import from_policy
    from llama2.stages.reward import encode_pair, read_pairs

    torch.set_num_threads(a.threads)
    quiet_peers()
    workdir = tempfile.mkdtemp(prefix="bench_reward_")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # final checkpoints: ~0.2 GB/run
    tok = load_tokenizer(a.config, workdir)
    args = model_args(a.config, tok.n_words)
    args.max_seq_len = max(args.max_seq_len, a.max_len)

    pairs = read_pairs([str(HH)])
    random.Random(0).shuffle(pairs)
    items = [encode_pair(tok, p, a.max_len) for p in pairs[: a.batch * a.steps]]
    hf_tok = hf_tokenizer(tok)

    torch.manual_seed(0)
    base = Transformer(args)
    base.init_weights()
    hf_dir = Path(workdir) / "hf"
    checkpoint.export_hf(base, None, hf_dir)

    def fresh_pair():
        ours = from_policy(copy.deepcopy(base))
        peer = LlamaForSequenceClassification.from_pretrained(hf_dir, num_labels=1,
                                                              dtype=torch.float32)
        peer.config.pad_token_id = hf_tok.pad_token_id
        with torch.no_grad():
            peer.score.weight.copy_(ours.score_head.weight)  # zero, as RewardModel starts
        return ours, peer

    print(f"config {a.config}: dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, "
          f"vocab {args.vocab_size}; batch {a.batch} pairs, max_len {a.max_len}; {a.steps} steps "
          f"per run ({a.warmup} warm-up, not timed), {a.rounds} alternating runs per side, best "
          f"counts; {env_line()}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}")
    print("TRL RewardTrainer: activation/gradient checkpointing OFF (its default is on), "
          "sequential sampling, pre-tokenized pairs; ours: engine Trainer + ranking_loss")
    rm, peer = fresh_pair()
    diff = check_same_scores(rm, peer, items, tok.pad_id, hf_tok.pad_token_id)
    print(f"same initial model: max |score(ours) - score(HF)| = {diff:.2e}")

    dtypes = ["float32", "bfloat16"] if a.dtype == "both" else [a.dtype]
    timed = a.steps - a.warmup
    for dtype in dtypes:
        best: dict[str, dict] = {}
        for r in range(a.rounds):
            rm, peer = fresh_pair()
            run_dir = Path(workdir) / f"{dtype}_{r}"
            runs = {"ours": run_ours(rm, items, a, dtype, run_dir),
                    "TRL": run_trl(peer, hf_tok, items, a, dtype, run_dir)}
            if runs["ours"]["per_step"][: a.steps] != runs["TRL"]["per_step"][: a.steps]:
                print(f"warning: the two sides' batches differ: {runs['ours']['per_step']} vs "
                      f"{runs['TRL']['per_step']}")
            print(f"  {dtype} run {r + 1}: " + ", ".join(
                f"{k} {v['wall'] / timed:.3f} s/step ({v['cpu'] / timed:.2f} CPU-s)"
                for k, v in runs.items()) + f"  [load {os.getloadavg()[0]:.2f}]", flush=True)
            for k, v in runs.items():
                if k not in best or v["wall"] < best[k]["wall"]:
                    best[k] = v
        o, t = best["ours"], best["TRL"]
        tps_o, tps_t = o["tokens"] / o["wall"], t["tokens"] / t["wall"]
        print(f"{dtype:9s} ours {tps_o:8.0f} tok/s   TRL {tps_t:8.0f} tok/s   ratio "
              f"{tps_o / tps_t:.2f}x   (per CPU-second: ours {o['tokens'] / o['cpu']:.0f}, TRL "
              f"{t['tokens'] / t['cpu']:.0f}, ratio {t['cpu'] / o['cpu']:.2f}x)   "
              f"[{o['tokens']} real tokens in {timed} timed steps]", flush=True)


if __name__ == "__main__":
    main()
