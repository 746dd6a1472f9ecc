"""Supervised fine-tuning (recipe §2, paper §3.1).

Dialogs in the Llama 2 chat format; the loss only on assistant-answer tokens (every assistant
turn of a multi-turn dialog); several dialogs packed into one sequence with a block-diagonal
mask so none attends to another. Paper defaults: cosine schedule, LR 2e-5, weight decay 0.1,
2 epochs (tiny models need a larger LR: configs/tiny.toml sets it).

    llama2 sft --model runs/x/pretrain/model --out runs/x/sft [--data world] [--data a.jsonl]
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from llama2.chat import Dialog, OnSpecialTags
from llama2.data.sft import collate_rows, encode_examples, pack, sft_loss
from llama2.engine import EpochSampler, TrainConfig, Trainer
from llama2.stages.common import load_dialogs, load_policy, parse_stage


def sft_train_defaults() -> TrainConfig:
    return TrainConfig(lr=2e-5, epochs=2.0, warmup_steps=0, warmup_ratio=0.03,
                       micro_batch_size=8, global_batch=64, eval_every=0)


@dataclass
class SFTConfig:
    model: str = ""  # checkpoint to fine-tune (pretrained or an earlier chat model)
    out: str = "runs/sft"
    # Sources: "world" (the built-in world's demonstrations) or dialog files (.jsonl messages,
    # .json Alpaca).
    data: list[str] = field(default_factory=lambda: ["world"])
    world_seed: int = 0
    n_helpful: int = 1500  # world demonstrations (paper: quality over quantity)
    n_safety: int = 300
    safety_share: float = 1.0  # share of the safety demonstrations used (Figure 15 scaling)
    # Who writes the helpful world demonstrations (name -> share; empty: the world's own mix,
    # world.tasks.WRITERS): writers of uneven quality, whom RLHF can improve on (§3.1).
    writers: dict[str, float] = field(default_factory=dict)
    val_fraction: float = 0.05
    seq_len: int = 256
    learn: str = "all"  # "all" assistant turns, or "last" only
    # A data-file record whose dialog text carries a chat tag ([INST], [/INST], <<SYS>>,
    # <</SYS>>): "error" (one line naming file, line and field) or "skip" (counted, summary).
    on_special_tags: OnSpecialTags = "error"
    train: TrainConfig = field(default_factory=sft_train_defaults)


def gather_dialogs(cfg: SFTConfig) -> list[Dialog]:
    dialogs: list[Dialog] = []
    for source in cfg.data:
        if source == "world":
            from llama2.world import World

            world = World(cfg.world_seed)
            n_safety = round(cfg.n_safety * cfg.safety_share)
            dialogs += world.demonstrations(cfg.n_helpful, n_safety, split="train",
                                            writers=cfg.writers or None)
        else:
            dialogs += load_dialogs(source, cfg.on_special_tags)
    if not dialogs:
        raise ValueError("no SFT dialogs: check --data")
    return dialogs


def finetune(model, tokenizer, dialogs: list[Dialog], out: str | Path, train: TrainConfig,
             seq_len: int, val_fraction: float = 0.05, learn: str = "all",
             config: object | None = None, extra: dict | None = None) -> Path:
    """Fine-tune `model` on the answers of `dialogs`; the shared step of SFT, rejection-sampling
    fine-tuning, Ghost Attention and context distillation. Returns the final model folder."""
    seq_len = min(seq_len, model.args.max_seq_len)
    examples, cut = encode_examples(tokenizer, dialogs, seq_len, learn=learn)  # type: ignore[arg-type]
    if not examples:
        raise ValueError("no dialog has an answer token to learn")
    random.Random(train.seed).shuffle(examples)
    n_val = int(len(examples) * val_fraction) if len(examples) >= 20 else 0
    val, examples = examples[:n_val], examples[n_val:]
    rows, val_rows = pack(examples, seq_len), pack(val, seq_len)

    def collate(batch):
        return collate_rows(batch, seq_len, tokenizer.pad_id)

    data = EpochSampler(rows, collate, seed=train.seed)
    eval_data = None
    if val_rows:
        val_sampler = EpochSampler(val_rows, collate, micro_batch_size=train.micro_batch_size,
                                   shuffle=False)
        eval_data = val_sampler.eval_batches  # evaluated at the end (and every eval_every)
    trainer = Trainer(model, sft_loss, data, train, out, eval_data=eval_data,
                      config=config or train, tokenizer=tokenizer,
                      export_extra={"examples": len(examples), "rows": len(rows),
                                    "truncated": cut, **(extra or {})},
                      seq_len=seq_len)
    trainer.fit()
    return Path(out) / "model"


def main(argv: list[str]) -> None:
    cfg: SFTConfig = parse_stage(SFTConfig, argv, "sft")
    loaded = load_policy(cfg.model, cfg.train.device)
    dialogs = gather_dialogs(cfg)
    path = finetune(loaded.model, loaded.tokenizer, dialogs, cfg.out, cfg.train, cfg.seq_len,
                    cfg.val_fraction, cfg.learn, config=cfg, extra={"stage": "sft"})
    print(f"SFT model written to {path}")
