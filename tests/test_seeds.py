"""bench/seeds.py: the pipeline over several seeds and the "k of n" table of findings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from llama2.stages.pipeline import parse_args

_spec = importlib.util.spec_from_file_location(
    "bench_seeds", Path(__file__).resolve().parents[1] / "bench" / "seeds.py")
seeds = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeds)  # type: ignore[union-attr]


def test_every_seed_and_dtype_of_the_pipeline_is_set(tmp_path: Path) -> None:
    args = seeds.pipeline_args(4, tmp_path / "s4", "float32", True, ["--eval.n_prompts", "9"])
    cfg = parse_args(args)
    assert cfg.out == str(tmp_path / "s4") and cfg.eval.n_prompts == 9
    assert cfg.seed == cfg.world.seed == 4
    for stage in (cfg.pretrain, cfg.sft, cfg.rlhf.helpful_rm, cfg.rlhf.safety_rm,
                  cfg.rlhf.rejection_sampling, cfg.gatt, cfg.distill):
        assert stage.train.seed == 4 and stage.train.dtype == "float32", type(stage).__name__
    assert cfg.rlhf.ppo.seed == cfg.rlhf.preferences.seed == cfg.rlhf.rejection_sampling.seed == 4
    default = parse_args(seeds.pipeline_args(0, tmp_path / "s0", "auto", False, []))
    assert default.pretrain.train.dtype == "auto" and default.pretrain.train.max_steps > 40


def test_table_counts_in_how_many_runs_each_finding_reproduced() -> None:
    def row(finding: str, ok: bool, measured: str) -> dict:
        return {"finding": finding, "reproduced": ok, "measured": measured}

    runs = {"seed 0": [row("A", True, "0.7"), row("B", False, "0.4")],
            "seed 1": [row("A", True, "0.8"), row("B", True, "0.6")],
            "seed 2": [row("A", False, "0.5"), row("B", False, "0.3")]}
    summary, md = seeds.table(runs)
    got = {s["finding"]: (s["reproduced"], s["runs"]) for s in summary}
    assert got == {"A": (2, 3), "B": (1, 3)}
    assert "| A | 2 of 3 |" in md and "seed 2: no, 0.5" in md


def test_threads_are_set_only_when_asked(monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert seeds.run_env(1)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in seeds.run_env(0)
