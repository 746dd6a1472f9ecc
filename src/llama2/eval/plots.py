"""The figures of the report and of the GAtt evaluation, as PNG files (matplotlib, Agg).

Each function takes the numbers to draw and a path; reading results and deciding what to show
is the caller's (`eval/report.py`, `stages/gatt.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---------------------------------------------------------------------------- report charts
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


def metric_grid(path: Path, panels: dict[str, list[tuple[float, float]]], title: str) -> None:
    """One small line plot per metric, three to a row (PPO's curves)."""
    plt = _plt()
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 2.4 * nrows), squeeze=False)
    for ax, (k, pts) in zip([a for row in axes for a in row], panels.items()):
        if pts:
            ax.plot([a for a, _ in pts], [b for _, b in pts], "-o" if len(pts) < 30 else "-",
                    markersize=2)
        ax.set_title(k, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in [a for row in axes for a in row][len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def proxy_vs_gold(path: Path, series: list[tuple[str, str, Sequence[float], Sequence[float],
                                                 Sequence[float], str]]) -> None:
    """One panel per optimization (label, x label, xs, proxy, gold, optimized reward): the
    proxy (RMs) and gold (annotators) reward side by side."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 2.8), squeeze=False)
    for ax, (label, xlabel, xs, proxy, gold, reward) in zip(axes[0], series):
        ax.plot(xs, proxy, "-o", markersize=2, label="proxy (RMs)")
        ax.plot(xs, gold, "-s", markersize=2, label="gold (annotators)")
        ax.set(xlabel=xlabel, title=f"{label}\noptimizing {reward}")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def safety_scaling(path: Path, d: dict[str, Any], labels: Sequence[str]) -> None:
    """Figure 15's panels over the safety data share: mean helpfulness (on a full 0..1 axis),
    the safety score distribution (box plots) and the false refusal rate, where given."""
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
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- GAtt
def plot_adherence(data: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Adherence per turn, one color per instruction family, dashed before and solid after
    GAtt (Table 30)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, fam in enumerate(sorted(data.get("after", data.get("before", {})))):
        color = f"C{i}"
        for key, style in (("before", "--"), ("after", "-")):
            if fam in data.get(key, {}):
                vals = data[key][fam]
                ax.plot(range(1, len(vals) + 1), vals, style, color=color,
                        label=f"{fam} ({key} GAtt)")
    ax.set(xlabel="turn", ylabel="share of answers obeying", ylim=(-0.05, 1.05),
           title="System-instruction adherence per turn (Table 30)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(att: dict[str, dict[str, Any]], path: Path) -> None:
    """Attention mass on the system message per layer, and per layer and turn (Figure 10),
    before and after GAtt."""
    plt = _plt()
    keys = [k for k in ("before", "after") if k in att]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.5 * (len(keys) + 1), 3.5))
    for k in keys:
        axes[0].plot(att[k]["per_layer"], "o-", label=f"{k} GAtt")
    axes[0].set(xlabel="layer", ylabel="attention mass on system message",
                title="Attention on the system message")
    axes[0].legend()
    for ax, k in zip(axes[1:], keys):
        im = ax.imshow(att[k]["per_layer_turn"], aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set(xlabel="turn", ylabel="layer", title=f"{k} GAtt (Figure 10)")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
