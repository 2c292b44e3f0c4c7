"""Tables and plots of experiment 4 (``rank_bound.py``), from whatever runs have finished.

``python experiments/report.py`` prints these tables with the others; this module can also be
run alone: ``python experiments/rank_bound_report.py [--out DIR] [--plots]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path
from typing import Any

import rankbound as rb

__all__ = ["analyse", "markdown", "plots"]


def _design(out: Path) -> rb.Design | None:
    base = out / "base.json"
    if not base.exists():
        return None
    raw = json.loads(base.read_text())["design"]
    fields = {f.name: f for f in dataclasses.fields(rb.Design)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields}
    return rb.Design(**kwargs)


def _recalls(runs: list[dict[str, Any]]) -> list[float]:
    return [r["metrics"]["recall"] for r in runs]


def _by_seed(runs: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r["seed"]: r for r in runs}


def analyse(out: Path) -> dict[str, Any] | None:
    """Everything the tables and plots show, from ``out``'s finished runs."""
    d = _design(out)
    if d is None:
        return None
    runs = rb.finished(out)
    base = json.loads((out / "base.json").read_text())
    q = rb.qualification(runs, d)
    methods = list(rb.search_methods(d))
    r = q["chosen_r"]
    if r is not None and not d.only:
        methods += rb.compare_methods(r, d)
    rows: dict[str, Any] = {}
    for m in methods:
        grid = {
            lr: runs[k]["metrics"]
            for lr in rb.grid_of(m, d)
            if (k := rb.run_key(m, lr, d.seeds[0])) in runs
        }
        chosen = rb.method_runs(m, runs, d)
        row: dict[str, Any] = {"method": m, "grid": grid, "best_lr": rb.best_lr(m, runs, d)}
        if chosen:
            row["runs"] = chosen
            row["recall"] = rb.mean_ci(_recalls(chosen))
            row["answer_nll"] = rb.mean_ci([x["metrics"]["answer_nll"] for x in chosen])
            row["probe_loss"] = rb.mean_ci([x["metrics"]["probe_loss"] for x in chosen])
            row["final_train_loss"] = rb.mean_ci([x["final_train_loss"] for x in chosen])
            row["step_s"] = statistics.median(x["timing"]["median_step_s"] for x in chosen)
            row["train_s"] = statistics.fmean(x["timing"]["train_seconds"] for x in chosen)
            extra = [e for x in chosen for e in x["timing"]["knot_extra_s"]]
            row["knot_extra_s"] = statistics.median(extra) if extra else None
            # whole steps from the curves: the knot step and the step before it (where
            # init="gradient" accumulates the gradient it initialises the next link from)
            at, before = [], []
            for x in chosen:
                curve = rb.read_curve(out, x["key"])
                med = statistics.median(c["step_s"] for c in curve if not c["knot"])
                for i, c in enumerate(curve):
                    if c["knot"]:
                        at.append(c["step_s"] - med)
                        if i > 0:
                            before.append(curve[i - 1]["step_s"] - med)
            row["knot_step_extra_s"] = statistics.median(at) if at else None
            row["pre_knot_step_extra_s"] = statistics.median(before) if before else None
            ranks = [x["chain"].get("effective_rank_mean") for x in chosen if x["chain"]]
            row["eff_rank"] = statistics.fmean(ranks) if ranks and None not in ranks else None
        rows[m.name] = row
    paired: dict[str, Any] = {}
    gap: dict[str, Any] = {}
    if r is not None and f"lora{r}" in rows and "runs" in rows[f"lora{r}"]:
        lo = _by_seed(rows[f"lora{r}"]["runs"])
        for name, row in rows.items():
            if name == f"lora{r}" or "runs" not in row:
                continue
            mine = _by_seed(row["runs"])
            seeds = [s for s in d.seeds if s in mine and s in lo]
            if not seeds:
                continue
            diffs = [mine[s]["metrics"]["recall"] - lo[s]["metrics"]["recall"] for s in seeds]
            paired[name] = {
                **rb.mean_ci(diffs),
                "better": sum(x > 0 for x in diffs),
                "diffs": diffs,
            }
            m = row["method"]
            total = m.total_rank()
            ref_name = f"lora{total}" if m.kind == "lora" and m.name.startswith("cola") else None
            ref = rows.get(ref_name) if ref_name else None
            if ref is not None and "runs" in ref and total != r:
                hi = _by_seed(ref["runs"])
                ss = [s for s in seeds if s in hi]
                ratios = []
                for s in ss:
                    den = hi[s]["metrics"]["recall"] - lo[s]["metrics"]["recall"]
                    num = mine[s]["metrics"]["recall"] - lo[s]["metrics"]["recall"]
                    ratios.append(num / den if den != 0 else math.nan)
                means = [
                    statistics.fmean(_recalls(x)) for x in (row["runs"], rows[f"lora{r}"]["runs"],
                                                            ref["runs"])
                ]  # fmt: skip
                den = means[2] - means[1]
                gap[name] = {
                    "reference": ref_name,
                    "of_means": (means[0] - means[1]) / den if den else math.nan,
                    "per_seed": rb.mean_ci(ratios) if ratios and all(map(math.isfinite, ratios))
                    else None,
                }  # fmt: skip
    return {
        "extras": _extras(runs, rows, d),
        "out": out,
        "design": d,
        "base": base,
        "runs": runs,
        "qualification": q,
        "rows": rows,
        "paired": paired,
        "gap": gap,
        "estimate": json.loads((out / "estimate.json").read_text())
        if (out / "estimate.json").exists()
        else None,
    }


