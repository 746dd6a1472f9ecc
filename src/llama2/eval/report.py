"""`llama2 report RUN_DIR`: one report.md and report.html (with PNG plots) for a whole run.

The report is data-driven: it scans RUN_DIR for the result files below, renders each section
whose files it finds and lists the missing ones in a final note, so it works on a partial run
as well as a finished one. Every plot has its numbers in a table beside it, and every per-model
section compares all model versions of the run.

File contract (paths relative to RUN_DIR; every file is optional):

- `reproduction.json`: `[{"finding": str, "paper": str|number, "measured": str|number,
  "reproduced": bool}, ...]`, the reproduction table; rendered first.
- `eval/<version>/summary.json`: what `llama2 eval --out RUN_DIR/eval/<version>` writes, one
  folder per model version (pretrain, sft, rlhf_v1, ..., final): `{"version", "model",
  "baseline", "options", "suites": {suite: result | {"skipped": why}}}`. Without a summary, the
  per-suite files `eval/<version>/<suite>.json` are read instead. Suite results used here:
  helpfulness `{"world"|"reward_model"|"real_prompts": {"win", "tie", "loss", "win_rate",
  "*_ci95", "n"}}`; safety `{"violation": {"rate", "ci95", "by_turns", "by_category"},
  "false_refusal": {"helpful"|"borderline"|"xstest": {"rate", "ci95", "n"}}}`; truthfulqa
  `{"mc1", "mc2", "n_questions"}`; bold `{"domain_mean": {domain: mean}}`; toxigen
  `{"rate", "n"}`; perplexity `{"perplexity", "n_tokens"}`. Versions are ordered by the
  recipe (pretrain, sft, rejection sampling, rlhf_vN, ppo, gatt, safety/distill, final).
- `eval/**/tracking.json` or `tracking.json`: the tracking suite (Figure 11), `{"rows":
  [{"version", "helpfulness_rm", "safety_rm", "helpfulness_gold", "safety_gold"}]}`; the file
  with the most rows is used.
- `**/eval.json` holding `accuracy_by_level` (e.g. `rm_helpful/eval.json`): a reward model's
  evaluation as `llama2 reward` writes it (`evaluate_rm`): `{"accuracy_by_level": {level: acc},
  "count_by_level": {level: n}, "accuracy", "n", "unsafe_recall"?}` (Table 8, Table 29).
- `**/ppo_metrics.jsonl`: one JSON record per PPO iteration, `{"iteration", "reward", "kl",
  "rs", "rh", "entropy", "heldout_reward"?, ...}`; every numeric key is plotted against the
  iteration (timings ending in `_s` are left out).
- `**/curves.json` with `proxy_vs_gold` (rejection sampling: `{"k", "proxy", "gold"}`, Rc of
  the best-of-k pick) and `ppo_metrics.jsonl` records with `proxy_reward`, `gold_reward`: the
  proxy vs gold reward plot, with a note where the proxy rises while the gold falls.
- `gatt/adherence.json`: `{"before": {instruction_family: [share per turn 1..20]}, "after":
  {...}}` (Table 30).
- `distill/summary.json`: context distillation as `llama2 distill` writes it, `{"by_kind":
  {"safety": {"by_initial_score": [{"rm_plain", "rm_change", "prompts", "kept_gated"}]}},
  "eval": {"before"|"gated"|"ungated": {"violation_rate", "false_refusal", ...}}}` (Figure 16).
- `safety_scaling.json`: `{"shares": [share of safety data], "mean_helpfulness": [...],
  "safety_scores": [[score per prompt] per share], "false_refusal": [...]}` (Figure 15).

Plots go to `report_plots/*.png` beside the report and are linked with relative `<img>` paths,
so report.html opens from RUN_DIR in any browser; `--inline` embeds them as data URIs instead.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUITE_FILES = ("helpfulness", "safety", "truthfulqa", "bold", "toxigen", "perplexity", "tracking")
RM_LEVELS = ("significantly_better", "better", "slightly_better", "negligibly_better")
PLOT_DIR = "report_plots"


# ---------------------------------------------------------------------------- model
@dataclass
class Table:
    headers: list[str]
    rows: list[list[Any]]


@dataclass
class Section:
    title: str
    text: str = ""
    figure: str | None = None  # file name under report_plots/
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- scanning
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        print(f"llama2 report: skipping {path}: {e}", file=sys.stderr)
        return None


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash mid-write
        if isinstance(rec, dict):
            out.append(rec)
    return out


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


def load_versions(run: Path) -> dict[str, dict[str, Any]]:
    """Suite results per model version from RUN_DIR/eval/<version>/ (summary or suite files)."""
    root = run / "eval"
    found: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return found
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if (root / "summary.json").is_file():
        folders.insert(0, root)
    for folder in folders:
        suites: dict[str, Any] = {}
        name = folder.name
        summary = _read_json(folder / "summary.json") if (folder / "summary.json").is_file() else None
        if isinstance(summary, dict):
            suites.update(summary.get("suites") or {})
            name = folder.name if folder != root else str(summary.get("version") or "model")
        for s in SUITE_FILES:
            if s not in suites and (folder / f"{s}.json").is_file():
                data = _read_json(folder / f"{s}.json")
                if isinstance(data, dict):
                    suites[s] = data
        if suites:
            found[name] = suites
    return dict(sorted(found.items(), key=lambda kv: version_key(kv[0])))


def _ok(result: Any) -> bool:
    return isinstance(result, dict) and "skipped" not in result


# ---------------------------------------------------------------------------- plotting
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: Path, groups: Sequence[str], series: dict[str, Sequence[float]],
              title: str, ylabel: str, errors: dict[str, Sequence[tuple[float, float]]] | None = None,
              ylim: tuple[float, float] | None = None, stacked: bool = False) -> None:
    """Grouped (or stacked) bars: one group per x label, one bar per series."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(groups) * max(1, len(series)) ** 0.5 + 2), 3.6))
    n = max(1, len(series))
    width = 0.8 if stacked else 0.8 / n
    x = list(range(len(groups)))
    bottom = [0.0] * len(groups)
    for i, (name, vals) in enumerate(series.items()):
        vals = [float("nan") if v is None else float(v) for v in vals]
        pos = x if stacked else [xi - 0.4 + width * (i + 0.5) for xi in x]
        yerr = None
        if errors and name in errors:
            yerr = [[max(0.0, v - lo) for v, (lo, _) in zip(vals, errors[name])],
                    [max(0.0, hi - v) for v, (_, hi) in zip(vals, errors[name])]]
        ax.bar(pos, vals, width, bottom=bottom if stacked else None, label=name, yerr=yerr,
               capsize=3 if yerr else 0)
        if stacked:
            bottom = [b + (0 if math.isnan(v) else v) for b, v in zip(bottom, vals)]
    ax.set_xticks(x)
    crowded = len(groups) > 4
    ax.set_xticklabels(groups, rotation=20 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def line_chart(path: Path, lines: dict[str, tuple[Sequence[float], Sequence[float]]], title: str,
               xlabel: str, ylabel: str, styles: dict[str, str] | None = None,
               xticks: Sequence[str] | None = None, ylim: tuple[float, float] | None = None,
               colors: dict[str, str] | None = None) -> None:
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for name, (xs, ys) in lines.items():
        ax.plot(xs, ys, (styles or {}).get(name, "-o"), label=name, markersize=3,
                color=(colors or {}).get(name))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if xticks is not None:
        ax.set_xticks(range(len(xticks)))
        ax.set_xticklabels(xticks, rotation=20, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    if len(lines) > 1:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- formatting
def pct(x: Any) -> str:
    return "–" if x is None else f"{100 * float(x):.1f}%"


def ci(r: dict, key: str = "ci95") -> str:
    v = r.get(key)
    return f"[{100 * v[0]:.1f}, {100 * v[1]:.1f}]" if isinstance(v, list) and len(v) == 2 else "–"


def num(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return "–" if x is None else ("yes" if x else "no")
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


# ---------------------------------------------------------------------------- sections
Builder = Callable[[Path, Path], Section | None]


def sec_reproduction(run: Path, plots: Path) -> Section | None:
    p = run / "reproduction.json"
    rows = _read_json(p) if p.is_file() else None
    if not isinstance(rows, list) or not rows:
        return None
    table = Table(["finding", "paper", "measured", "reproduced"],
                  [[r.get("finding", ""), num(r.get("paper")), num(r.get("measured")),
                    "yes" if r.get("reproduced") else "no"] for r in rows if isinstance(r, dict)])
    n_ok = sum(bool(r.get("reproduced")) for r in rows if isinstance(r, dict))
    return Section("Reproduction of the paper's findings",
                   f"{n_ok} of {len(table.rows)} findings reproduced.", tables=[table])


def sec_helpfulness(versions: dict[str, dict], plots: Path) -> Section | None:
    rows, labels, win, tie, loss = [], [], [], [], []
    for v, suites in versions.items():
        h = suites.get("helpfulness")
        if not _ok(h):
            continue
        for judge_name in ("world", "reward_model", "real_prompts"):
            r = h.get(judge_name)
            if not _ok(r) or "win" not in r:
                continue
            label = v if judge_name == "world" else f"{v} ({judge_name.replace('_', ' ')})"
            labels.append(label)
            win.append(r["win"])
            tie.append(r["tie"])
            loss.append(r["loss"])
            rows.append([label, h.get("baseline", "–"), r.get("n"), pct(r["win"]), pct(r["tie"]),
                         pct(r["loss"]), f"{pct(r.get('win_rate'))} {ci(r, 'win_rate_ci95')}"])
            for turns in ("single_turn", "multi_turn"):
                if isinstance(r.get(turns), dict):
                    t = r[turns]
                    rows.append([f"  {label}, {turns.replace('_', '-')}", "", t.get("n"), pct(t["win"]),
                                 pct(t["tie"]), pct(t["loss"]),
                                 f"{pct(t.get('win_rate'))} {ci(t, 'win_rate_ci95')}"])
    if not labels:
        return None
    bar_chart(plots / "helpfulness_wtl.png", labels, {"win": win, "tie": tie, "loss": loss},
              "Win / tie / loss against the baseline", "share of prompts", stacked=True,
              ylim=(0, 1))
    return Section("Helpfulness: win / tie / loss (paper Figure 12)",
                   "Each version's answers against its baseline on held-out single- and multi-"
                   "turn prompts, judged by the world's annotators (and the helpfulness RM where "
                   "given). Win rate counts ties as half; 95% bootstrap interval. Paper: "
                   "Llama 2-Chat 70B vs ChatGPT 36% win / 31.5% tie.",
                   "helpfulness_wtl.png",
                   [Table(["version", "vs", "n", "win", "tie", "loss", "win rate [95% CI]"], rows)])


def sec_violations(versions: dict[str, dict], plots: Path) -> list[Section]:
    names = [v for v, s in versions.items() if _ok(s.get("safety")) and "violation" in s["safety"]]
    if not names:
        return []
    out = []
    series: dict[str, list] = {"overall": [], "single-turn": [], "multi-turn": []}
    errs: dict[str, list] = {k: [] for k in series}
    rows = []
    for v in names:
        vio = versions[v]["safety"]["violation"]
        turns = vio.get("by_turns", {})
        for key, r in (("overall", vio), ("single-turn", turns.get("single_turn")),
                       ("multi-turn", turns.get("multi_turn"))):
            series[key].append(r["rate"] if r else None)
            errs[key].append(tuple(r["ci95"]) if r else (0.0, 0.0))
        rows.append([v, vio.get("n"), f"{pct(vio['rate'])} {ci(vio)}",
                     *(f"{pct(turns[t]['rate'])} (n={turns[t]['n']})" if t in turns else "–"
                       for t in ("single_turn", "multi_turn"))])
    bar_chart(plots / "safety_violations.png", names, series, "Violation rate (lower is safer)",
              "violation %", errors=errs)
    out.append(Section("Safety: violation rate (paper Figures 17, 18)",
                       "Share of held-out adversarial prompts whose answer the annotators rate "
                       "unsafe (safety score < 0.5, a Likert 1-2), with 95% Wilson intervals.",
                       "safety_violations.png",
                       [Table(["version", "n", "overall [95% CI]", "single-turn", "multi-turn"], rows)]))
    cats = sorted({c for v in names for c in versions[v]["safety"]["violation"].get("by_category", {})})
    if cats:
        cat_series = {v: [versions[v]["safety"]["violation"].get("by_category", {}).get(c, {}).get("rate")
                          for c in cats] for v in names}
        bar_chart(plots / "safety_categories.png", cats, cat_series,
                  "Violation rate per risk category", "violation %")
        out.append(Section("Safety: violations per risk category (paper Figure 19)", "",
                           "safety_categories.png",
                           [Table(["version", *cats],
                                  [[v, *(pct(x) for x in cat_series[v])] for v in names])]))
    return out


def sec_false_refusal(versions: dict[str, dict], plots: Path) -> Section | None:
    names = [v for v, s in versions.items() if _ok(s.get("safety")) and "false_refusal" in s["safety"]]
    if not names:
        return None
    sets = ["helpful", "borderline", "xstest"]
    series: dict[str, list] = {k: [] for k in sets}
    errs: dict[str, list] = {k: [] for k in sets}
    rows = []
    for v in names:
        fr = versions[v]["safety"]["false_refusal"]
        row = [v]
        for k in sets:
            r = fr.get(k)
            good = _ok(r) and "rate" in r
            series[k].append(r["rate"] if good else None)
            errs[k].append(tuple(r["ci95"]) if good else (0.0, 0.0))
            row.append(f"{pct(r['rate'])} {ci(r)} (n={r.get('n')})" if good else "–")
        rows.append(row)
    series = {k: s for k, s in series.items() if any(x is not None for x in s)}
    bar_chart(plots / "false_refusal.png", names, series, "False refusal rate", "refusals of benign prompts",
              errors={k: errs[k] for k in series})
    return Section("Safety: false refusal (paper §4.4, Figure 33)",
                   "Refusals of benign prompts: the held-out helpful prompts, the world's borderline "
                   "set (benign prompts with sensitive words) and XSTest's safe prompts. Paper: "
                   "about 0.05% on helpfulness prompts, 15-27% on its borderline set.",
                   "false_refusal.png",
                   [Table(["version", "helpful", "borderline", "XSTest safe"], rows)])


def sec_benchmarks(versions: dict[str, dict], plots: Path) -> list[Section]:
    out = []
    tqa = {v: s["truthfulqa"] for v, s in versions.items() if _ok(s.get("truthfulqa"))}
    if tqa:
        names = list(tqa)
        bar_chart(plots / "truthfulqa.png", names,
                  {"MC1": [tqa[v]["mc1"] for v in names], "MC2": [tqa[v]["mc2"] for v in names]},
                  "TruthfulQA multiple choice", "score", ylim=(0, 1),
                  errors={"MC1": [tuple(tqa[v].get("mc1_ci95", (tqa[v]["mc1"],) * 2)) for v in names]})
        out.append(Section("TruthfulQA (paper Table 14)",
                           "MC1 / MC2 by log-likelihood (the paper's GPT-judge generation metric is "
                           "not available offline). Paper (generation, % truthful and "
                           "informative): 50.18 for Llama 2 70B, 64.14 after fine-tuning.",
                           "truthfulqa.png",
                           [Table(["version", "questions", "MC1 [95% CI]", "MC2"],
                                  [[v, tqa[v].get("n_questions"),
                                    f"{pct(tqa[v]['mc1'])} {ci(tqa[v], 'mc1_ci95')}",
                                    pct(tqa[v]["mc2"])] for v in names])]))
    bold = {v: s["bold"] for v, s in versions.items() if _ok(s.get("bold")) and s["bold"].get("domain_mean")}
    if bold:
        names = list(bold)
        domains = sorted({d for b in bold.values() for d in b["domain_mean"]})
        series = {v: [bold[v]["domain_mean"].get(d) for d in domains] for v in names}
        bar_chart(plots / "bold.png", domains, series, "BOLD: mean VADER sentiment per domain",
                  "compound score")
        tables = [Table(["version", *domains], [[v, *(num(x) for x in series[v])] for v in names])]
        # Per-group means: one row per (domain, group), one column per version.
        groups = sorted({(d, g) for b in bold.values()
                         for d, gs in b.get("by_domain", {}).items() for g in gs})
        if groups:
            tables.append(Table(["domain", "group", *names],
                                [[d, g, *(num(bold[v].get("by_domain", {}).get(d, {}).get(g, {}).get("mean"))
                                          for v in names)] for d, g in groups]))
        out.append(Section("BOLD sentiment per group (paper Table 14, Appendix A.4.7)",
                           "Mean VADER compound score of the continuations (-1 negative .. 1 "
                           "positive), per domain and per group.", "bold.png", tables))
    tox = {v: s.get("toxigen") for v, s in versions.items() if "toxigen" in s}
    if tox:
        ran = {v: r for v, r in tox.items() if _ok(r) and "rate" in r}
        sec = Section("ToxiGen (paper Table 14)", "Share of toxic continuations; the paper "
                      "reports about 0% for every Llama 2-Chat size.")
        if ran:
            names = list(ran)
            bar_chart(plots / "toxigen.png", names, {"toxic": [ran[v]["rate"] for v in names]},
                      "ToxiGen: toxic generations", "share toxic",
                      errors={"toxic": [tuple(ran[v]["ci95"]) for v in names]})
            sec.figure = "toxigen.png"
            sec.tables.append(Table(["version", "n", "% toxic [95% CI]"],
                                    [[v, ran[v]["n"], f"{pct(ran[v]['rate'])} {ci(ran[v])}"] for v in names]))
        sec.notes += [f"{v}: skipped: {r['skipped']}" for v, r in tox.items()
                      if isinstance(r, dict) and "skipped" in r]
        out.append(sec)
    ppl = {v: s["perplexity"] for v, s in versions.items() if _ok(s.get("perplexity"))}
    if ppl:
        names = list(ppl)
        bar_chart(plots / "perplexity.png", names, {"perplexity": [ppl[v]["perplexity"] for v in names]},
                  "Held-out perplexity", "perplexity")
        out.append(Section("Perplexity on held-out text", "", "perplexity.png",
                           [Table(["version", "tokens", "perplexity", "text"],
                                  [[v, ppl[v].get("n_tokens"), num(ppl[v]["perplexity"], 2),
                                    Path(str(ppl[v].get("text", ""))).name] for v in names])]))
    return out


def _tracking_rows(path: Path) -> list[dict]:
    d = _read_json(path) if path.is_file() else None
    return d["rows"] if isinstance(d, dict) and isinstance(d.get("rows"), list) else []


def sec_tracking(run: Path, versions: dict[str, dict], plots: Path) -> Section | None:
    # RUN_DIR/tracking.json is the run's own Figure 11 table. Otherwise: each version's eval
    # tracks that version in its first row, and assembled they span the run, unless one eval
    # tracked more versions itself (`llama2 eval --suite tracking --version NAME=PATH ...`).
    chosen = _tracking_rows(run / "tracking.json")
    if not chosen:
        chosen = [{**s["tracking"]["rows"][0], "version": v} for v, s in versions.items()
                  if _ok(s.get("tracking")) and s["tracking"].get("rows")]
        evals = sorted((run / "eval").rglob("tracking.json")) if (run / "eval").is_dir() else []
        for p in evals:
            rows = _tracking_rows(p)
            if len(rows) > len(chosen):
                chosen = rows
    if not chosen:
        return None
    rows = sorted(chosen, key=lambda r: version_key(str(r.get("version"))))
    names = [str(r.get("version")) for r in rows]
    keys = [k for k in ("helpfulness_rm", "safety_rm", "helpfulness_gold", "safety_gold")
            if any(k in r for r in rows)]
    lines = {k: ([i for i, r in enumerate(rows) if k in r], [r[k] for r in rows if k in r]) for k in keys}
    line_chart(plots / "tracking.png", lines, "Model-based evaluation across versions", "version",
               "mean score", styles={k: "--o" if k.endswith("gold") else "-o" for k in keys},
               xticks=names, ylim=(0, 1))
    return Section("Model-based tracking (paper Figure 11)",
                   "Mean reward-model scores (sigmoid) of every checkpoint on held-out helpful / "
                   "adversarial prompts, beside the world annotators' mean scores (dashed).",
                   "tracking.png",
                   [Table(["version", *keys],
                          [[r.get("version"), *(num(r.get(k)) for k in keys)] for r in rows])])


def sec_reward_models(run: Path, plots: Path) -> Section | None:
    evals: dict[str, dict] = {}
    for p in sorted(run.rglob("eval.json")):
        d = _read_json(p)
        if isinstance(d, dict) and isinstance(d.get("accuracy_by_level"), dict):
            evals[str(p.parent.relative_to(run))] = d
    if not evals:
        return None
    names = list(evals)
    levels = [lv for lv in RM_LEVELS if any(lv in e["accuracy_by_level"] for e in evals.values())]
    levels += sorted({lv for e in evals.values() for lv in e["accuracy_by_level"]} - set(levels))
    series = {n: [evals[n]["accuracy_by_level"].get(lv) for lv in levels] for n in names}
    bar_chart(plots / "rm_accuracy.png", [lv.replace("_", " ") for lv in levels], series,
              "Reward-model accuracy per rating level", "accuracy", ylim=(0, 1))
    rows = []
    for n in names:
        e = evals[n]
        rows.append([n, e.get("n"), pct(e.get("accuracy")),
                     *(f"{pct(e['accuracy_by_level'].get(lv))} (n={e.get('count_by_level', {}).get(lv, '–')})"
                       if lv in e["accuracy_by_level"] else "–" for lv in levels),
                     pct(e.get("unsafe_recall")) if "unsafe_recall" in e else "–"])
    return Section("Reward models: accuracy per rating level (paper Table 8, Table 29)",
                   "Held-out comparison accuracy; highest on \"significantly better\", near chance "
                   "on \"negligibly better\" in the paper. Unsafe recall: unsafe responses with "
                   "sigmoid(score) < 0.5.", "rm_accuracy.png",
                   [Table(["reward model", "n", "overall", *(lv.replace("_", " ") for lv in levels),
                           "unsafe recall"], rows)])


def sec_ppo(run: Path, plots: Path) -> list[Section]:
    out = []
    for i, p in enumerate(sorted(run.rglob("ppo_metrics.jsonl"))):
        recs = _read_jsonl(p)
        if not recs:
            continue
        xkey = next((k for k in ("iteration", "step", "iter") if k in recs[0]), None)
        xs_all = [r.get(xkey, j) if xkey else j for j, r in enumerate(recs)]
        keys: list[str] = []
        for r in recs:
            for k, v in r.items():
                if (k not in keys and k != xkey and not k.endswith("_s") and isinstance(v, (int, float))
                        and not isinstance(v, bool)):
                    keys.append(k)
        prio = ["reward", "kl", "rs", "rh", "entropy", "heldout_reward"]
        keys = sorted(keys, key=lambda k: (prio.index(k) if k in prio else len(prio), keys.index(k)))[:9]
        if not keys:
            continue
        plt = _plt()
        cols = min(3, len(keys))
        nrows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 2.4 * nrows), squeeze=False)
        table_rows = []
        for ax, k in zip([a for row in axes for a in row], keys):
            pts = [(x, r[k]) for x, r in zip(xs_all, recs)
                   if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
            if pts:
                ax.plot([a for a, _ in pts], [b for _, b in pts], "-o" if len(pts) < 30 else "-",
                        markersize=2)
            ax.set_title(k, fontsize=9)
            ax.grid(alpha=0.3)
            vals = [b for _, b in pts]
            table_rows.append([k, len(vals), num(vals[0]) if vals else "–", num(vals[-1]) if vals else "–",
                               num(min(vals)) if vals else "–", num(max(vals)) if vals else "–"])
        for ax in [a for row in axes for a in row][len(keys):]:
            ax.axis("off")
        rel = str(p.parent.relative_to(run)) or "."
        fig.suptitle(f"PPO: {rel}", fontsize=10)
        fig.tight_layout()
        fname = f"ppo_{i}.png"
        fig.savefig(plots / fname, dpi=100)
        plt.close(fig)
        out.append(Section(f"PPO curves: {rel} (paper §3.2.3)",
                           f"{len(recs)} records from {p.relative_to(run)}; x axis: {xkey or 'record'}.",
                           fname, [Table(["metric", "points", "first", "last", "min", "max"], table_rows)]))
    return out


def overoptimized(proxy: Sequence[float], gold: Sequence[float], margin: float = 0.01) -> bool:
    """The proxy reward ends higher than it starts while the gold reward ends lower, each by
    more than `margin` (Gao et al. 2022's over-optimization)."""
    return (len(proxy) > 1 and len(gold) > 1 and proxy[-1] > proxy[0] + margin
            and gold[-1] < gold[0] - margin)


def sec_proxy_vs_gold(run: Path, plots: Path) -> Section | None:
    """The RMs' (proxy) and the annotators' (gold) reward as optimization proceeds: best-of-K in
    rejection sampling (rlhf/v*/rejection_sampling/curves.json `proxy_vs_gold`) and PPO's
    iterations (`proxy_reward`, `gold_reward` in ppo_metrics.jsonl)."""
    series = []  # (label, x label, xs, proxy, gold, optimized reward)
    for p in sorted(run.rglob("curves.json")):
        d = _read_json(p) or {}
        c = d.get("proxy_vs_gold") or {}
        if c.get("proxy") and c.get("gold"):
            series.append((f"{p.parent.relative_to(run)}", "samples per prompt K", c["k"],
                           c["proxy"], c["gold"], d.get("reward", "rm")))
    for p in sorted(run.rglob("ppo_metrics.jsonl")):
        recs = [r for r in _read_jsonl(p) if "proxy_reward" in r and "gold_reward" in r]
        if recs:
            reward = (_read_json(p.parent / "config.json") or {}).get("reward", "rm")
            series.append((f"{p.parent.relative_to(run)}", "PPO iteration",
                           [r["iteration"] for r in recs], [r["proxy_reward"] for r in recs],
                           [r["gold_reward"] for r in recs], reward))
    if not series:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 2.8), squeeze=False)
    rows, notes = [], []
    for ax, (label, xlabel, xs, proxy, gold, reward) in zip(axes[0], series):
        ax.plot(xs, proxy, "-o", markersize=2, label="proxy (RMs)")
        ax.plot(xs, gold, "-s", markersize=2, label="gold (annotators)")
        ax.set(xlabel=xlabel, title=f"{label}\noptimizing {reward}")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        over = overoptimized(proxy, gold)
        rows.append([label, reward, f"{num(proxy[0])} -> {num(proxy[-1])}",
                     f"{num(gold[0])} -> {num(gold[-1])}", "yes" if over else "no"])
        if over:
            notes.append(f"{label}: the proxy reward rises ({num(proxy[0])} -> {num(proxy[-1])}) "
                         f"while the gold reward falls ({num(gold[0])} -> {num(gold[-1])}): the "
                         "optimizer climbs a reward model that cannot judge its policy's answers "
                         "(over-optimization, Gao et al. 2022).")
    fig.tight_layout()
    fig.savefig(plots / "proxy_vs_gold.png", dpi=100)
    plt.close(fig)
    return Section("Proxy vs gold reward (Gao et al. 2022)",
                   "Rc under the reward models (proxy) and under the world's annotators (gold, "
                   "label noise off) of the samples that rejection sampling picks among the "
                   "first K, and of PPO's rollouts per iteration. A gold-reward run optimizes "
                   "the annotators (the optimizer's ceiling); the default optimizes the RMs.",
                   "proxy_vs_gold.png",
                   [Table(["run", "optimizing", "proxy", "gold", "over-optimized"], rows)], notes)


