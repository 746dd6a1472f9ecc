"""The training engine every stage shares (recipe §1 settings; reused by §2-§7).

API
---
- `TrainConfig` (engine.config): lr, min_lr_ratio=0.1, schedule "cosine"|"constant",
  warmup_steps / warmup_ratio (the larger wins), max_steps or epochs, micro_batch_size,
  global_batch (sequences) or global_batch_tokens, AdamW (0.9, 0.95, 1e-5, wd 0.1),
  grad_clip=1.0, dtype "float32"|"bfloat16" (autocast)|"auto", eval_every, eval_batches,
  save_every, keep_checkpoints, log_every, seed, device="auto", compile, resume.
- `make_optimizer(model, cfg)`: AdamW, weight decay on matrices only (not norms / 1-D);
  `lr_at(step, cfg)`: warmup then cosine to min_lr_ratio * lr (or constant);
  `make_scheduler(opt, cfg)`: a LambdaLR following lr_at.
- `Trainer(model, loss_fn, train_data, cfg, run_dir, eval_data=..., eval_fn=...,
  config=..., tokenizer=..., on_save=...).fit()`: accumulation to the global batch,
  autocast, clipping, schedule, tqdm progress, metrics.jsonl (step, loss, lr, grad_norm,
  tokens_per_s, mfu; eval records with val_loss), optional TensorBoard, atomic checkpoints
  every save_every steps and at the end, exact `resume`, FSDP2 under torchrun, and at the
  end the native model in run_dir/model for a llama2 Transformer (`llama2.load` reads it).
  `loss_fn(model, batch) -> (loss, metrics: dict[str, float], n)`: loss is a mean over
  n units; micro-batches are weighted by n. `setup()` + `train_step()` drive it one
  optimizer step at a time; `evaluate()`, `save_checkpoint()`, `full_model()`.
- The Trainer's pieces, for a stage whose loop is not the Trainer's (PPO: two models,
  rollouts then updates, each model its own LR and clipping):
  `ModelOptimizer(model, cfg)` (engine.optim): AdamW + schedule + clipping, `.step()`
  ends a training step, `.state_dict()` / `.load_state_dict()` for checkpoints;
  `engine.checkpointing`: `prepare(run_dir, resume)` (refuse to overwrite, clean a killed
  writer's leftovers, the checkpoint to resume from), `write(run_dir, step, payload, keep)`
  (atomic, `latest` pointer, keep-N), `read`, `rng_states` / `set_rng_states`;
  `MetricsLog(path, key)` (engine.metrics): the JSONL log, `.restart(at)` drops the records
  past a resumed checkpoint.
- Data sources: `next_batch()`, `state_dict()`, `load_state_dict()` (+ optional `bind`).
  `EpochSampler` / `ListBatches(examples, collate, seed=...)`: seeded per-epoch shuffles
  over a list of examples, resumable, split over processes; `.eval_batches(limit)`.
- Losses: `causal_lm_loss(model, tokens, targets, loss_mask=None) -> (loss, n_tokens)`,
  chunked linear + cross-entropy over `model.hidden()` and `model.output.weight` that never
  materializes full fp32 logits (ignore_index -100 or loss_mask); `lm_loss_fn` is the
  matching loss_fn for {"tokens", "targets"[, "loss_mask"]} batches;
  `linear_cross_entropy(h, weight, targets)` for other heads.
- `engine.distributed`: init/shutdown (gloo on CPU, nccl on CUDA), shard_model (FSDP2),
  full_state/load_full_state (name-keyed full state dicts: checkpoints move freely between
  sharded and single-process runs), and the rule every command follows under torchrun:
  `is_main()` (only rank 0 writes and logs; `rank0_logs`), `current()` (the ranks generation
  and scoring share their inputs with; `gather_shares`), `gathered(model)` (a sharded model
  whole, once per generation phase), `rank0_only(name, fn)` (a stage not distributed yet:
  rank 0 runs it, the others wait; `on_rank0(fn)` without the notice), `LaunchError` (a bad
  launch every rank finds: printed once, by rank 0).
"""

from llama2.engine.config import TrainConfig
from llama2.engine.data import DataSource, EpochSampler, IndexedStream, ListBatches
from llama2.engine.losses import IGNORE_INDEX, causal_lm_loss, linear_cross_entropy, lm_loss_fn
from llama2.engine.metrics import MetricsLog
from llama2.engine.optim import ModelOptimizer, lr_at, make_optimizer, make_scheduler, param_groups
from llama2.engine.trainer import Trainer, to_device

__all__ = [
    "IGNORE_INDEX", "DataSource", "EpochSampler", "IndexedStream", "ListBatches", "MetricsLog",
    "ModelOptimizer", "Trainer", "TrainConfig", "causal_lm_loss", "linear_cross_entropy",
    "lm_loss_fn", "lr_at", "make_optimizer", "make_scheduler", "param_groups", "to_device",
]
