"""Threads follow the cores the process gets: affinity capped by the cgroup's CPU quota."""

from __future__ import annotations

from llama2 import runtime


def test_cgroup_quota_in_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert runtime.cgroup_cpus(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.cgroup_cpus(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert runtime.cgroup_cpus(tmp_path) == 1.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert runtime.cgroup_cpus(tmp_path) is None


def test_available_cpus_is_capped_by_the_quota(monkeypatch):
    monkeypatch.setattr(runtime, "cgroup_cpus", lambda: 1.5)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert runtime.available_cpus() == 1
    monkeypatch.setattr(runtime, "cgroup_cpus", lambda: None)
    assert runtime.available_cpus() == 4