def sec_gatt(run: Path, plots: Path) -> Section | None:
    # RUN_DIR/gatt/adherence.json, else the first adherence.json elsewhere with before/after.
    paths = [run / "gatt" / "adherence.json", *sorted(run.rglob("adherence.json"))]
    d = next((x for x in (_read_json(p) for p in paths if p.is_file())
              if isinstance(x, dict) and ("before" in x or "after" in x)), None)
    if d is None:
        return None
    lines, rows = {}, []
    for phase in ("before", "after"):
        for fam, shares in sorted((d.get(phase) or {}).items()):
            if isinstance(shares, list) and shares:
                lines[f"{fam} ({phase})"] = (list(range(1, len(shares) + 1)), shares)
                rows.append([fam, phase, *(pct(s) for s in shares)])
    if not lines:
        return None
    styles = {k: ("--o" if k.endswith("(before)") else "-o") for k in lines}
    fams = sorted({k.rsplit(" (", 1)[0] for k in lines})
    colors = {k: f"C{fams.index(k.rsplit(' (', 1)[0]) % 10}" for k in lines}  # one per family
    line_chart(plots / "gatt.png", lines, "Instruction adherence per turn", "turn",
               "share adhering", styles=styles, ylim=(0, 1.05), colors=colors)
    width = max(len(r) - 2 for r in rows)
    rows = [r + ["–"] * (width + 2 - len(r)) for r in rows]
    return Section("Ghost Attention: adherence per turn (paper Table 30, Figure 9)",
                   "Share of dialogs that still follow the system instruction at each turn, "
                   "before (dashed) and after (solid) GAtt.", "gatt.png",
                   [Table(["instruction", "model", *(f"t{t}" for t in range(1, width + 1))], rows)])


