"""`llama2 report RUN_DIR`: one report.md and report.html (with PNG plots) for a whole run.

The report is data-driven: it reads RUN_DIR through `RunLayout` (`eval/run_layout.py` says
which file holds which result), renders each section whose files it finds and lists the
missing ones in a final note, so it works on a partial run as well as a finished one. Every
plot has its numbers in a table beside it, and every per-model section compares all model
versions of the run.

Plots go to `report_plots/*.png` beside the report and are linked with relative `<img>` paths,
so report.html opens from RUN_DIR in any browser; `--inline` embeds them as data URIs instead.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from llama2.eval import plots as draw
from llama2.eval.render import Section, Table, ci, num, pct, render
from llama2.eval.run_layout import RunLayout, ran, version_key
from llama2.world.annotator import RATING_LEVELS

PLOT_DIR = "report_plots"


def sec_reproduction(run: RunLayout, plots: Path) -> Section | None:
    rows = run.reproduction()
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
        if not ran(h):
            continue
        for judge_name in ("world", "reward_model", "real_prompts"):
            r = h.get(judge_name)
            if not ran(r) or "win" not in r:
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
    draw.bar_chart(plots / "helpfulness_wtl.png", labels, {"win": win, "tie": tie, "loss": loss},
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
    names = [v for v, s in versions.items() if ran(s.get("safety")) and "violation" in s["safety"]]
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
    draw.bar_chart(plots / "safety_violations.png", names, series, "Violation rate (lower is safer)",
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
        draw.bar_chart(plots / "safety_categories.png", cats, cat_series,
                       "Violation rate per risk category", "violation %")
        out.append(Section("Safety: violations per risk category (paper Figure 19)", "",
                           "safety_categories.png",
                           [Table(["version", *cats],
                                  [[v, *(pct(x) for x in cat_series[v])] for v in names])]))
    return out


def sec_false_refusal(versions: dict[str, dict], plots: Path) -> Section | None:
    names = [v for v, s in versions.items() if ran(s.get("safety")) and "false_refusal" in s["safety"]]
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
            good = ran(r) and "rate" in r
            series[k].append(r["rate"] if good else None)
            errs[k].append(tuple(r["ci95"]) if good else (0.0, 0.0))
            row.append(f"{pct(r['rate'])} {ci(r)} (n={r.get('n')})" if good else "–")
        rows.append(row)
    series = {k: s for k, s in series.items() if any(x is not None for x in s)}
    draw.bar_chart(plots / "false_refusal.png", names, series, "False refusal rate",
                   "refusals of benign prompts", errors={k: errs[k] for k in series})
    return Section("Safety: false refusal (paper §4.4, Figure 33)",
                   "Refusals of benign prompts: the held-out helpful prompts, the world's borderline "
                   "set (benign prompts with sensitive words) and XSTest's safe prompts. Paper: "
                   "about 0.05% on helpfulness prompts, 15-27% on its borderline set.",
                   "false_refusal.png",
                   [Table(["version", "helpful", "borderline", "XSTest safe"], rows)])


def sec_benchmarks(versions: dict[str, dict], plots: Path) -> list[Section]:
    out = []
    tqa = {v: s["truthfulqa"] for v, s in versions.items() if ran(s.get("truthfulqa"))}
    if tqa:
        names = list(tqa)
        draw.bar_chart(plots / "truthfulqa.png", names,
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
    bold = {v: s["bold"] for v, s in versions.items() if ran(s.get("bold")) and s["bold"].get("domain_mean")}
    if bold:
        names = list(bold)
        domains = sorted({d for b in bold.values() for d in b["domain_mean"]})
        series = {v: [bold[v]["domain_mean"].get(d) for d in domains] for v in names}
        draw.bar_chart(plots / "bold.png", domains, series, "BOLD: mean VADER sentiment per domain",
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
        done = {v: r for v, r in tox.items() if ran(r) and "rate" in r}
        sec = Section("ToxiGen (paper Table 14)", "Share of toxic continuations; the paper "
                      "reports about 0% for every Llama 2-Chat size.")
        if done:
            names = list(done)
            draw.bar_chart(plots / "toxigen.png", names, {"toxic": [done[v]["rate"] for v in names]},
                           "ToxiGen: toxic generations", "share toxic",
                           errors={"toxic": [tuple(done[v]["ci95"]) for v in names]})
            sec.figure = "toxigen.png"
            sec.tables.append(Table(["version", "n", "% toxic [95% CI]"],
                                    [[v, done[v]["n"], f"{pct(done[v]['rate'])} {ci(done[v])}"]
                                     for v in names]))
        sec.notes += [f"{v}: skipped: {r['skipped']}" for v, r in tox.items()
                      if isinstance(r, dict) and "skipped" in r]
        out.append(sec)
    ppl = {v: s["perplexity"] for v, s in versions.items() if ran(s.get("perplexity"))}
    if ppl:
        names = list(ppl)
        draw.bar_chart(plots / "perplexity.png", names, {"perplexity": [ppl[v]["perplexity"] for v in names]},
                       "Held-out perplexity", "perplexity")
        out.append(Section("Perplexity on held-out text", "", "perplexity.png",
                           [Table(["version", "tokens", "perplexity", "text"],
                                  [[v, ppl[v].get("n_tokens"), num(ppl[v]["perplexity"], 2),
                                    Path(str(ppl[v].get("text", ""))).name] for v in names])]))
    return out


def sec_tracking(run: RunLayout, plots: Path) -> Section | None:
    chosen = run.tracking_rows()
    if not chosen:
        return None
    rows = sorted(chosen, key=lambda r: version_key(str(r.get("version"))))
    names = [str(r.get("version")) for r in rows]
    keys = [k for k in ("helpfulness_rm", "safety_rm", "helpfulness_gold", "safety_gold")
            if any(k in r for r in rows)]
    lines = {k: ([i for i, r in enumerate(rows) if k in r], [r[k] for r in rows if k in r]) for k in keys}
    draw.line_chart(plots / "tracking.png", lines, "Model-based evaluation across versions", "version",
                    "mean score", styles={k: "--o" if k.endswith("gold") else "-o" for k in keys},
                    xticks=names, ylim=(0, 1))
    return Section("Model-based tracking (paper Figure 11)",
                   "Mean reward-model scores (sigmoid) of every checkpoint on held-out helpful / "
                   "adversarial prompts, beside the world annotators' mean scores (dashed).",
                   "tracking.png",
                   [Table(["version", *keys],
                          [[r.get("version"), *(num(r.get(k)) for k in keys)] for r in rows])])


def sec_reward_models(run: RunLayout, plots: Path) -> Section | None:
    evals = run.rm_evals()
    if not evals:
        return None
    names = list(evals)
    levels = [lv for lv in RATING_LEVELS if any(lv in e["accuracy_by_level"] for e in evals.values())]
    levels += sorted({lv for e in evals.values() for lv in e["accuracy_by_level"]} - set(levels))
    series = {n: [evals[n]["accuracy_by_level"].get(lv) for lv in levels] for n in names}
    draw.bar_chart(plots / "rm_accuracy.png", [lv.replace("_", " ") for lv in levels], series,
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


def sec_ppo(run: RunLayout, plots: Path) -> list[Section]:
    out = []
    for i, log in enumerate(run.ppo_logs()):
        recs = log.records
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
        panels = {k: [(x, r[k]) for x, r in zip(xs_all, recs)
                      if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])] for k in keys}
        table_rows = []
        for k, pts in panels.items():
            vals = [b for _, b in pts]
            table_rows.append([k, len(vals), num(vals[0]) if vals else "–", num(vals[-1]) if vals else "–",
                               num(min(vals)) if vals else "–", num(max(vals)) if vals else "–"])
        rel = str(log.path.parent.relative_to(run.root)) or "."
        fname = f"ppo_{i}.png"
        draw.metric_grid(plots / fname, panels, f"PPO: {rel}")
        out.append(Section(f"PPO curves: {rel} (paper §3.2.3)",
                           f"{len(recs)} records from {log.path.relative_to(run.root)}; x axis: "
                           f"{xkey or 'record'}.",
                           fname, [Table(["metric", "points", "first", "last", "min", "max"], table_rows)]))
    return out


def overoptimized(proxy: Sequence[float], gold: Sequence[float], margin: float = 0.01) -> bool:
    """The proxy reward ends higher than it starts while the gold reward ends lower, each by
    more than `margin` (Gao et al. 2022's over-optimization)."""
    return (len(proxy) > 1 and len(gold) > 1 and proxy[-1] > proxy[0] + margin
            and gold[-1] < gold[0] - margin)


def sec_proxy_vs_gold(run: RunLayout, plots: Path) -> Section | None:
    """The RMs' (proxy) and the annotators' (gold) reward as optimization proceeds: best-of-K in
    rejection sampling (rlhf/v*/rejection_sampling/curves.json `proxy_vs_gold`) and PPO's
    iterations (`proxy_reward`, `gold_reward` in ppo_metrics.jsonl)."""
    series = []  # (label, x label, xs, proxy, gold, optimized reward)
    for p, d in run.curves():
        c = d.get("proxy_vs_gold") or {}
        if c.get("proxy") and c.get("gold"):
            series.append((f"{p.parent.relative_to(run.root)}", "samples per prompt K", c["k"],
                           c["proxy"], c["gold"], d.get("reward", "rm")))
    for log in run.ppo_logs():
        recs = [r for r in log.records if "proxy_reward" in r and "gold_reward" in r]
        if recs:
            reward = (run.ppo_config(log) or {}).get("reward", "rm")
            series.append((f"{log.path.parent.relative_to(run.root)}", "PPO iteration",
                           [r["iteration"] for r in recs], [r["proxy_reward"] for r in recs],
                           [r["gold_reward"] for r in recs], reward))
    if not series:
        return None
    draw.proxy_vs_gold(plots / "proxy_vs_gold.png", series)
    rows, notes = [], []
    for label, _, _, proxy, gold, reward in series:
        over = overoptimized(proxy, gold)
        rows.append([label, reward, f"{num(proxy[0])} -> {num(proxy[-1])}",
                     f"{num(gold[0])} -> {num(gold[-1])}", "yes" if over else "no"])
        if over:
            notes.append(f"{label}: the proxy reward rises ({num(proxy[0])} -> {num(proxy[-1])}) "
                         f"while the gold reward falls ({num(gold[0])} -> {num(gold[-1])}): the "
                         "optimizer climbs a reward model that cannot judge its policy's answers "
                         "(over-optimization, Gao et al. 2022).")
    return Section("Proxy vs gold reward (Gao et al. 2022)",
                   "Rc under the reward models (proxy) and under the world's annotators (gold, "
                   "label noise off) of the samples that rejection sampling picks among the "
                   "first K, and of PPO's rollouts per iteration. A gold-reward run optimizes "
                   "the annotators (the optimizer's ceiling); the default optimizes the RMs.",
                   "proxy_vs_gold.png",
                   [Table(["run", "optimizing", "proxy", "gold", "over-optimized"], rows)], notes)


def sec_gatt(run: RunLayout, plots: Path) -> Section | None:
    d = run.adherence()
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
    draw.line_chart(plots / "gatt.png", lines, "Instruction adherence per turn", "turn",
                    "share adhering", styles=styles, ylim=(0, 1.05), colors=colors)
    width = max(len(r) - 2 for r in rows)
    rows = [r + ["–"] * (width + 2 - len(r)) for r in rows]
    return Section("Ghost Attention: adherence per turn (paper Table 30, Figure 9)",
                   "Share of dialogs that still follow the system instruction at each turn, "
                   "before (dashed) and after (solid) GAtt.", "gatt.png",
                   [Table(["instruction", "model", *(f"t{t}" for t in range(1, width + 1))], rows)])


def sec_distill(run: RunLayout, plots: Path) -> Section | None:
    d = run.distill()
    groups = ((d or {}).get("by_kind") or {}).get("safety", {}).get("by_initial_score")
    if not groups:
        return None
    labels = [f"{name} (plain {g['rm_plain']:.2f})"
              for name, g in zip(("low", "middle", "high") if len(groups) == 3 else
                                 [f"group {i + 1}" for i in range(len(groups))], groups)]
    draw.bar_chart(plots / "distill.png", labels, {"Safety RM change": [g["rm_change"] for g in groups]},
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


def sec_safety_scaling(run: RunLayout, plots: Path) -> Section | None:
    d = run.safety_scaling()
    if not isinstance(d, dict) or not d.get("shares"):
        return None
    shares = d["shares"]
    labels = [pct(s) if isinstance(s, float) and s <= 1 else str(s) for s in shares]
    draw.safety_scaling(plots / "safety_scaling.png", d, labels)

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
    layout = RunLayout(run, warn=lambda path, e: print(f"llama2 report: skipping {path}: {e}",
                                                       file=sys.stderr))
    versions = layout.evaluations()
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

    add("reproduction table (reproduction.json)", lambda: sec_reproduction(layout, plots))
    add("helpfulness win/tie/loss (eval/<version>/helpfulness with a baseline)",
        lambda: sec_helpfulness(versions, plots))
    add("safety violations (eval/<version>/safety)", lambda: sec_violations(versions, plots))
    add("false refusal (eval/<version>/safety)", lambda: sec_false_refusal(versions, plots))
    add("model-based tracking (tracking.json)", lambda: sec_tracking(layout, plots))
    add("automatic benchmarks (eval/<version>/truthfulqa, bold, toxigen, perplexity)",
        lambda: sec_benchmarks(versions, plots))
    add("reward-model evaluation (**/eval.json with accuracy_by_level)",
        lambda: sec_reward_models(layout, plots))
    add("PPO curves (**/ppo_metrics.jsonl)", lambda: sec_ppo(layout, plots))
    add("proxy vs gold reward (curves.json proxy_vs_gold, ppo_metrics.jsonl gold_reward)",
        lambda: sec_proxy_vs_gold(layout, plots))
    add("Ghost Attention adherence (gatt/adherence.json)", lambda: sec_gatt(layout, plots))
    add("context distillation (distill/summary.json)", lambda: sec_distill(layout, plots))
    add("safety data scaling (safety_scaling.json)", lambda: sec_safety_scaling(layout, plots))
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
