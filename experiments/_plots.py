"""Plots shared by the experiment scripts (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["bar_by_task", "line_plot", "loss_curves"]


def bar_by_task(
    summary: Mapping[str, Mapping[str, Any]],
    methods: Sequence[str],
    key: str,
    path: Path,
    *,
    ylabel: str,
    baseline_key: str | None = None,
) -> None:
    """Grouped bars: one group per task, one bar per method, mean ± std error bars.

    ``summary[task][method][key]`` is ``{"mean": m, "std": s}``; ``summary[task][baseline_key]``
    (a number) is drawn as a dashed line over the group.
    """
    tasks = list(summary)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(tasks), 3.6))
    for j, method in enumerate(methods):
        xs, means, stds = [], [], []
        for i, task in enumerate(tasks):
            row = summary[task].get(method)
            if row is None:
                continue
            xs.append(i + (j - (len(methods) - 1) / 2) * width)
            means.append(row[key]["mean"])
            stds.append(row[key]["std"])
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=method)
    if baseline_key:
        for i, task in enumerate(tasks):
            base = summary[task].get(baseline_key)
            if base is not None:
                ax.hlines(
                    base,
                    i - 0.45,
                    i + 0.45,
                    colors="k",
                    linestyles="dashed",
                    label=baseline_key.replace("_", "-") if i == 0 else None,
                )
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel(ylabel)
    lows = [summary[t][m][key]["mean"] for t in tasks for m in methods if m in summary[t]]
    if baseline_key:
        lows += [summary[t][baseline_key] for t in tasks if baseline_key in summary[t]]
    if lows:
        ax.set_ylim(max(0.0, min(lows) - 0.05), None)
    ax.legend(fontsize=8, ncol=len(methods) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def loss_curves(runs: Sequence[Mapping[str, Any]], path: Path, *, seed: int) -> None:
    """Training loss per step of every method (one seed), one panel per task; knots dotted."""
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in runs:
            if r["task"] != task or r["seed"] != seed:
                continue
            curve = r["loss_curve"]
            k = max(1, len(curve) // 40)  # moving average over ~1/40 of the run
            smooth = [
                sum(curve[max(0, i - k + 1) : i + 1]) / len(curve[max(0, i - k + 1) : i + 1])
                for i in range(len(curve))
            ]
            (line,) = ax.plot(smooth, label=r["method"], lw=1.2)
            for knot in r["knots"]:
                ax.axvline(knot, color=line.get_color(), ls=":", lw=0.8)
        ax.set_title(f"{task} (seed {seed})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss (moving avg)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    logy: bool = False,
    logx: bool = False,
    hlines: Mapping[str, float] | None = None,
    markers: bool = False,
) -> None:
    """One line per ``name -> (xs, ys)``; optional labelled horizontal reference lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (name, (xs, ys)) in enumerate(series.items()):
        style = "-" if i < 10 else "--"  # ten colours, then dashed
        ax.plot(xs, ys, style, label=name, lw=1.3, marker="o" if markers else None, ms=4)
    for i, (name, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, color="gray", ls=["--", ":", "-."][i % 3], lw=0.9, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