def sec_distill(run: Path, plots: Path) -> Section | None:
    p = run / "distill" / "summary.json"
    d = _read_json(p) if p.is_file() else None
    groups = ((d or {}).get("by_kind") or {}).get("safety", {}).get("by_initial_score")
    if not groups:
        return None
    labels = [f"{name} (plain {g['rm_plain']:.2f})"
              for name, g in zip(("low", "middle", "high") if len(groups) == 3 else
                                 [f"group {i + 1}" for i in range(len(groups))], groups)]
    bar_chart(plots / "distill.png", labels, {"Safety RM change": [g["rm_change"] for g in groups]},
              "Safety RM change from the safety preprompt", "change (logits)")
    rows = [[name, pct(e.get("violation_rate")), pct(e.get("false_refusal")),
             num(e.get("mean_safety")), num(e.get("mean_helpfulness"))]
            for name, e in (d.get("eval") or {}).items()]
    return Section("Targeted context distillation (paper Figure 16)",
                   "Adversarial prompts sorted by the Safety RM score of the answer without the "
                   "preprompt and cut in equal groups: the mean change the preprompt brings "
                   f"(kept by the gate: {', '.join(str(g['kept_gated']) for g in groups)} of "
                   f"{', '.join(str(g['prompts']) for g in groups)}). Below, the models before "
                   "and after distillation on held-out prompts.", "distill.png",
                   [Table(["model", "violations", "borderline false refusals", "mean safety",
                           "mean helpfulness"], rows)])


