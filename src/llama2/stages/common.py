"""What the recipe stages share: loading a policy, reading dialog sources, run directories."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llama2 import checkpoint, config
from llama2.chat import Dialog, OnSpecialTags
from llama2.utils import resolve_device


def load_policy(path: str, device: str = "auto") -> checkpoint.Loaded:
    """A policy checkpoint in fp32 (training keeps fp32 master weights) with its tokenizer."""
    if not path:
        raise ValueError("no model given (set --model PATH)")
    loaded = checkpoint.load(path, dtype=torch.float32, device=resolve_device(device))
    if loaded.tokenizer is None:
        raise ValueError(f"{path}: no tokenizer.model beside the checkpoint")
    return loaded


def as_policy(model: Any, device: str = "auto") -> checkpoint.Loaded:
    """`model` as a loaded policy: a checkpoint path is loaded (`load_policy`), a loaded policy
    is returned as it is."""
    return load_policy(str(model), device) if isinstance(model, (str, Path)) else model


def load_dialogs(path: str, on_special_tags: OnSpecialTags = "error") -> list[Dialog]:
    """Dialogs from a file: `messages` JSONL (.jsonl) or Alpaca JSON (.json). A record carrying
    a chat tag is a one-line error naming file, line and field, or (on_special_tags = "skip")
    counted and skipped (world/adapters.py)."""
    from llama2.world import adapters

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    if p.suffix == ".json":
        return adapters.load_alpaca(p, on_special_tags=on_special_tags)
    return adapters.load_messages_jsonl(p, on_special_tags=on_special_tags)


def trainer_summary(folder: str | Path) -> dict[str, Any]:
    """What the Trainer wrote to folder/summary.json (steps, time, each rank's parameter and
    optimizer bytes), for a stage that writes its own summary.json in the same folder and keeps
    the Trainer's under "train"; {} if there is none."""
    path = Path(folder) / "summary.json"
    if not path.is_file():
        return {}
    s = json.loads(path.read_text())
    return s.get("train", s if "per_rank" in s else {})


def parse_stage(cls: type, argv: list[str], prog: str) -> Any:
    """Parse `--config FILE --key value ...` into the stage's config dataclass and `launch` it."""
    if argv and argv[0] in ("-h", "--help"):
        fields = json.dumps(config.to_dict(cls()), indent=2)
        print(f"usage: llama2 {prog} [--config FILE.toml] [--section.key value ...]\n\n"
              f"{(sys.modules[cls.__module__].__doc__ or '').strip()}\n\ndefaults:\n{fields}")
        sys.exit(0)
    return launch(config.parse(cls, argv))


def launch(cfg: Any) -> Any:
    """What every stage command does with its parsed config before any work (the pipeline
    too): under torchrun join the process group on the config's device (`config_device`), so
    that each rank takes its own GPU and `respond` shares its prompts; check that every
    training section's global batch splits over the processes; take the run directory's lock
    (contract.claim). A bad launch stops here with one line, before anything is written."""
    from llama2.engine import distributed
    from llama2.stages.contract import claim

    info = distributed.init(config_device(cfg))
    check_batches(cfg, info.world_size)
    out = getattr(cfg, "out", None) or getattr(cfg, "run_dir", None)
    if out:
        claim(out)
    return cfg


def check_batches(cfg: Any, world_size: int) -> None:
    """Every global size in the config must split over `world_size` processes: each section
    with a `check_world` (a TrainConfig's global batch, PPO's batch_prompts and minibatch)
    raises a LaunchError naming its field otherwise, at launch rather than when its stage
    starts."""
    from llama2.engine.config import TrainConfig

    for where, section in sections(cfg):
        if isinstance(section, TrainConfig) and section.global_batch_tokens:
            continue  # a batch in tokens needs the data's seq_len: the Trainer checks it
        section.check_world(world_size, where=where)


def sections(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted path, section) of `cfg` and every dataclass inside it that has `check_world`."""
    import dataclasses

    out: list[tuple[str, Any]] = [(prefix.rstrip("."), cfg)] if hasattr(cfg, "check_world") else []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += sections(value, f"{prefix}{f.name}.")
    return out


def config_device(cfg: Any) -> str:
    """The device a stage's config names: its own `device`, its `train.device`, else the first
    one found in its sections ("auto" if none)."""
    import dataclasses

    todo = [cfg]
    while todo:
        obj = todo.pop(0)
        if not dataclasses.is_dataclass(obj):
            continue
        if isinstance(getattr(obj, "device", None), str):
            return obj.device
        todo += [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return "auto"


@dataclass
class Replay:
    """Helpful dialogs replayed beside a later stage's own small fine-tuning set (Ghost
    Attention, distillation) so that it does not wash out the chat skills: the paper fine-tunes
    on such data as part of its larger mixture (§3.3). `demos` helpful ones: the RLHF rounds'
    rejection-sampling picks on helpful prompts when `picks` names their best.jsonl files (the
    policy's own best answers, so the replay keeps what RLHF taught), else the world's SFT
    demonstrations; `safety_share` as many safety demonstrations (refusals; keep it near the
    SFT mix, or the replay alone raises false refusals); `borderline_share` as many benign
    prompts with sensitive words, answered helpfully (the training split; the borderline
    evaluation draws other prompts)."""

    demos: int = 0
    safety_share: float = 0.2
    borderline_share: float = 0.0
    picks: list[str] = field(default_factory=list)

    def dialogs(self, world_seed: int) -> list[Dialog]:
        if self.demos <= 0:
            return []
        from llama2.utils import read_jsonl
        from llama2.world import World

        helpful = [r["messages"] for path in self.picks for r in read_jsonl(path)
                   if r.get("kind") == "helpful"]
        n_world = 0 if helpful else self.demos
        dialogs = World(world_seed).demonstrations(
            n_world, round(self.demos * self.safety_share), split="train",
            n_borderline=round(self.demos * self.borderline_share))
        # The picks cycled up to `demos` (two rounds of 300 prompts hold fewer helpful ones).
        return dialogs + [helpful[i % len(helpful)] for i in range(self.demos if helpful else 0)]


def stage_done(out: str | Path) -> bool:
    """A stage's final model folder is complete (config.json is written last)."""
    return (Path(out) / "model" / "config.json").is_file()
