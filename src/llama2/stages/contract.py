"""The stage contract: one marker per stage says whether it is done, and for which settings.

A stage writes its outputs, then its marker last (`done.json` in its folder, or
`NAME.done.json` beside outputs that have no folder of their own). The marker holds the hash
of the settings the stage ran with: its config, minus the fields that change no artefact
(`IGNORED`), with every input path replaced by the hash of that input's own marker, so a
re-run upstream stage re-runs everything downstream of it. The pipeline, the RLHF rounds
and every sub-stage ask `Stage.done()` and nothing else:

- marker complete, same hash: done (skipped);
- marker from other settings: a one-line notice naming the changed keys, the stage's
  outputs (checkpoints included: they were trained with the other settings) removed, run again;
- marker written at the start and not completed (a killed run), same hash: run again, and the
  stage continues from its own checkpoints;
- no marker but outputs there (a run directory from before the contract): removed, run again.
- a stage with the hash of a finished one in another folder (the RM ablation's default variant
  is round 1's RM, Figure 15's share of the recipe is its SFT model): that one's outputs copied
  (`Stage.copy_of`), as deterministic training would make them again.

The start record is written after any stale outputs are gone, so a kill at any moment leaves
either a complete marker or a folder that the next check treats correctly.

Under torchrun (engine/distributed.py) rank 0 alone decides, removes and writes, and the other
ranks take its answer: `done()` broadcasts it, `finish()`, `remove()` and `prune()` end with a
barrier, so no rank reads a stage's outputs before rank 0 has made or removed them.

One launch writes a run directory at a time: `claim(DIR)` (every command with a run directory
calls it through `stages.common.launch`) takes `DIR/.lock`, holding rank 0's pid and host,
created exclusively and removed at exit. A second launch on DIR, or on a folder inside it,
stops with one line naming the holder; a lock whose pid is gone from this host is stale (a
killed launch) and taken over.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from llama2.engine import distributed
from llama2.utils import atomic_write_text

MARKER = "done.json"
SUFFIX = ".done.json"
# Fields that change how a stage runs, not what it writes: output paths, resume flags, the
# device, how PPO places its frozen models, logging and checkpoint frequency, progress bars,
# speed knobs. `log_every` only thins the metrics log; evaluation frequencies stay hashed (PPO's
# pick its best checkpoint).
IGNORED = frozenset({"out", "run_dir", "resume", "device", "frozen", "progress", "tensorboard",
                     "log_every", "save_every", "keep_checkpoints", "peak_flops", "compile",
                     "workers", "optimizer_impl"})


def plain(value: Any) -> Any:
    """Dataclasses, paths and tuples as JSON values, without the IGNORED fields."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if k not in IGNORED}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _pop(tree: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.get(part)
        if not isinstance(tree, dict):
            return
    tree.pop(last, None)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def changed_keys(old: Any, new: Any) -> list[str]:
    """The dotted keys whose values differ between two settings trees."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, ...) != b.get(k, ...))


def _read(marker: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "hash" in record else None


def marker_of(path: str | Path) -> Path | None:
    """The marker of the stage that made `path`: the path itself if it is a marker, else the
    `done.json` of its folder, its parent or grandparent (a model folder inside a stage's
    folder, e.g. rlhf/v1/rejection_sampling/train/model). "PATH#fmt" counts as PATH."""
    p = Path(str(path).split("#", 1)[0])
    if p.name == MARKER or p.name.endswith(SUFFIX):
        return p
    for folder in (p, p.parent, p.parent.parent):
        if (folder / MARKER).is_file():
            return folder / MARKER
    return None


def input_hash(path: str | Path) -> str:
    """What an input is: its stage's marker hash, "incomplete" while that stage has not
    finished, or the resolved path for a file no stage of ours made (e.g. a downloaded model);
    with the "#fmt" of a "PATH#fmt"."""
    fmt = str(path).partition("#")[2]
    marker = marker_of(path)
    if marker is None:
        ident = "path:" + str(Path(str(path).split("#", 1)[0]).resolve())
    else:
        record = _read(marker)
        ident = record["hash"] if record and record.get("complete") else f"incomplete:{marker}"
    return ident + (f"#{fmt}" if fmt else "")


def _remove(path: Path) -> bool:
    """Remove a file or folder; True if it held anything."""
    if path.is_dir() and not path.is_symlink():
        held = any(path.iterdir())
        shutil.rmtree(path)
        return held
    if path.exists() or path.is_symlink():
        path.unlink()
        return True
    return False


def notice(msg: str) -> None:
    if distributed.is_main():
        print(msg, file=sys.stderr, flush=True)


class Stage:
    """One stage's marker, settings and outputs.

    marker: `FOLDER/done.json`, or `RUN/NAME.done.json` for outputs without a folder of their
    own (RUN/tokenizer.model, RUN/redteam.json). config: the settings, a dict of sections
    (dataclasses or plain values): the notice names changed keys by their dotted path in it.
    inputs: {key: path or list of paths} of what the stage reads that other stages made; a key
    that is a dotted path into `config` (e.g. "sft.model") replaces that field in the hash.
    outputs: what the stage writes, removed before it runs with other settings (default: the
    marker's folder; [] for a stage made of sub-stages, which check their own markers)."""

    def __init__(self, marker: str | Path, config: dict[str, Any],
                 inputs: dict[str, Any] | None = None, outputs: Iterable[str | Path] | None = None):
        self.marker = Path(marker)
        self.name = str(self.marker.parent) if self.marker.name == MARKER else \
            str(self.marker)[: -len(SUFFIX)]
        self.outputs = [self.marker.parent] if outputs is None and self.marker.name == MARKER \
            else [Path(p) for p in outputs or []]
        cfg = plain(config)
        ins: dict[str, Any] = {}
        for key, paths in (inputs or {}).items():
            _pop(cfg, key)
            ins[key] = [input_hash(p) for p in paths] if isinstance(paths, (list, tuple)) \
                else input_hash(paths)
        self.record = {"config": cfg, "inputs": ins}
        blob = json.dumps(self.record, sort_keys=True, default=str)
        self.hash = hashlib.sha256(blob.encode()).hexdigest()[:16]

    def changes(self, old: dict[str, Any]) -> str:
        """"config changed (keys: a.b, c); inputs re-made (sft.model)": what differs from
        the settings recorded in marker `old`."""
        keys = changed_keys(old.get("config", {}), self.record["config"])
        ia, ib = old.get("inputs", {}), self.record["inputs"]
        ins = sorted(k for k in ia.keys() | ib.keys() if ia.get(k) != ib.get(k))
        parts = ([f"config changed (keys: {', '.join(keys)})"] if keys else []) + \
            ([f"inputs re-made ({', '.join(ins)})"] if ins else [])
        return "; ".join(parts) or "recorded settings differ"

    def _write(self, complete: bool) -> None:
        atomic_write_text(self.marker, json.dumps(
            {"complete": complete, "hash": self.hash, **self.record}, indent=2,
            default=str) + "\n")

    def done(self) -> bool:
        """True if the stage finished with these settings. Otherwise readies it to run: stale
        outputs removed (one-line notice), the start record written (by rank 0, whose answer
        every rank gets)."""
        info = distributed.current()
        answer = self._done() if info.is_main else None
        return bool(distributed.broadcast_object(answer, info))

    def _done(self) -> bool:
        old = _read(self.marker)
        if old is not None and old["hash"] == self.hash:
            return bool(old.get("complete"))  # an unfinished run resumes from its checkpoints
        if old is not None:
            notice(f"{self.name}: {self.changes(old)} -> re-running")
            self._clear()
        elif self._clear():
            notice(f"{self.name}: outputs without a record of their config -> re-running")
        self._write(complete=False)
        return False

    def finish(self) -> None:
        """Write the marker: call it last, once every output is written (rank 0 writes, the
        others wait for it)."""
        self._write(complete=True)
        distributed.barrier(distributed.current())

    def run(self, body: Callable[[], Any], twin: str | Path | None = None,
            config: Any = None) -> bool:
        """Run `body` unless done (or made as `twin`'s copy), then mark the stage done; returns
        True if skipped."""
        if self.done():
            return True
        if twin is None or not self.copy_of(twin, config):
            body()
        self.finish()
        return False

    def copy_of(self, twin: str | Path, config: Any = None) -> bool:
        """Where the stage in folder `twin` finished with this one's hash (the same settings
        and inputs, its folder aside), copy its outputs here instead of running it again:
        training is deterministic, so they are what this stage would make. `config` is saved
        as the copy's config.json (which names its own folder). False where `twin` is not that
        stage. Call it between done() and finish()."""
        record = _read(Path(twin) / MARKER)
        if not (record and record.get("complete") and record["hash"] == self.hash
                and self.marker.name == MARKER
                and Path(twin).resolve() != self.marker.parent.resolve()):
            return False
        if distributed.is_main():  # finish() holds the other ranks until the copy is there
            _remove(self.marker.parent)  # a killed run's checkpoints too (no marker: re-run)
            shutil.copytree(twin, self.marker.parent, ignore=shutil.ignore_patterns(MARKER))
            if config is not None:
                from llama2.config import save

                save(config, self.marker.parent / "config.json")
        notice(f"{self.name}: made as {twin} was (same settings and inputs) -> copied")
        return True

    def clear(self) -> bool:
        """Remove the outputs and the marker; True if anything was there (rank 0 removes,
        every rank gets its answer)."""
        info = distributed.current()
        return bool(distributed.broadcast_object(self._clear() if info.is_main else None, info))

    def _clear(self) -> bool:
        found = False
        for p in self.outputs:
            found = _remove(p) or found
        return _remove(self.marker) or found

    def remove(self, why: str = "disabled") -> None:
        """A stage the config no longer asks for: its outputs go (one-line notice)."""
        if self.clear():
            notice(f"{self.name}: {why} -> its outputs removed")


def prune(folder: str | Path, keep: Iterable[str]) -> None:
    """Remove the subfolders of `folder` not in `keep`: stages the config no longer has (rank
    0 removes, the others wait)."""
    folder, keep = Path(folder), set(keep)
    if folder.is_dir() and distributed.is_main():
        for child in sorted(folder.iterdir()):
            if child.is_dir() and child.name not in keep:
                shutil.rmtree(child)
                notice(f"{child}: not in the config any more -> removed")
    distributed.barrier(distributed.current())


# ------------------------------------------------------------------ one launch per run directory
LOCK = ".lock"
_held: list[Path] = []  # the locks this process took, removed at exit


def _holder(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in `lock`; None when there is no lock. A lock without them (its
    writer died between creating and writing it) reads as pid 0 on this host: stale."""
    for wait in (0.2, 0.0):  # an empty lock may be one being written: read it twice
        try:
            pid, host = lock.read_text().split()
            return int(pid), host
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            time.sleep(wait)
    return 0, socket.gethostname()


def _alive(pid: int, host: str) -> bool:
    """Whether the launch holding a lock may still run: its pid lives on this host, or it is on
    another host (its pid cannot be checked from here)."""
    if host != socket.gethostname():
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _busy(folder: Path, lock: Path, pid: int, host: str) -> str:
    return (f"{folder} is being written by another launch (pid {pid} on {host}); wait for it "
            f"to end, or remove {lock} if that launch is gone")


def _claim(folder: Path) -> str | None:
    """Take `folder/.lock` for this process; the reason it cannot, or None."""
    me = (os.getpid(), socket.gethostname())
    folder = folder.resolve()
    for parent in folder.parents:  # a launch writing a run directory this one is inside
        holder = _holder(parent / LOCK)
        if holder is not None and holder != me and _alive(*holder):
            return _busy(parent, parent / LOCK, *holder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK
    for _ in range(3):  # a stale lock taken over, or one that vanished meanwhile: try again
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            if holder == me:
                return None  # this process holds it already (a command run twice in-process)
            if holder is not None and _alive(*holder):
                return _busy(folder, lock, *holder)
            if holder is not None:
                notice(f"{folder}: the launch that held it (pid {holder[0]}) is gone; taking "
                       "over its lock")
                # Renamed away, not unlinked, so two launches taking it over at once cannot
                # both remove it: the second rename finds nothing.
                aside = lock.with_name(f"{LOCK}.stale.{os.getpid()}")
                try:
                    lock.rename(aside)
                    aside.unlink()
                except FileNotFoundError:
                    pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{me[0]} {me[1]}\n")
        _held.append(lock)
        return None
    return f"{folder}: could not take {lock} (other launches keep taking it)"


def claim(folder: str | Path) -> None:
    """Make this launch the one writer of run directory `folder` (rank 0 takes the lock, every
    rank gets its answer) or raise a one-line LaunchError naming the launch that writes it."""
    info = distributed.current()
    problem = _claim(Path(folder)) if info.is_main else None
    problem = distributed.broadcast_object(problem, info)
    if problem:
        raise distributed.LaunchError(problem)


def release() -> None:
    """Remove the locks this process took (at exit; a command run in-process may call it)."""
    me = (os.getpid(), socket.gethostname())
    while _held:
        lock = _held.pop()
        if _holder(lock) == me:
            lock.unlink(missing_ok=True)


atexit.register(release)  # a launch that ends without the command line's release (Python API)