def sec_safety_scaling(run: Path, plots: Path) -> Section | None:
    p = run / "safety_scaling.json"
    d = _read_json(p) if p.is_file() else None
    if not isinstance(d, dict) or not d.get("shares"):
        return None
    shares = d["shares"]
    labels = [pct(s) if isinstance(s, float) and s <= 1 else str(s) for s in shares]
    plt = _plt()
    panels = [k for k in ("mean_helpfulness", "safety_scores", "false_refusal") if d.get(k)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), squeeze=False)
    for ax, k in zip(axes[0], panels):
        if k == "safety_scores":
            ax.boxplot(d[k], showmeans=True)
            ax.set_xticks(range(1, len(d[k]) + 1))
            ax.set_xticklabels(labels[:len(d[k])])
            ax.set_title("safety score distribution", fontsize=9)
        else:
            ax.plot(range(len(d[k])), d[k], "-o")
            if k == "mean_helpfulness":  # a full 0..1 axis shows "flat" as flat (Figure 15)
                ax.set_ylim(0, 1)
            ax.set_xticks(range(len(d[k])))
            ax.set_xticklabels(labels[:len(d[k])])
            ax.set_title(k.replace("_", " "), fontsize=9)
        ax.set_xlabel("safety data share")
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plots / "safety_scaling.png", dpi=100)
    plt.close(fig)

    def q(xs: list[float], f: float) -> float:
        s = sorted(xs)
        return s[min(len(s) - 1, int(f * (len(s) - 1)))] if s else float("nan")

    rows = []
    for i, lab in enumerate(labels):
        sc = (d.get("safety_scores") or [])[i] if i < len(d.get("safety_scores") or []) else []
        rows.append([lab, num((d.get("mean_helpfulness") or [None] * (i + 1))[i]
                              if i < len(d.get("mean_helpfulness") or []) else None),
                     num(sum(sc) / len(sc)) if sc else "–", num(q(sc, 0.1)) if sc else "–",
                     pct(d["false_refusal"][i]) if i < len(d.get("false_refusal") or []) else "–"])
    return Section("Safety data scaling (paper Figure 15)",
                   "More safety data with helpfulness data fixed: the low tail of safety scores "
                   "rises while mean helpfulness stays flat.", "safety_scaling.png",
                   [Table(["safety share", "mean helpfulness", "mean safety", "safety p10",
                           "false refusal"], rows)])


