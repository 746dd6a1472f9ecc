"""Pretraining (recipe §1, paper §2.2): the stage that trains the base model on token shards.

    llama2 pretrain --config configs/pretrain_tiny.toml [--section.key value ...] [--resume]

Next-token prediction on random windows of a prepared token-shard dataset, with the engine's
AdamW / cosine / clipping settings. The data is either a folder made by `llama2 prepare`
(`data.dataset`) or raw corpora (`data.input`), prepared into run_dir/data on first use, with
a tokenizer trained on them when `data.tokenizer` is empty. Under `torchrun --nproc_per_node N`
the same command trains with FSDP2. The result: run_dir/{config.json, metrics.jsonl,
checkpoints/, summary.json, model/}.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

from llama2 import config as config_mod
from llama2.engine import TrainConfig, Trainer, distributed, lm_loss_fn
from llama2.model import ModelArgs, Transformer, preset


@dataclass
class ModelSection:
    """A preset plus overrides of its ModelArgs fields (None keeps the preset's value)."""

    preset: str = "tiny"
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    n_kv_heads: int | None = None
    vocab_size: int | None = None  # None: the tokenizer's size
    multiple_of: int | None = None
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None
    norm_eps: float | None = None
    rope_theta: float | None = None
    max_seq_len: int | None = None

    def build_args(self, vocab_size: int) -> ModelArgs:
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                     if f.name != "preset" and getattr(self, f.name) is not None}
        if overrides.setdefault("vocab_size", vocab_size) != vocab_size:
            raise ValueError(f"model.vocab_size is {overrides['vocab_size']} but the tokenizer "
                             f"has {vocab_size} pieces (leave model.vocab_size unset)")
        return preset(self.preset, **overrides)


@dataclass
class DataSection:
    dataset: str = ""  # a folder written by `llama2 prepare`
    input: list[str] = field(default_factory=list)  # or raw corpora (.txt/.jsonl/hf:NAME)
    tokenizer: str = ""  # tokenizer for `input`; empty: train one of model's vocab size
    tokenizer_vocab_size: int = 0  # 0: the preset's vocab_size
    val_fraction: float = 0.01
    seq_len: int = 256
    doc_mask: bool = False  # attention within documents only (otherwise across, like GPT)
    eval_windows: int = 0  # cap on held-out windows (0: the whole val split)
    workers: int = 0


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainConfig = field(default_factory=TrainConfig)


def _dataset_dir(cfg: PretrainConfig, info: distributed.DistInfo) -> Path:
    """The prepared dataset folder; prepares data.input into run_dir/data on rank 0."""
    from llama2.data.pretrain import _check_inputs, iter_corpus, prepare
    from llama2.data.shards import INDEX

    if cfg.data.dataset:
        if cfg.data.input:
            raise ValueError("set only one of data.dataset and data.input")
        return Path(cfg.data.dataset)
    if not cfg.data.input:
        raise ValueError("no training data: set data.dataset (a `llama2 prepare` folder) or "
                         "data.input (corpus files)")
    out = Path(cfg.run_dir) / "data"
    if info.is_main and not (out / INDEX).is_file():
        _check_inputs(cfg.data.input)
        tok_path = cfg.data.tokenizer
        if not tok_path:
            from llama2.tokenizer import train_tokenizer

            vocab = cfg.data.tokenizer_vocab_size or cfg.model.vocab_size or \
                preset(cfg.model.preset).vocab_size
            tok_path = str(out / "tokenizer.model")
            print(f"training a {vocab}-piece tokenizer on {', '.join(cfg.data.input)}",
                  file=sys.stderr)
            train_tokenizer(itertools.islice(iter_corpus(cfg.data.input), 200_000), tok_path,
                            vocab_size=vocab)
        prepare(iter_corpus(cfg.data.input), tok_path, out, val_fraction=cfg.data.val_fraction,
                workers=cfg.data.workers, progress=cfg.train.progress,
                sources=list(cfg.data.input))
    distributed.barrier(info)
    return out


def run(cfg: PretrainConfig) -> Trainer:
    """Pretrain as configured; returns the finished Trainer (history, run_dir)."""
    from llama2.data.shards import TokenShards, WindowSampler, eval_sampler, read_index
    from llama2.tokenizer import Tokenizer
    from llama2.utils import seed_everything

    info = distributed.init(cfg.train.device)
    data_dir = _dataset_dir(cfg, info)
    index = read_index(data_dir)
    tokenizer = Tokenizer(data_dir / index["tokenizer"])
    args = cfg.model.build_args(tokenizer.n_words)
    seq = cfg.data.seq_len
    if seq > args.max_seq_len:
        raise ValueError(f"data.seq_len {seq} exceeds model.max_seq_len {args.max_seq_len}")
    train = WindowSampler(TokenShards.open(data_dir, "train"), seq, seed=cfg.train.seed,
                          doc_mask=cfg.data.doc_mask)
    val = None
    if index["splits"].get("val", {}).get("tokens", 0) > seq:
        val_windows = eval_sampler(TokenShards.open(data_dir, "val"), seq,
                                   cfg.train.micro_batch_size, cfg.data.eval_windows,
                                   cfg.data.doc_mask)
        val = val_windows.eval_batches
    seed_everything(cfg.train.seed)  # identical initial weights on every process
    model = Transformer(args)
    model.init_weights()
    if info.is_main:
        print(f"pretraining {args.num_params() / 1e6:.2f}M parameters on {data_dir} "
              f"(train {index['splits']['train']['tokens']:,} tokens, unigram entropy "
              f"{index.get('unigram_entropy', float('nan')):.3f} nats/token)",
              file=sys.stderr)
    trainer = Trainer(model, lm_loss_fn, train, cfg.train, cfg.run_dir, eval_data=val,
                      config=cfg, tokenizer=tokenizer, seq_len=seq,
                      export_extra={"stage": "pretrain", "dataset": str(data_dir)})
    trainer.fit()
    return trainer


def parse_args(argv: list[str]) -> PretrainConfig:
    # `--resume` and `--run-dir` are the everyday flags; the rest are --section.key value.
    argv = ["--train.resume" if a == "--resume" else a for a in argv]
    return config_mod.parse(PretrainConfig, argv)


def main(argv: list[str]) -> None:
    from llama2.stages.common import launch

    cfg = launch(parse_args(argv))
    trainer = run(cfg)
    if trainer.info.is_main:
        last = {k: v for r in trainer.history for k, v in r.items()}
        msg = f"done: step {trainer.step}, loss {last.get('loss', float('nan')):.4f}"
        if "val_loss" in last:
            msg += f", val_loss {last['val_loss']:.4f}"
        print(f"{msg}; model in {Path(cfg.run_dir) / 'model'}")
