"""Evaluation (paper §3.4, §4.1, §4.4): suites that judge a model and the run report.

    from llama2.eval import run_suites
    summary = run_suites("runs/x/sft/model", ["safety"], "runs/x/eval/sft")

`llama2 eval ...` is `llama2.eval.cli`, `llama2 report RUN_DIR` is `llama2.eval.report`.
"""

from llama2.eval.suites import SUITES, EvalOptions, Responder, run_suites, track_versions

__all__ = ["SUITES", "EvalOptions", "Responder", "run_suites", "track_versions"]