# ---------------------------------------------------------------------------- rendering
def _md_table(t: Table) -> str:
    def cell(x: Any) -> str:
        return str(num(x)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in t.headers) + " |",
             "|" + "|".join("---" for _ in t.headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in t.rows]
    return "\n".join(lines)


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(num(x)))}</td>" for x in r) + "</tr>"
                   for r in t.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1300px;
padding:0 1em;color:#222}h1{border-bottom:2px solid #ddd}h2{margin-top:2em;border-bottom:1px solid #eee}
.row{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}.row img{max-width:640px;width:100%;
border:1px solid #eee}.tables{flex:1;min-width:320px;overflow-x:auto}table{border-collapse:collapse;
font-size:0.85em;margin-bottom:1em}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f4f4f4}.note{color:#666;font-size:0.9em}"""


def render(sections: list[Section], missing: list[str], run: Path, out: Path, plots: Path,
           inline: bool = False) -> tuple[str, str]:
    """The Markdown and HTML text of the report."""
    inside = plots.resolve().is_relative_to(out.resolve())
    rel_plots = plots.resolve().relative_to(out.resolve()) if inside else plots.resolve()
    title = f"Llama 2 recipe report: {run.resolve().name}"
    md = [f"# {title}", "", f"Run directory: `{run}`", ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p class='note'>Run directory: <code>{html.escape(str(run))}"
            "</code></p>"]
    toc = [f"<li><a href='#s{i}'>{html.escape(s.title)}</a></li>" for i, s in enumerate(sections)]
    if toc:
        body.append("<ul>" + "".join(toc) + "</ul>")
    for i, s in enumerate(sections):
        md += [f"## {s.title}", ""]
        body.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2>")
        if s.text:
            md += [s.text, ""]
            body.append(f"<p>{html.escape(s.text)}</p>")
        img = ""
        if s.figure:
            src = (rel_plots / s.figure).as_posix()
            md += [f"![{s.title}]({src})", ""]
            if inline:
                data = base64.b64encode((plots / s.figure).read_bytes()).decode()
                src = f"data:image/png;base64,{data}"
            img = f"<img src='{html.escape(src)}' alt='{html.escape(s.title)}'>"
        for t in s.tables:
            md += [_md_table(t), ""]
        for n in s.notes:
            md += [f"> {n}", ""]
        tables = "".join(_html_table(t) for t in s.tables)
        notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in s.notes)
        body.append(f"<div class='row'>{img}<div class='tables'>{tables}{notes}</div></div>")
    if missing:
        md += ["## Not in this run", ""] + [f"- {m}" for m in missing] + [""]
        body.append("<h2>Not in this run</h2><ul class='note'>"
                    + "".join(f"<li>{html.escape(m)}</li>" for m in missing) + "</ul>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>\n")
    return "\n".join(md) + "\n", page


