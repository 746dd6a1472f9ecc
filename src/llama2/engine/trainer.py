"""The training loop every stage shares: accumulation, autocast, clipping, schedule, logging,
evaluation, checkpoints, exact resume and FSDP2.

A stage supplies the model, `loss_fn(model, batch) -> (loss, metrics, n)`, a data source
(`engine.data`) and a `TrainConfig`. The loss is a mean over the batch's `n` units (tokens,
pairs, ...); the trainer weights each micro-batch by its `n`, so a step's gradient is the
mean over every unit of the global batch, whatever the accumulation and process count.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llama2.engine import checkpointing, distributed
from llama2.engine.config import TrainConfig
from llama2.engine.data import Filler
from llama2.engine.metrics import MetricsLog
from llama2.engine.optim import ModelOptimizer
from llama2.utils import atomic_write_text, seed_everything

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float], int]]


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def find_model_args(model: nn.Module) -> Any | None:
    """The llama2 ModelArgs of `model` or of the Transformer it wraps (reward models)."""
    from llama2.model import Transformer

    for m in model.modules():
        if isinstance(m, Transformer):
            return m.args
    return None


def flops_per_token(model: nn.Module, seq_len: int | None) -> float:
    """Training FLOPs per token: 6 * (parameters used in matmuls) + attention (PaLM, App. B)."""
    n = sum(p.numel() for name, p in model.named_parameters() if "tok_embeddings" not in name)
    args = find_model_args(model)
    attn = 12 * args.n_layers * args.dim * seq_len if args is not None and seq_len else 0
    return 6.0 * n + attn


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls beat fp32 on `device`: a CUDA GPU with bf16, or a CPU with AVX-512
    BF16 or AMX. Elsewhere PyTorch emulates bf16 on the CPU, many times slower than fp32
    (platform notes), so `dtype = "auto"` trains in fp32 there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def peak_flops(device: torch.device, dtype: str) -> float:
    """Rough hardware peak for MFU: vendors' figures on GPUs, the platform notes' per-core
    figures on CPUs."""
    bf16 = dtype == "bfloat16"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12)}
        for key, (half, full) in table.items():
            if key in name:
                return half if bf16 else full
        return 100e12
    return (os.cpu_count() or 1) * (490e9 if bf16 else 245e9)


class Trainer:
    """Train `model` with `loss_fn` on `train_data` for `cfg.max_steps` optimizer steps.

    model: any nn.Module (moved to the device, FSDP2-sharded under torchrun).
    loss_fn: (model, batch) -> (mean loss tensor, extra metrics, number of units averaged).
    train_data: data source (next_batch/state_dict/load_state_dict; `bind()` if present).
    eval_data: callable returning an iterable of eval batches for this process (evaluated
        with loss_fn, logged as val_loss): its j-th is batch j * W + rank of the one-process
        pass, or an `engine.data.Filler` (as `EpochSampler.eval_batches` deals them), so
        val_loss is the same on any number of processes; and/or eval_fn(model) -> dict of val
        metrics.
    run_dir: config.json, metrics.jsonl, checkpoints/, summary.json and (for a llama2
        Transformer) the final native model in run_dir/model.
    config: the stage's whole config, saved as config.json (default: cfg).
    tokenizer / export_extra: written with the native model.
    on_save(model, step): called on rank 0 at the end with an unsharded CPU model.
    seq_len: fixed sequence length (for global_batch_tokens and MFU); default from the data.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, train_data: Any, cfg: TrainConfig,
                 run_dir: str | os.PathLike, *,
                 eval_data: Callable[[], Iterable[Any]] | None = None,
                 eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
                 config: Any = None, tokenizer: Any = None,
                 export_extra: dict[str, Any] | None = None,
                 on_save: Callable[[nn.Module, int], None] | None = None,
                 seq_len: int | None = None):
        cfg.validate()
        self.cfg, self.loss_fn, self.train_data = cfg, loss_fn, train_data
        self.eval_data, self.eval_fn = eval_data, eval_fn
        self.run_dir = Path(run_dir)
        self.config = config if config is not None else cfg
        self.tokenizer, self.export_extra, self.on_save = tokenizer, export_extra or {}, on_save
        self.seq_len = seq_len or getattr(train_data, "seq_len", None)
        self.info = distributed.init(cfg.device)
        self.model = model
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self._ready = False

    # ------------------------------------------------------------------------------ setup
    def _resolve_steps(self, world: int) -> TrainConfig:
        cfg = self.cfg
        if cfg.dtype == "auto":
            cfg = dataclasses.replace(cfg, dtype="bfloat16" if fast_bf16(self.info.device)
                                      else "float32")
        micro = cfg.micro_batch(world, self.seq_len)
        if micro != cfg.micro_batch_size:  # the same global batch on any number of processes
            self._say(f"train.micro_batch_size {cfg.micro_batch_size} -> {micro}: the global "
                      f"batch of {cfg.global_sequences(world, self.seq_len)} sequences split "
                      f"over {world} process(es)")
            cfg = dataclasses.replace(cfg, micro_batch_size=micro)
        if cfg.max_steps:
            return cfg
        if not cfg.epochs:
            raise ValueError("set train.max_steps or train.epochs")
        try:
            n = len(self.train_data)
        except TypeError:
            raise ValueError("train.epochs needs a data source with a length; set "
                             "train.max_steps") from None
        per_step = cfg.global_sequences(world, self.seq_len)
        return dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * n / per_step)))

    def _prepare_model(self) -> None:
        info = self.info
        model = self.model.to(info.device)
        self._template: nn.Module | None = None
        if info.distributed:
            # An unsharded skeleton (on 'meta': no memory) to rebuild a full model at export.
            self._template = copy.deepcopy(model).to("meta")
            # Reward models are called through forward_pairs / values as well as forward.
            distributed.shard_model(model, info, ("hidden", "forward_pairs", "values"))
        if self.cfg.compile:
            for m in model.modules():
                if isinstance(m, nn.ModuleList):
                    for block in m:
                        block.compile()
        self.model = model
        self._fsdp = info.distributed

    # ------------------------------------------------------------------------- checkpoint
    def _payload(self) -> dict[str, Any] | None:
        state = self.optim.state_dict()  # model, optimizer, scheduler
        rngs = checkpointing.rng_states(self.info)
        if not self.info.is_main:
            return None
        return {"step": self.step, **state, "rng": rngs,
                "data": self.train_data.state_dict(), "world_size": self.info.world_size,
                "train_config": dict(vars(self.cfg))}

    def save_checkpoint(self) -> None:
        payload = self._payload()
        if payload is not None:
            checkpointing.write(self.run_dir, self.step, payload, self.cfg.keep_checkpoints)
        distributed.barrier(self.info)

    def _resume(self) -> bool:
        path = checkpointing.latest(self.run_dir)
        if path is None:
            return False
        state = checkpointing.read(path)
        self.optim.load_state_dict(state)
        self.train_data.load_state_dict(state["data"])
        checkpointing.set_rng_states(state["rng"], self.info.rank, self.info.world_size)
        self.step = int(state["step"])
        if self.info.is_main:  # drop records past the checkpoint: they will be redone
            self.logger.restart(self.step)
            self._say(f"resumed from {path} at step {self.step}")
        return True

    # ------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        out: dict[str, float] = {}
        try:
            if self.eval_data is not None:
                sums: dict[str, float] = {"loss": 0.0}
                count = 0.0
                # eval_batches counts micro-batches over all processes: the same batches
                # are evaluated whatever the process count; the ones past it, and fillers,
                # run only to keep the processes in step.
                total, world = self.cfg.eval_batches, self.info.world_size
                limit = math.ceil(total / world)
                for i, batch in enumerate(self.eval_data()):
                    if limit and i >= limit:
                        break
                    filler = isinstance(batch, Filler)
                    skip = filler or bool(total and i * world + self.info.rank >= total)
                    batch = to_device(batch.batch if filler else batch, self.info.device)
                    with self._autocast():
                        loss, metrics, n = self.loss_fn(self.model, batch)
                    if skip:
                        continue
                    sums["loss"] += float(loss) * int(n)
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * int(n)
                    count += int(n)
                keys = sorted(sums)
                totals = distributed.all_reduce_sum([sums[k] for k in keys] + [count], self.info)
                out.update({f"val_{k}": v / max(totals[-1], 1) for k, v in zip(keys, totals)})
            if self.eval_fn is not None:
                out.update(self.eval_fn(self.model))
        finally:
            self.model.train()
        return out

    # ------------------------------------------------------------------------------- loop
    def _autocast(self) -> Any:
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16,
                              enabled=self.cfg.dtype == "bfloat16")

    def _say(self, msg: str) -> None:
        if self.info.is_main:
            print(msg, file=sys.stderr, flush=True)

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.info.is_main:
            self.logger.log(record)
            if self.tb is not None:
                for k, v in record.items():
                    if k != "step" and isinstance(v, (int, float)):
                        self.tb.add_scalar(k, v, record["step"])

    def _open_tensorboard(self) -> Any:
        if not (self.cfg.tensorboard and self.info.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._say("tensorboard is not installed; logging to metrics.jsonl only")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def setup(self) -> None:
        """Resolve the config, shard/compile the model, build the optimizer, resume.

        Called by `fit()` and `train_step()`."""
        if self._ready:
            return
        info = self.info
        self.cfg = cfg = self._resolve_steps(info.world_size)
        self.accum = cfg.accumulation(info.world_size, self.seq_len)
        if hasattr(self.train_data, "bind"):
            self.train_data.bind(cfg.micro_batch_size, info.rank, info.world_size)
        checkpointing.prepare(self.run_dir, cfg.resume, info.is_main)
        distributed.barrier(info)
        seed_everything(cfg.seed + info.rank)
        self._prepare_model()
        self.optim = ModelOptimizer(self.model, cfg)
        self.optimizer, self.scheduler = self.optim.optimizer, self.optim.scheduler
        self.logger = MetricsLog(self.run_dir / "metrics.jsonl", key="step")
        if not (cfg.resume and self._resume()) and info.is_main:
            self.logger.restart(None)  # a fresh start: a killed attempt's records go
        self.tb = self._open_tensorboard()
        if info.is_main:
            from llama2.config import save

            save(self.config, self.run_dir / "config.json")
        self._ready = True

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over `accum` micro-batches from train_data (every process).

        Returns {"loss", "lr", "grad_norm", "tokens", **metrics}, averaged over the global
        batch; advances `self.step`. Logging, evaluation and checkpoints are `fit()`'s."""
        self.setup()
        info = self.info
        loss_sum, n_sum, metric_sums, tokens = 0.0, 0.0, {}, 0
        for micro in range(self.accum):
            batch = to_device(self.train_data.next_batch(), info.device)
            if self._fsdp:  # reduce-scatter gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(micro == self.accum - 1)
            with self._autocast():
                loss, metrics, n = self.loss_fn(self.model, batch)
            n = int(n)
            # Weight by the micro-batch's units: the step's gradient is the global mean.
            (loss * n).backward()
            loss_sum += float(loss.detach()) * n
            n_sum += n
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + float(v) * n
            tokens += _count_tokens(batch)
        keys = sorted(metric_sums)
        red = distributed.all_reduce_sum([loss_sum, n_sum, float(tokens)]
                                         + [metric_sums[k] for k in keys], info)
        loss_sum, n_sum = red[0], red[1]
        # FSDP averages gradients over processes; undo that and divide by all units. Then
        # clipping at 1.0 (paper §2.2; with clipping off the norm is still logged), the step.
        scale = (info.world_size if self._fsdp else 1) / n_sum if n_sum else 0.0
        stepped = self.optim.step(grad_scale=scale)
        self.step += 1
        record = {"loss": loss_sum / max(n_sum, 1), **stepped, "tokens": red[2]}
        record.update({k: v / max(n_sum, 1) for k, v in zip(keys, red[3:])})
        return record

    def fit(self) -> list[dict[str, Any]]:
        """Run (or resume) training; return the records logged by this call."""
        from tqdm import tqdm

        self.setup()
        info, cfg = self.info, self.cfg
        fpt = flops_per_token(self.model, self.seq_len) if self.seq_len else 0.0
        peak = cfg.peak_flops or peak_flops(info.device, cfg.dtype) * (
            info.world_size if info.device.type == "cuda" else 1)
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and info.is_main), file=sys.stderr)
        self.history = []
        t_last, tok_last, tokens_seen = time.perf_counter(), 0.0, 0.0
        t_start = t_last
        while self.step < cfg.max_steps:
            out = self.train_step()
            tokens_seen += out.pop("tokens")
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                now = time.perf_counter()
                tps = (tokens_seen - tok_last) / max(now - t_last, 1e-9)
                t_last, tok_last = now, tokens_seen
                record = {"step": self.step, **out, "tokens_per_s": tps,
                          "mfu": tps * fpt / peak if fpt else 0.0, "tokens": tokens_seen}
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tps:,.0f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0 \
                    and self.step != cfg.max_steps:
                self._log({"step": self.step, **self.evaluate()})
            if cfg.save_every and self.step % cfg.save_every == 0 \
                    and self.step != cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        if self.eval_data is not None or self.eval_fn is not None:
            self._log({"step": self.step, **self.evaluate()})
        self.save_checkpoint()
        self._write_summary(time.perf_counter() - t_start)
        self._export()  # last: the model's config.json marks a finished run (stage_done)
        if self.tb is not None:
            self.tb.close()
        return self.history

    # ----------------------------------------------------------------------------- export
    def full_model(self) -> nn.Module | None:
        """An unsharded CPU copy of the trained model on rank 0 (None elsewhere)."""
        if not self._fsdp:
            return self.model
        state, _ = distributed.full_state(self.model, None)
        if not self.info.is_main:
            return None
        model = self._template.to_empty(device="cpu")
        model.load_state_dict(state)
        live = dict(self.model.named_buffers())
        for name, buf in model.named_buffers():  # rope tables etc. are not in state_dict
            buf.copy_(live[name].cpu())
        return model

    def _export(self) -> None:
        from llama2.model import Transformer

        model = self.full_model()
        if model is not None:
            if isinstance(model, Transformer):
                from llama2.checkpoint import save

                extra = {"step": self.step, **self.export_extra}
                save(model, self.tokenizer, self.run_dir / "model", extra=extra)
            if self.on_save is not None:
                self.on_save(model, self.step)
        distributed.barrier(self.info)

    def _write_summary(self, elapsed: float) -> None:
        held = distributed.held_bytes([self.model], [self.optimizer])
        per_rank = distributed.all_gather_object({**held, "peak_rss_mb": _peak_rss_mb()},
                                                 self.info)
        if self.info.is_main:
            last = {k: v for r in self.history for k, v in r.items()}
            summary = {"step": self.step, "world_size": self.info.world_size,
                       "elapsed_s": elapsed, "last": last, "per_rank": per_rank}
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: not inherited through fork + exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _count_tokens(batch: Any) -> int:
    """Input tokens in a batch (for tokens/s): the first integer tensor found."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() if not batch.is_floating_point() else 0
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for v in batch:
            n = _count_tokens(v)
            if n:
                return n
    return 0
