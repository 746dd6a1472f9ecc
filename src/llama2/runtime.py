"""Threads for the cores this process really gets, set before torch starts its thread pools
(`configure`; `llama2 <command>` calls it first):

- the cores: its CPU affinity, capped by its cgroup's quota (a container limited to 1 CPU on a
  2-core host gets 1 thread, not 2; torch by default counts the host's cores), less the cores
  another program keeps busy at start (sampled for a quarter of a second from /proc/stat): two
  threads on two cores, one of them shared with a busy program, run every parallel region at
  the shared core's pace;
- the wait: OpenMP threads spin GOMP_SPINCOUNT = 1000 times at a barrier, then sleep. libgomp's
  default (300000) keeps spinning against a program that comes later; OMP_WAIT_POLICY=PASSIVE
  (no spinning) wakes a sleeping thread for every small matrix product of a decoding step.
  bench/bench_busy.py measures the three.
OMP_NUM_THREADS, OMP_WAIT_POLICY or GOMP_SPINCOUNT set by the user are kept.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SPINCOUNT = "1000"
BUSY = 0.5  # a core another program used more than half of the sample is busy


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 cpu.max or v1 cfs), None if none."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """Cores this process may run on: its affinity mask, capped by its cgroup's quota."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpus()
    return max(1, min(n, int(quota)) if quota is not None else n)


def busy_cpus(cpus: set[int], seconds: float = 0.25, stat: Path = Path("/proc/stat")) -> int:
    """How many of `cpus` other programs keep busy: used more than BUSY of a short sample (this
    process is asleep meanwhile); 0 where /proc/stat cannot be read."""
    def sample() -> dict[int, tuple[int, int]]:
        out = {}
        for line in stat.read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks = [int(f) for f in fields]
                out[int(name[3:])] = (sum(ticks[:8]), ticks[3] + ticks[4])  # total, idle+iowait
        return out

    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except (OSError, ValueError):
        return 0
    busy = 0
    for cpu, (total, idle) in after.items():
        dt, di = total - before[cpu][0], idle - before[cpu][1]
        busy += dt > 0 and 1 - di / dt > BUSY
    return busy


def configure() -> None:
    """Before torch is imported: the wait policy and the thread count (see the module's
    docstring); a user's OMP_NUM_THREADS, OMP_WAIT_POLICY or GOMP_SPINCOUNT is kept."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT  # libgomp reads it when torch loads it
    if "OMP_NUM_THREADS" not in os.environ:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        n = available_cpus() - (busy_cpus(cpus) if len(cpus) > 1 else 0)
        os.environ["OMP_NUM_THREADS"] = str(max(1, n))