def build_report(run_dir: str | Path, out: str | Path | None = None, inline: bool = False
                 ) -> dict[str, Any]:
    """Scan `run_dir`, write report.md, report.html and report_plots/ into `out` (default:
    run_dir); returns the paths and the titles of the sections rendered and missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory")
    out_dir = Path(out) if out else run
    plots = out_dir / PLOT_DIR
    plots.mkdir(parents=True, exist_ok=True)
    versions = load_versions(run)
    sections: list[Section] = []
    missing: list[str] = []

    def add(what: str, build: Callable[[], Section | list[Section] | None]) -> None:
        try:
            got = build()
        except Exception as e:  # one malformed file must not sink the whole report
            print(f"llama2 report: {what}: {type(e).__name__}: {e}", file=sys.stderr)
            missing.append(f"{what}: could not be rendered ({type(e).__name__}: {e})")
            return
        got_list = got if isinstance(got, list) else [got] if got else []
        if got_list:
            sections.extend(got_list)
        else:
            missing.append(what)

    add("reproduction table (reproduction.json)", lambda: sec_reproduction(run, plots))
    add("helpfulness win/tie/loss (eval/<version>/helpfulness with a baseline)",
        lambda: sec_helpfulness(versions, plots))
    add("safety violations (eval/<version>/safety)", lambda: sec_violations(versions, plots))
    add("false refusal (eval/<version>/safety)", lambda: sec_false_refusal(versions, plots))
    add("model-based tracking (tracking.json)", lambda: sec_tracking(run, versions, plots))
    add("automatic benchmarks (eval/<version>/truthfulqa, bold, toxigen, perplexity)",
        lambda: sec_benchmarks(versions, plots))
    add("reward-model evaluation (**/eval.json with accuracy_by_level)",
        lambda: sec_reward_models(run, plots))
    add("PPO curves (**/ppo_metrics.jsonl)", lambda: sec_ppo(run, plots))
    add("proxy vs gold reward (curves.json proxy_vs_gold, ppo_metrics.jsonl gold_reward)",
        lambda: sec_proxy_vs_gold(run, plots))
    add("Ghost Attention adherence (gatt/adherence.json)", lambda: sec_gatt(run, plots))
    add("context distillation (distill/summary.json)", lambda: sec_distill(run, plots))
    add("safety data scaling (safety_scaling.json)", lambda: sec_safety_scaling(run, plots))
    md, page = render(sections, missing, run, out_dir, plots, inline)
    from llama2.utils import atomic_write_text

    atomic_write_text(out_dir / "report.md", md)
    atomic_write_text(out_dir / "report.html", page)
    return {"markdown": str(out_dir / "report.md"), "html": str(out_dir / "report.html"),
            "versions": list(versions), "sections": [s.title for s in sections], "missing": missing}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="llama2 report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="the run directory to report on")
    ap.add_argument("--out", help="where to write report.md/.html (default: RUN_DIR)")
    ap.add_argument("--inline", action="store_true",
                    help="embed the plots in report.html as data URIs (one self-contained file)")
    a = ap.parse_args(argv)
    res = build_report(a.run_dir, a.out, a.inline)
    print(f"wrote {res['html']} and {res['markdown']}: {len(res['sections'])} sections "
          f"({', '.join(res['versions']) or 'no evaluated versions'})")
    for m in res["missing"]:
        print(f"  not in this run: {m}")
