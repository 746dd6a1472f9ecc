"""The metrics log of a training run: one JSON record per line, appended and flushed.

The Trainer writes `metrics.jsonl` (records keyed by "step"), PPO `ppo_metrics.jsonl` (keyed
by "iteration"). A resumed run first drops the records past its checkpoint, which it is about
to redo, and a line cut short by a kill; a fresh start empties the log.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llama2.utils import atomic_write_text


class MetricsLog:
    def __init__(self, path: str | os.PathLike, key: str = "step"):
        self.path = Path(path)
        self.key = key

    def log(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def restart(self, at: int | None) -> None:
        """Keep the records whose key is at most `at` (a resume from checkpoint `at`); None:
        keep none (a fresh start: a killed attempt's records go)."""
        if not self.path.is_file():
            return
        keep = []
        if at is not None:
            for ln in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(ln).get(self.key, 0) <= at:
                        keep.append(ln)
                except json.JSONDecodeError:  # a line cut short by the kill
                    continue
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))
