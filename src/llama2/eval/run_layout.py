"""The run directory's layout: which file of RUN_DIR holds which result, read as parsed JSON.

The reproduction table (`stages/reproduction.py`) and the report (`eval/report.py`) read a run
only through `RunLayout`; each method returns the parsed file, or None where it is missing or
malformed (with `warn`, a malformed one is also reported). Paths are relative to RUN_DIR.

Files at fixed places (what `llama2 pipeline` writes):

- `reproduction.json`: `[{"finding": str, "paper": str|number, "measured": str|number,
  "reproduced": bool}, ...]`, the reproduction table.
- `versions.json`: `{version: checkpoint}` for every model version, in recipe order.
- `rlhf/rounds.json`: one record per RLHF round, `{"round", "rm_helpful", "rm_safety",
  "rejection_sampling", "best", "ppo"?, "model"}` (checkpoint paths; with `ppo_refresh`, the
  PPO model and Helpfulness RM of the round's last `rlhf/v<round>/refresh_<r>/`); each reward
  model's evaluation is the `eval.json` beside its checkpoint.
- `pipeline_config.json`: the settings of every stage of the run (`llama2 pipeline`), written last.
- `rlhf/v<round>/rejection_sampling/curves.json`: `{"curves": {"k", "max", "median"}, "sweep":
  {"temperatures", "max_by_k"}, "switch_ablation": {"with_switch", "without_switch",
  "n_safety_prompts"}, "proxy_vs_gold"?: {"k", "proxy", "gold"}, "reward"}` (Figures 7, 8,
  §3.2.3); beside it `samples.jsonl`, per prompt `{"prompt", "samples", "rc", "rs", "rh", ...}`
  (the K samples' rewards), and `train/config.json`, the round's settings (`sweep_prompts`).
- `rm_ablation/<name>/eval.json`: the reward-model ablations (margin_none, margin_small,
  margin_large, safety_no_aux, safety_aux; Tables 28, 29), evaluated on the same pairs in the
  same order: `correct_by_level`? and `unsafe_flagged_at_90_kept`? are per pair / per unsafe
  response, for paired comparisons.
- `eval/<version>/summary.json`: what `llama2 eval --out RUN_DIR/eval/<version>` writes, one
  folder per model version (pretrain, sft, rlhf_v1, ..., final): `{"version", "model",
  "baseline", "options", "suites": {suite: result | {"skipped": why}}}`. Without a summary, the
  per-suite files `eval/<version>/<suite>.json` are read instead. Suite results: helpfulness
  `{"world"|"reward_model"|"real_prompts": {"win", "tie", "loss", "win_rate", "*_ci95",
  "n"}}`; safety `{"violation": {"rate", "ci95", "by_turns", "by_category"}, "false_refusal":
  {"helpful"|"borderline"|"xstest": {"rate", "ci95", "n"}}}`; truthfulqa `{"mc1", "mc2",
  "n_questions"}`; bold `{"domain_mean": {domain: mean}}`; toxigen `{"rate", "n"}`;
  perplexity `{"perplexity", "n_tokens"}`. Versions are ordered by the recipe (pretrain, sft,
  rejection sampling, rlhf_vN, ppo, gatt, safety/distill, final).
- `eval/tracking.json`: the tracking suite over every version (Figure 11), `{"rows":
  [{"version", "helpfulness_rm", "safety_rm", "helpfulness_gold", "safety_gold",
  "<each>_scores"?: [per prompt]}], "n_helpful", "n_safety"}`; the per-prompt scores are on the
  same prompts in the same order for every version.
- `gatt/adherence.json`: `{"before": {instruction_family: [share per turn 1..20]}, "after":
  {...}, "neutral_marker_rate"?: {"before", "after"}}` (Table 30).
- `distill/summary.json`: context distillation as `llama2 distill` writes it, `{"by_kind":
  {"safety": {"by_initial_score": [{"rm_plain", "rm_change", "prompts", "kept_gated"}]}},
  "eval": {"before"|"gated"|"ungated": {"violation_rate", "false_refusal", ...}}}` (Figure 16);
  `distill/distilled.jsonl`, per prompt `{"kind", "plain", "distilled", "rm_plain",
  "rm_distilled", "gate", ...}`; `distill/config.json`, its settings (`n_eval_*`).
- `safety_scaling.json`: `{"shares": [share of safety data], "mean_helpfulness": [...],
  "mean_safety": [...], "safety_scores": [[score per prompt] per share], "false_refusal":
  [...], "n_eval"?: {"helpful", "safety", "borderline"}}` (Figure 15).
- `redteam.json`: `{"versions": [...], "n_tries", "violations_per_1000": [...], ...}` (§4.3).

Searched anywhere in RUN_DIR (so that the report also reads partial or hand-assembled runs):

- `tracking.json` or `eval/**/tracking.json`: the tracking table with the most rows, else the
  one assembled from each version's own tracking suite.
- `**/eval.json` holding `accuracy_by_level`: a reward model's evaluation as `llama2 reward`
  writes it (`evaluate_rm`): `{"accuracy_by_level": {level: acc}, "count_by_level": {level:
  n}, "accuracy", "n", "unsafe_recall"?}` (Table 8, Table 29).
- `**/ppo_metrics.jsonl`: one JSON record per PPO iteration, `{"iteration", "reward", "kl",
  "rs", "rh", "entropy", "heldout_reward"?, "proxy_reward"?, "gold_reward"?, ...}`, with the
  run's `config.json` (its `reward`) beside it.
- `**/curves.json`: rejection sampling's curves (above), for `proxy_vs_gold`.
- `**/adherence.json` with "before" or "after", where `gatt/adherence.json` is missing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUITE_FILES = ("helpfulness", "safety", "truthfulqa", "bold", "toxigen", "perplexity", "tracking")

_ORDER = (("pretrain", 0), ("base", 0), ("sft", 1), ("rejection", 2), ("rs", 2), ("rlhf", 3),
          ("ppo", 4), ("gatt", 5), ("safety", 6), ("distill", 6), ("final", 9))


def version_key(name: str) -> tuple[float, str]:
    """Recipe order of version names: pretrain < sft < rlhf_v1 < ... < final; others after."""
    low = name.lower()
    num = re.search(r"(\d+)", low)
    frac = int(num.group(1)) / 1000 if num else 0.0
    for prefix, rank in _ORDER:
        if low.startswith(prefix):
            return (rank + frac, low)
    return (8.0, low)


def read_jsonl(path: Path) -> list[dict]:
    """The JSON object records of a JSONL file; a line cut by a crash mid-write is skipped."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


