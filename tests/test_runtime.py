"""Threads follow the cores the process gets: affinity capped by the cgroup's CPU quota, less
the cores other programs keep busy; OpenMP threads spin briefly, then sleep."""

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


def test_a_core_another_program_keeps_busy_is_not_counted(tmp_path, monkeypatch):
    """busy_cpus reads /proc/stat twice: cpu1 used 90% of the sample, cpu0 5%."""
    stat = tmp_path / "stat"
    samples = iter([
        "cpu  0 0 0 0 0 0 0 0\ncpu0 100 0 0 900 0 0 0 0 0 0\ncpu1 100 0 0 900 0 0 0 0 0 0\n",
        "cpu  0 0 0 0 0 0 0 0\ncpu0 105 0 0 995 0 0 0 0 0 0\ncpu1 190 0 0 910 0 0 0 0 0 0\n"])
    monkeypatch.setattr(runtime.time, "sleep", lambda s: stat.write_text(next(samples)))
    stat.write_text(next(samples))
    assert runtime.busy_cpus({0, 1}, stat=stat) == 1
    stat.write_text("cpu0 100 0 0 900 0 0 0 0\ncpu1 100 0 0 900 0 0 0 0\n")
    samples = iter(["cpu0 150 0 0 950 0 0 0 0\ncpu1 110 0 0 990 0 0 0 0\n"])
    assert runtime.busy_cpus({0, 1}, stat=stat) == 0  # cpu0 at exactly 50%: not busy
    assert runtime.busy_cpus({0, 1}, stat=tmp_path / "missing") == 0


def test_configure_sets_threads_and_wait_unless_the_user_did(monkeypatch):
    for var in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(runtime, "cgroup_cpus", lambda: None)
    monkeypatch.setattr(runtime, "busy_cpus", lambda cpus: 1)
    runtime.configure()
    assert runtime.os.environ["OMP_NUM_THREADS"] == "1"
    assert runtime.os.environ["GOMP_SPINCOUNT"] == runtime.SPINCOUNT
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    runtime.configure()
    assert runtime.os.environ["OMP_NUM_THREADS"] == "2"
    assert "GOMP_SPINCOUNT" not in runtime.os.environ
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(runtime, "busy_cpus", lambda cpus: 0)
    runtime.configure()
    assert runtime.os.environ["OMP_NUM_THREADS"] == "2"
