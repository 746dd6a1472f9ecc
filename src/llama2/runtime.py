"""Threads for the cores this process really gets: its CPU affinity, capped by its cgroup's
quota (a container limited to 1 CPU on a 2-core host gets 1 thread, not 2; torch by default
counts the host's cores). `llama2 <command>` applies it unless OMP_NUM_THREADS is set.

The OpenMP wait policy stays the runtime's default (threads spin a while at each barrier):
OMP_WAIT_POLICY=PASSIVE suffers less when another program takes a core, but slows idle
decoding (every small matrix product wakes a sleeping thread); the README has the trade-off
and how to set it.
"""

from __future__ import annotations

import os
from pathlib import Path


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


def set_threads() -> None:
    """torch's intra-op threads = `available_cpus()`, unless the user set OMP_NUM_THREADS."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(available_cpus())