@dataclass
class PPOLog:
    """One PPO run's metrics log: its path and its records."""

    path: Path
    records: list[dict]


class RunLayout:
    """A run directory's results. `warn(path, error)` hears of each malformed file."""

    def __init__(self, run_dir: str | Path,
                 warn: Callable[[Path, Exception], None] | None = None) -> None:
        self.root = Path(run_dir)
        self.warn = warn
        self._evaluations: dict[str, dict[str, Any]] | None = None

    def read(self, path: Path) -> Any:
        """A JSON file parsed; None where it is missing or malformed."""
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            if self.warn:
                self.warn(path, e)
            return None

    def read_jsonl(self, path: Path) -> list[dict] | None:
        """A JSONL file's records; None where it is missing or unreadable."""
        if not path.is_file():
            return None
        try:
            return read_jsonl(path)
        except (OSError, ValueError) as e:
            if self.warn:
                self.warn(path, e)
            return None

    # ------------------------------------------------------------------ fixed places
    @property
    def reproduction_path(self) -> Path:
        return self.root / "reproduction.json"

    @property
    def versions_path(self) -> Path:
        return self.root / "versions.json"

    def reproduction(self) -> list[dict] | None:
        return self.read(self.reproduction_path)

    def model_versions(self) -> dict[str, str] | None:
        """{version: checkpoint} of the run's model versions, in recipe order."""
        return self.read(self.versions_path)

    def pipeline_config(self) -> dict | None:
        return self.read(self.root / "pipeline_config.json")

    def rounds(self) -> list[dict] | None:
        return self.read(self.root / "rlhf" / "rounds.json")

    def rm_eval(self, kind: str, round: int = -1) -> dict | None:
        """The evaluation of a round's reward model (`kind`: "helpful" or "safety"; `round`: an
        index into the rounds, the last by default), beside the checkpoint rounds.json names."""
        try:
            checkpoint = Path(self.rounds()[round][f"rm_{kind}"])
        except (TypeError, IndexError, KeyError):
            return None
        return self.read(checkpoint.parent / "eval.json")

    def rm_ablation(self, name: str) -> dict | None:
        return self.read(self.root / "rm_ablation" / name / "eval.json")

    def rejection_sampling(self, round: int) -> dict | None:
        """Round `round`'s (from 1) rejection-sampling curves."""
        return self.read(self.root / "rlhf" / f"v{round}" / "rejection_sampling" / "curves.json")

    def rejection_samples(self, round: int) -> list[dict] | None:
        """Round `round`'s samples and their rewards, one record per prompt."""
        return self.read_jsonl(self.root / "rlhf" / f"v{round}" / "rejection_sampling"
                               / "samples.jsonl")

    def rejection_sampling_config(self, round: int) -> dict | None:
        return self.read(self.root / "rlhf" / f"v{round}" / "rejection_sampling" / "train"
                         / "config.json")

    def eval_summary(self, version: str) -> dict | None:
        return self.read(self.root / "eval" / version / "summary.json")

    def tracking(self) -> dict | None:
        return self.read(self.root / "eval" / "tracking.json")

    def gatt_eval(self) -> dict | None:
        return self.read(self.root / "gatt" / "adherence.json")

    def distill(self) -> dict | None:
        return self.read(self.root / "distill" / "summary.json")

    def distill_rows(self) -> list[dict] | None:
        """Context distillation per prompt (distill/distilled.jsonl)."""
        return self.read_jsonl(self.root / "distill" / "distilled.jsonl")

    def distill_config(self) -> dict | None:
        return self.read(self.root / "distill" / "config.json")

    def safety_scaling(self) -> dict | None:
        return self.read(self.root / "safety_scaling.json")

    def redteam(self) -> dict | None:
        return self.read(self.root / "redteam.json")

    # ------------------------------------------------------------------ searches
    def evaluations(self) -> dict[str, dict[str, Any]]:
        """{version: {suite: result}} from eval/<version>/ (summary or suite files), in recipe
        order; a summary.json in eval/ itself counts as the version it names."""
        if self._evaluations is None:
            self._evaluations = self._load_evaluations()
        return self._evaluations

    def _load_evaluations(self) -> dict[str, dict[str, Any]]:
        root = self.root / "eval"
        found: dict[str, dict[str, Any]] = {}
        if not root.is_dir():
            return found
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if (root / "summary.json").is_file():
            folders.insert(0, root)
        for folder in folders:
            suites: dict[str, Any] = {}
            name = folder.name
            summary = self.read(folder / "summary.json")
            if isinstance(summary, dict):
                suites.update(summary.get("suites") or {})
                name = folder.name if folder != root else str(summary.get("version") or "model")
            for s in SUITE_FILES:
                if s not in suites:
                    data = self.read(folder / f"{s}.json")
                    if isinstance(data, dict):
                        suites[s] = data
            if suites:
                found[name] = suites
        return dict(sorted(found.items(), key=lambda kv: version_key(kv[0])))

    def _tracking_rows(self, path: Path) -> list[dict]:
        d = self.read(path)
        return d["rows"] if isinstance(d, dict) and isinstance(d.get("rows"), list) else []

    def tracking_rows(self) -> list[dict]:
        """The Figure 11 rows: RUN_DIR/tracking.json's, else each version's own tracking (its
        first row), unless some eval/**/tracking.json tracked more versions itself (`llama2
        eval --suite tracking --version NAME=PATH ...`, the pipeline's eval/tracking.json)."""
        chosen = self._tracking_rows(self.root / "tracking.json")
        if chosen:
            return chosen
        chosen = [{**s["tracking"]["rows"][0], "version": v} for v, s in self.evaluations().items()
                  if ran(s.get("tracking")) and s["tracking"].get("rows")]
        evals = self.root / "eval"
        for p in sorted(evals.rglob("tracking.json")) if evals.is_dir() else []:
            rows = self._tracking_rows(p)
            if len(rows) > len(chosen):
                chosen = rows
        return chosen

    def rm_evals(self) -> dict[str, dict]:
        """{folder relative to RUN_DIR: evaluation} of every reward model evaluated in the run."""
        evals: dict[str, dict] = {}
        for p in sorted(self.root.rglob("eval.json")):
            d = self.read(p)
            if isinstance(d, dict) and isinstance(d.get("accuracy_by_level"), dict):
                evals[str(p.parent.relative_to(self.root))] = d
        return evals

    def ppo_logs(self) -> list[PPOLog]:
        """Every PPO metrics log of the run (records possibly empty), sorted by path."""
        return [PPOLog(p, read_jsonl(p)) for p in sorted(self.root.rglob("ppo_metrics.jsonl"))]

    def ppo_config(self, log: PPOLog) -> dict | None:
        """The configuration of the PPO run that wrote `log`."""
        return self.read(log.path.parent / "config.json")

    def curves(self) -> list[tuple[Path, dict]]:
        """(path, curves) of every rejection-sampling curves.json in the run, sorted by path."""
        found = ((p, self.read(p)) for p in sorted(self.root.rglob("curves.json")))
        return [(p, d or {}) for p, d in found]

    def adherence(self) -> dict | None:
        """The GAtt adherence: gatt/adherence.json, else the first adherence.json elsewhere in
        the run with "before" or "after"."""
        paths = [self.root / "gatt" / "adherence.json", *sorted(self.root.rglob("adherence.json"))]
        return next((x for x in (self.read(p) for p in paths)
                     if isinstance(x, dict) and ("before" in x or "after" in x)), None)


def ran(result: Any) -> bool:
    """A result that is there and was not skipped (`{"skipped": why}`)."""
    return isinstance(result, dict) and "skipped" not in result