def _extras(
    runs: dict[str, dict[str, Any]], rows: dict[str, Any], d: rb.Design
) -> list[dict[str, Any]]:
    """Supplementary runs (``--extra``, outside the design's analysis) against the LoRA of their
    base rank and of their total rank, seed by seed."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for x in runs.values():
        if x.get("phase") == "extra":
            groups.setdefault((x["method"]["name"], x["lr"]), []).append(x)
    out = []
    for (name, lr), xs in sorted(groups.items()):
        m = rb.method_by_name(name, d)
        mine = _by_seed(xs)
        entry: dict[str, Any] = {"method": m, "lr": lr, "runs": xs, "recall": rb.mean_ci(
            [mine[s]["metrics"]["recall"] for s in sorted(mine)])}  # fmt: skip
        for label, ref in (("base", f"lora{m.ranks[0]}"), ("total", f"lora{m.total_rank()}")):
            theirs = _by_seed(rows.get(ref, {}).get("runs", []))
            seeds = [s for s in sorted(mine) if s in theirs]
            if seeds:
                diffs = [mine[s]["metrics"]["recall"] - theirs[s]["metrics"]["recall"]
                         for s in seeds]  # fmt: skip
                entry[label] = {"reference": ref, **rb.mean_ci(diffs), "diffs": diffs,
                                "better": sum(x > 0 for x in diffs)}  # fmt: skip
        out.append(entry)
    return out


def _ci(c: dict[str, float] | None, scale: float = 1.0, digits: int = 1) -> str:
    if not c:
        return "–"
    if c["n"] < 2:
        return f"{c['mean'] * scale:.{digits}f} (n=1)"
    return f"{c['mean'] * scale:.{digits}f} ± {c['ci95'] * scale:.{digits}f}"


def _shape(m: rb.Method, d: rb.Design) -> str:
    if m.kind == "full":
        return "full rank"
    ranks = [m.ranks[min(i, len(m.ranks) - 1)] for i in range(m.links)]
    knots = m.knots(d.steps)
    if knots is None:
        knots = [round(d.steps * i / m.links) for i in range(1, m.links)]
    extra = []
    if m.reset != "full":
        extra.append(f'reset="{m.reset}"')
    if m.init != "kaiming":
        extra.append(f'init="{m.init}"')
    s = " + ".join(map(str, ranks))
    if knots:
        s += f"; knots {knots}"
    return s + (f"; {', '.join(extra)}" if extra else "")


def markdown(a: dict[str, Any]) -> str:
    """The Markdown tables of experiment 4."""
    d: rb.Design = a["design"]
    base = a["base"]
    q = a["qualification"]
    rows = a["rows"]
    n_runs = len(a["runs"])
    lines = []
    bm = base["metrics"]
    lines.append(
        f"{n_runs} runs finished. Base model (no training): recall {100 * bm['recall']:.1f}%, "
        f"answer NLL {bm['answer_nll']:.2f} nats/fact, probe loss {bm['probe_loss']:.3f}; "
        f"chance recall {100 * base['chance_recall']:.1f}%; {base['n_facts']} facts, "
        f"{base['mean_prompt_tokens']:.1f} prompt + {base['mean_answer_tokens']:.1f} answer "
        "tokens on average."
    )
    lines.append("")
    lines.append("**LR grid (seed 0, recall %)** — the chosen LR of each method is in bold.")
    lines.append("")
    width = max(len(d.lora_lrs), len(d.full_lrs))
    lines.append("| method | " + " | ".join(f"lr {i + 1}" for i in range(width)) + " |")
    lines.append("|---|" + "---|" * width)
    for name, row in rows.items():
        m = row["method"]
        cells = []
        for lr in rb.grid_of(m, d):
            met = row["grid"].get(lr)
            txt = "–" if met is None else f"{lr:g}: {100 * met['recall']:.1f}"
            cells.append(f"**{txt}**" if lr == row["best_lr"] and met is not None else txt)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "**Regime search** (recall, 3 seeds at each method's chosen LR; SE = √(SE²ₐ+SE²ᵦ) of "
        "the two seed means; qualifies if gap > 3·SE; the paired columns, not part of the rule, "
        "use the per-seed differences — same batches, same data order):"
    )
    lines.append("")
    lines.append(
        "| comparison | gap (points) | SE | gap / SE | qualifies | paired: per seed | "
        "paired mean ± 95% CI | paired gap / SE |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for k, v in q["table"].items():
        if v is None:
            lines.append(f"| {k} | (not finished) | | | | | | |")
            continue
        z = "∞" if math.isinf(v["z"]) else f"{v['z']:.1f}"
        hi_name, lo_name = k.split(" vs ")
        hi, lo = _by_seed(rows[hi_name]["runs"]), _by_seed(rows[lo_name]["runs"])
        diffs = [hi[s]["metrics"]["recall"] - lo[s]["metrics"]["recall"] for s in d.seeds]
        pc = rb.mean_ci(diffs)
        pz = pc["mean"] / pc["se"] if pc["se"] > 0 else math.inf
        lines.append(
            f"| {k} | {100 * v['gap']:+.1f} | {100 * v['se']:.2f} | {z} | "
            f"{'yes' if v['qualifies'] else 'no'} | "
            + ", ".join(f"{100 * x:+.1f}" for x in diffs)
            + f" | {_ci(pc, 100)} | {'∞' if math.isinf(pz) else f'{pz:.1f}'} |"
        )
    lines.append("")
    if q["decided"]:
        lines.append(
            f"Chosen base rank r = {q['chosen_r']} "
            f"({'qualifies' if q['qualified'] else 'no r qualified: largest gap/SE'})."
        )
    else:
        lines.append("The regime search has not finished yet: no base rank chosen.")
    lines.append("")
    lines.append(
        "**Every method** (mean ± 95% t-interval over the seeds; recall and NLL on all facts; "
        "probe = token loss on the CPython source slice; s/step = median wall time; knot = "
        "median extra seconds of `opt.step()` at a knot; knot step / step before: median extra "
        "seconds of the whole step at a knot and of the step before it, over knots and seeds):"
    )
    lines.append("")
    lines.append(
        "| method | links × rank; knots | lr | seeds | recall % | answer NLL | eff. rank | "
        "final train loss | probe loss | s/step | knot s | knot step / step before |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        if "runs" not in row:
            continue
        m = row["method"]
        er = row["eff_rank"]
        er_s = "full" if m.kind == "full" else ("–" if er is None else f"{er:.1f}")
        ke = row["knot_extra_s"]
        ks = (
            "–"
            if row["knot_step_extra_s"] is None
            else f"{row['knot_step_extra_s']:+.2f} / {row['pre_knot_step_extra_s']:+.2f}"
        )
        lines.append(
            f"| {name} | {_shape(m, d)} | {row['best_lr']:g} | {len(row['runs'])} | "
            f"{_ci(row['recall'], 100)} | {_ci(row['answer_nll'], 1, 2)} | {er_s} | "
            f"{_ci(row['final_train_loss'], 1, 3)} | {_ci(row['probe_loss'], 1, 3)} | "
            f"{row['step_s']:.2f} | {'–' if ke is None else f'{ke:.3f}'} | {ks} |"
        )
    r = q["chosen_r"]
    if a["paired"]:
        lines.append("")
        lines.append(
            f"**Paired differences to LoRA r = {r}** (same seed: same batches in the same order, "
            "and the same first A for chains whose first link has rank r), recall points, mean "
            "± 95% t-interval:"
        )
        lines.append("")
        lines.append(f"| method | − lora{r} (points) | seeds better |")
        lines.append("|---|---|---|")
        for name, p in a["paired"].items():
            lines.append(f"| {name} | {_ci(p, 100)} | {p['better']}/{p['n']} |")
    if a["gap"]:
        lines.append("")
        lines.append(
            "**Gap closed**: (recall(chain) − recall(LoRA r)) / (recall(LoRA of the chain's "
            "total rank) − recall(LoRA r)); 0 = no better than one rank-r LoRA, 1 = as good as one "
            "LoRA of the total rank:"
        )
        lines.append("")
        lines.append("| chain | reference | of the means | per seed (mean ± 95% CI) |")
        lines.append("|---|---|---|---|")
        for name, g in a["gap"].items():
            lines.append(
                f"| {name} | {g['reference']} | {g['of_means']:.2f} | {_ci(g['per_seed'], 1, 2)} |"
            )
    lines.append("")
    lines.append("**Per seed** (recall %, each method at its chosen LR):")
    lines.append("")
    lines.append("| method | " + " | ".join(f"seed {s}" for s in d.seeds) + " |")
    lines.append("|---|" + "---|" * len(d.seeds))
    for name, row in rows.items():
        if "runs" not in row:
            continue
        by = _by_seed(row["runs"])
        cells = [f"{100 * by[s]['metrics']['recall']:.1f}" if s in by else "–" for s in d.seeds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if a["extras"]:
        lines += ["", "**Supplementary runs** (`--extra`: one LR, not chosen by the grid, outside "
                  "the pre-registered analysis), recall %, and paired differences in points "
                  "(mean ± 95% t-interval; seeds ahead):", "",
                  "| method | links × rank; knots | lr | per seed | mean ± 95% CI "
                  "| − LoRA of its link rank | − LoRA of its total rank |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for e in a["extras"]:
            by = _by_seed(e["runs"])
            each = " / ".join(f"{100 * by[s]['metrics']['recall']:.1f}" for s in sorted(by))
            refs = []
            for label in ("base", "total"):
                c = e.get(label)
                refs.append(f"{c['reference']}: {_ci(c, 100)} ({c['better']}/{c['n']})"
                            if c else "–")  # fmt: skip
            lines.append(f"| {e['method'].name} | {_shape(e['method'], d)} | {e['lr']:g} | {each} "
                         f"| {_ci(e['recall'], 100)} | {refs[0]} | {refs[1]} |")  # fmt: skip
    return "\n".join(lines)


def _smooth(xs: list[float], w: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plots(a: dict[str, Any], dest: Path | None = None) -> list[Path]:
    """Loss curves with knots marked, gap closed vs chain length, recall vs rank (PNG files in
    ``dest``, by default the results folder)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d: rb.Design = a["design"]
    rows = a["rows"]
    r = a["qualification"]["chosen_r"]
    out: Path = a["out"]
    dest = out if dest is None else dest
    written: list[Path] = []
    window = max(1, d.steps // 24)

    # 1. loss curves: chains of 1, 2, 4, 8 links and the L=4 variants, knots dashed
    panels = [("LoRA ranks and full fine-tuning", [m.name for m in rb.search_methods(d)])]
    if r is not None:
        panels += [
            ("chain length", [f"lora{r}", f"cola2x{r}", f"cola4x{r}", f"cola8x{r}",
                              f"lora{8 * r}", "full"]),
            ("4-link variants", [f"lora{r}", f"cola4x{r}", f"cola4x{r}_down", f"cola4x{r}_keep",
                                 f"cola4x{r}_grad", f"cola4x{r}_grow", f"lora{4 * r}"]),
        ]  # fmt: skip
    panels = [(t, [n for n in names if n in rows and "runs" in rows[n]]) for t, names in panels]
    panels = [p for p in panels if p[1]]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
        for ax, (title, names) in zip(axes[0], panels, strict=True):
            for i, name in enumerate(names):
                curves = [rb.read_curve(out, x["key"]) for x in rows[name]["runs"]]
                n = min(len(c) for c in curves)
                mean = [statistics.fmean(c[t]["loss"] for c in curves) for t in range(n)]
                (line,) = ax.plot(range(1, n + 1), _smooth(mean, window), lw=1.4, label=name,
                                  color=f"C{i}")  # fmt: skip
                for k in [t + 1 for t in range(n) if curves[0][t]["knot"]]:
                    ax.axvline(k, color=line.get_color(), ls=":", lw=0.9, alpha=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.set_ylabel("training loss (answer cross-entropy)")
            ax.set_title(f"{title}: mean of seeds, {window}-step average (dotted: knots)",
                         fontsize=9)  # fmt: skip
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = dest / "loss_curves.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    # 2. gap closed vs chain length, drawn as the two paired gains it is the ratio of: what
    # LoRA L·r gains over LoRA r (the gap) and what the chain of L rank-r links gains (a ratio
    # per seed is unreadable when the gap of one seed is a few points)
    pr = a["paired"]
    if r is not None and pr:
        fig, ax = plt.subplots(figsize=(6.0, 4.0))

        def series(names: list[tuple[float, str]], **kw: Any) -> None:
            pts = [(x, pr[n]) for x, n in names if n in pr]
            if pts:
                ax.errorbar([x for x, _ in pts], [100 * c["mean"] for _, c in pts],
                            yerr=[100 * (c["ci95"] if c["n"] > 1 else 0) for _, c in pts],
                            capsize=3, **kw)  # fmt: skip
                ax.scatter([x for x, c in pts for _ in c["diffs"]],
                           [100 * v for _, c in pts for v in c["diffs"]], s=10, alpha=0.4,
                           color=kw["color"])  # fmt: skip

        series([(L, f"lora{L * r}") for L in (2, 4, 8)], marker="o", color="grey",
               label=f"LoRA L·{r} (the gap to close)")  # fmt: skip
        series([(L, f"cola{L}x{r}") for L in (2, 4, 8)], marker="s", color="C0",
               label=f"COLA L×{r}, even knots")  # fmt: skip
        for L in (2, 4, 8):
            g, c = a["gap"].get(f"cola{L}x{r}"), pr.get(f"cola{L}x{r}")
            if g and c and math.isfinite(g["of_means"]):
                ax.annotate(f"{g['of_means']:+.2f}", (L, 100 * c["mean"]), fontsize=7,
                            xytext=(6, -10), textcoords="offset points", color="C0")  # fmt: skip
        for j, (suffix, label) in enumerate(
            [("_down", "step-down 2r,r,r,r"), ("_keep", 'reset="none"'),
             ("_grad", 'init="gradient"'), ("_grow", "growing links 1:2:3:4")]
        ):  # fmt: skip
            series([(4 * 1.06 ** (j + 1), f"cola4x{r}{suffix}")], marker="D", ls="none",
                   color=f"C{j + 1}", label=f"4 links, {label}")  # fmt: skip
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks([2, 4, 8], ["2", "4", "8"])
        ax.set_xlabel(f"links L (each link {d.steps}/L steps; total rank L·{r})")
        ax.set_ylabel(f"recall − LoRA {r}, same seed (points)")
        ax.set_title(f"gain over LoRA {r} (mean, 95% CI over seeds; numbers: gap closed)",
                     fontsize=9)  # fmt: skip
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = dest / "gap_closed.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    # 3. recall vs (total) rank
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    pts = [(m.name, m.total_rank(), rows[m.name]) for m in rb.search_methods(d)
           if m.kind == "lora" and "recall" in rows.get(m.name, {})]  # fmt: skip
    if pts:
        ax.errorbar([p[1] for p in pts], [100 * p[2]["recall"]["mean"] for p in pts],
                    yerr=[100 * (p[2]["recall"]["ci95"] if p[2]["recall"]["n"] > 1 else 0)
                          for p in pts], marker="o", capsize=3, label="LoRA rank k")  # fmt: skip
        seeds = [(p[1], 100 * x["metrics"]["recall"]) for p in pts for x in p[2].get("runs", [])]
        ax.scatter([k for k, _ in seeds], [v for _, v in seeds], s=12, color="C0", alpha=0.45,
                   label="one seed")  # fmt: skip
    cola = [(n, row) for n, row in rows.items()
            if n.startswith("cola") and "_" not in n and "recall" in row]  # fmt: skip
    if cola:
        ax.errorbar([row["method"].total_rank() for _, row in cola],
                    [100 * row["recall"]["mean"] for _, row in cola],
                    yerr=[100 * (row["recall"]["ci95"] if row["recall"]["n"] > 1 else 0)
                          for _, row in cola], marker="s", capsize=3, ls="none",
                    label="COLA L×r (total rank L·r)")  # fmt: skip
    if "recall" in rows.get("full", {}):
        ax.axhline(100 * rows["full"]["recall"]["mean"], color="k", ls="--", lw=1,
                   label="full fine-tuning")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank of the update (sum of link ranks)")
    ax.set_ylabel("exact recall (%)")
    ax.set_title(f"recall after {d.steps} steps (95% CI over seeds)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = dest / "recall_vs_rank.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=rb.DEFAULT_OUT)
    p.add_argument("--plots", action="store_true")
    args = p.parse_args()
    a = analyse(args.out)
    if a is None:
        print(f"no results under {args.out}")
        return
    print(markdown(a))
    if args.plots:
        for path in plots(a):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
