"""Tables and plots of experiment 6 (``pretrain.py``), from whatever runs have finished.

Run alone: ``python experiments/pretrain_report.py [--out DIR] [--plots] [--img DIR]``; it prints
the markdown tables and writes them to ``DIR/report.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pretrain as pt
from _runs import mean_ci, read_jsonl

__all__ = ["analyse", "markdown", "plots"]


def _design(out: Path) -> pt.Design | None:
    runs = sorted((out / "runs").glob("*.json"))
    if not runs:
        return None
    raw = json.loads(runs[0].read_text())["design"]
    fields = {f.name for f in pt.dataclasses.fields(pt.Design)}
    return pt.Design(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()
                        if k in fields})  # fmt: skip


def _window(losses: dict[int, float], lo: int, hi: int) -> float | None:
    xs = [losses[s] for s in range(lo + 1, hi + 1) if s in losses]
    return statistics.fmean(xs) if xs else None


def knot_costs(out: Path, chain_key: str, lora_key: str, d: pt.Design) -> list[dict[str, Any]]:
    """Per knot of the chain: its paired train and held-out differences to LoRA around the knot.

    Windows of training steps (same batches for both): the 50 before the knot, the 50 after,
    and steps 51–250 after; held-out losses at the knot and ``after_knot`` steps after it.
    """
    rows_c, rows_l = pt.curve_rows(out, chain_key), pt.curve_rows(out, lora_key)
    tc = {r["step"]: r["loss"] for r in rows_c if "loss" in r}
    tl = {r["step"]: r["loss"] for r in rows_l if "loss" in r}
    ec = {r["step"]: r["eval"] for r in rows_c if "eval" in r}
    el = {r["step"]: r["eval"] for r in rows_l if "eval" in r}
    diff = {s: tc[s] - tl[s] for s in tc if s in tl}
    out_rows = []
    for r in rows_c:
        if not r.get("knot"):
            continue
        k = r["step"]
        after = k + d.after_knot[0] if d.after_knot else k
        out_rows.append(
            {
                "knot": k,
                "train_before": _window(diff, k - 50, k),
                "train_after": _window(diff, k, k + 50),
                "train_later": _window(diff, k + 50, k + 250),
                "eval_at": ec[k] - el[k] if k in ec and k in el else None,
                "eval_after": ec[after] - el[after] if after in ec and after in el else None,
                "norm_mean": r["norm_mean"],
            }
        )
    return out_rows


def analyse(out: Path) -> dict[str, Any] | None:
    """Everything the tables and plots show, from ``out``'s finished (and running) runs."""
    d = _design(out)
    if d is None:
        return None
    runs = pt.finished(out)
    s0 = d.seeds[0]
    g = pt.gate(runs, d)
    arms: dict[str, Any] = {}
    for stage, arm, seed in pt.plan(runs, d):
        row = arms.setdefault(arm.name, {"arm": arm, "stage": stage, "grid": {}, "seeds": {}})
        lr = pt.lr_of(arm, runs, d)
        row["lr"] = lr
        if seed == s0 and pt.lr_rule(arm, d) is arm:
            for x in pt.grid(arm, runs, d):
                if (k := pt.run_key(arm, x, s0)) in runs:
                    row["grid"][x] = runs[k]["final_eval"]
        if lr is not None and (k := pt.run_key(arm, lr, seed)) in runs:
            row["seeds"][seed] = runs[k]
    lo_name = pt.lora_arm(d.rank).name
    lo = arms.get(lo_name, {}).get("seeds", {})
    for name, row in arms.items():
        mine = row["seeds"]
        if mine:
            row["loss"] = mean_ci([r["final_eval"] for r in mine.values()])
        common = [s for s in d.seeds if s in mine and s in lo]
        if name != lo_name and common:
            diffs = [mine[s]["final_eval"] - lo[s]["final_eval"] for s in common]
            row["paired"] = {**mean_ci(diffs), "diffs": diffs,
                             "ahead": sum(x < 0 for x in diffs)}  # fmt: skip
        # gap closed towards full rank and towards the LoRA of the chain's total rank
        arm = row["arm"]
        if arm.link_steps and common:
            refs = {"full": arms.get("full"), "lora_rL": arms.get(f"lora{arm.total_rank(d.steps)}")}
            row["gap"] = {}
            for ref_name, ref in refs.items():
                if not ref or not ref["seeds"]:
                    continue
                ss = [s for s in common if s in ref["seeds"]]
                ratios = [
                    (lo[s]["final_eval"] - mine[s]["final_eval"])
                    / (lo[s]["final_eval"] - ref["seeds"][s]["final_eval"])
                    for s in ss
                    if lo[s]["final_eval"] != ref["seeds"][s]["final_eval"]
                ]
                if ratios:
                    row["gap"][ref_name] = {**mean_ci(ratios), "ratios": ratios}
        if arm.link_steps and s0 in mine and s0 in lo:
            row["knot_costs"] = knot_costs(out, mine[s0]["key"], lo[s0]["key"], d)
        elif arm.link_steps and row.get("lr") is None:  # LR not chosen yet: a grid point
            for x in row["grid"]:  # against LoRA r at the same LR, where it has finished
                ref = runs.get(pt.run_key(pt.lora_arm(d.rank), x, s0))
                if ref is not None and "knot_costs" not in row:
                    key = pt.run_key(arm, x, s0)
                    row["knot_costs"] = knot_costs(out, key, ref["key"], d)
    running = []
    for p in sorted((out / "curves").glob("*.jsonl")):
        rows = read_jsonl(p)
        steps = [r["step"] for r in rows if "loss" in r]
        evals = [(r["step"], r["eval"]) for r in rows if "eval" in r]
        running.append({"key": p.stem, "step": max(steps, default=0),
                        "eval": evals[-1] if evals else None, "evals": evals})  # fmt: skip
        # a chain in progress against the finished LoRA r of its seed: knots so far, paired
        # (LoRA r at the chain's LR and seed, whether or not that LR is the chosen one)
        name, lr_text, seed_text = p.stem.split("__")
        arm = pt.arm_by_name(name, d)
        seed = int(seed_text[1:])
        ref = runs.get(pt.run_key(pt.lora_arm(d.rank), float(lr_text[2:]), seed))
        if arm.link_steps and ref is not None and name in arms:
            running[-1]["paired"] = [
                (st, v - e) for st, v in evals for s2, e in ref["evals"] if s2 == st
            ]
            if seed == s0:
                costs = knot_costs(out, p.stem, ref["key"], d)
                arms[name].setdefault("knot_costs_running", costs)
    warm = {r["seed"]: r for k, r in runs.items() if k.startswith("warm__")}
    return {
        "out": out,
        "design": d,
        "runs": runs,
        "arms": arms,
        "gate": g,
        "running": running,
        "warm": warm,
    }


def _f(x: float | None, nd: int = 4, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "diverged"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def markdown(a: dict[str, Any] | None) -> str:
    """The report's tables (markdown)."""
    if a is None:
        return "Experiment 6: no finished run yet.\n"
    d: pt.Design = a["design"]
    lines = ["### Experiment 6 (pretrain.py): held-out loss, nats per byte", ""]
    info = next(iter(a["warm"].values()), None)
    if info:
        di = info["data"]
        lines += [
            f"Data: Python {di['python']} stdlib, {di['files']} files "
            f"({di['heldout_files']} held out), file list {di['file_list_sha256']}, "
            f"content {di['content_sha256']}; device {info['device']}. Warm start (200 steps) "
            "held-out: "
            + ", ".join(f"seed {s} {_f(w['eval_loss'])}" for s, w in sorted(a["warm"].items())),
            "",
        ]
    g = a["gate"]
    if g["decided"]:
        ahead = ", ".join(g["ahead"]) or "none"
        lines += [f"**Gate (seed {d.seeds[0]}):** LoRA r{d.rank} {_f(g['lora'])}; chains ahead: "
                  f"{ahead}; best chain {g['best_chain']}.", ""]  # fmt: skip
    else:
        lines += ["**Gate:** not finished.", ""]
    grids = {n: r for n, r in a["arms"].items() if r["grid"]}
    if grids:
        lrs = sorted({x for r in grids.values() for x in r["grid"]})
        lines += ["LR grid (seed 0, loss at the last step; chosen in bold):", "",
                  "| arm | " + " | ".join(f"{x:g}" for x in lrs) + " |",
                  "|---|" + "---|" * len(lrs)]  # fmt: skip
        for n, r in grids.items():
            cells = []
            for x in lrs:
                v = r["grid"].get(x)
                s = _f(v) if v is not None else ""
                cells.append(f"**{s}**" if v is not None and x == r["lr"] else s)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        f"| arm | stage | LR | links | loss per seed | mean ± 95% CI | − LoRA r{d.rank}, paired "
        "| seeds ahead | gap closed to full | gap closed to LoRA r·L |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, r in a["arms"].items():
        arm = r["arm"]
        seeds = r["seeds"]
        per = " / ".join(_f(seeds[s]["final_eval"]) if s in seeds else "·" for s in d.seeds)
        loss = r.get("loss")
        ci = f"{_f(loss['mean'])} ± {_f(loss['ci95'], 4)}" if loss else "not finished"
        p = r.get("paired")
        pd = f"{_f(p['mean'], sign=True)} ± {_f(p['ci95'])}" if p else "—"
        ahead = f"{p['ahead']} / {p['n']}" if p else "—"
        gap = r.get("gap", {})
        gf = (f"{_f(gap['full']['mean'], 2)} ± {_f(gap['full']['ci95'], 2)}"
              if "full" in gap else "—")  # fmt: skip
        gl = (f"{_f(gap['lora_rL']['mean'], 2)} ± {_f(gap['lora_rL']['ci95'], 2)}"
              if "lora_rL" in gap else "—")  # fmt: skip
        links = "—" if arm.kind == "full" else f"{arm.links(d.steps)} × {arm.rank}"
        lr = f"{r['lr']:g}" if r.get("lr") is not None else "?"
        lines.append(f"| {n} | {r['stage']} | {lr} | {links} | {per} | {ci} | {pd} | {ahead} "
                     f"| {gf} | {gl} |")  # fmt: skip
    lines.append("")
    knots = {n: r["knot_costs"] for n, r in a["arms"].items() if r.get("knot_costs")}
    knots |= {f"{n} (running)": r["knot_costs_running"] for n, r in a["arms"].items()
              if r.get("knot_costs_running") and not r.get("knot_costs")}  # fmt: skip
    if knots:
        lines += [
            f"What a knot costs (seed {d.seeds[0]}; chain − LoRA r{d.rank}, same batches; train = "
            "mean training-loss difference over the steps before / after the knot):",
            "",
            "| chain | knot | train −50..0 | train 0..50 | train 50..250 | held-out at knot | "
            f"held-out +{d.after_knot[0] if d.after_knot else 0} | link norm (mean) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for n, ks in knots.items():
            for k in ks:
                lines.append(
                    f"| {n} | {k['knot']} | {_f(k['train_before'], sign=True)} | "
                    f"{_f(k['train_after'], sign=True)} | {_f(k['train_later'], sign=True)} | "
                    f"{_f(k['eval_at'], sign=True)} | {_f(k['eval_after'], sign=True)} | "
                    f"{_f(k['norm_mean'], 3)} |"
                )
        lines.append("")
    upd = [(n, r["seeds"][d.seeds[0]]) for n, r in a["arms"].items() if d.seeds[0] in r["seeds"]]
    if upd:
        lines += [
            f"The summed update ΔW = W(end) − W(warm start) (seed {d.seeds[0]}, mean over the "
            "adapted matrices), and each link's norm:",
            "",
            "| arm | ‖ΔW‖_F | entropy rank | rank for 90% of ‖ΔW‖² | stable rank | link norms "
            "| s per step |",
            "|---|---|---|---|---|---|---|",
        ]
        for n, r in upd:
            u = r["update"]
            norms = r["chain"].get("link_norm_mean") if r["chain"] else None
            ln = ", ".join(f"{x:.3f}" for x in norms) if norms else "—"
            lines.append(
                f"| {n} | {u['fro']:.3f} | {u['entropy_rank']:.1f} | {u['rank90']:.1f} | "
                f"{u['stable_rank']:.2f} | {ln} | {r['timing']['s_per_step']} |"
            )
        lines.append("")
    if a["running"]:
        lines += ["Running or interrupted (paired: held-out loss − that of LoRA r at the same "
                  "LR, seed and step, where it has finished):", "",
                  "| run | steps done | last held-out | paired, by step |",
                  "|---|---|---|---|"]  # fmt: skip
        for r in a["running"]:
            ev = f"{_f(r['eval'][1])} at {r['eval'][0]}" if r["eval"] else "—"
            pair = ", ".join(f"{st}: {_f(x, sign=True)}" for st, x in r.get("paired", []) if st)
            lines.append(f"| {r['key']} | {r['step']} / {d.steps} | {ev} | {pair or '—'} |")
        lines.append("")
    return "\n".join(lines)


def plots(a: dict[str, Any] | None, img: Path, prefix: str = "pretrain") -> list[Path]:
    """Held-out curves with knots marked, the gap figure, the knot diagnostic and the
    link-length curve over seeds (PNG)."""
    if a is None:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d: pt.Design = a["design"]
    s0 = d.seeds[0]
    img.mkdir(parents=True, exist_ok=True)
    paths = []
    out_runs = [(n, r["seeds"][s0], r["arm"]) for n, r in a["arms"].items() if s0 in r["seeds"]]
    for n, r in a["arms"].items():  # an arm whose LR is not chosen yet: its finished grid runs
        if r.get("lr") is None:
            for lr in r["grid"]:
                out_runs.append((n, a["runs"][pt.run_key(r["arm"], lr, s0)], r["arm"]))
    # 1. held-out loss curves, seed 0, knots dotted
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for n, r, arm in out_runs:
        xs, ys = zip(*[(s, v) for s, v in r["evals"] if s > 0], strict=True)
        style = "-" if arm.link_steps else "--"
        (line,) = ax.plot(xs, ys, style, lw=1.3, label=f"{n} (LR {r['lr']:g})")
        for k in arm.knots(d.steps):
            ax.axvline(k, color=line.get_color(), ls=":", lw=0.7)
    for r in a["running"]:  # unfinished runs of seed 0: thin, marked as running
        arm_name, lr_text, seed_text = r["key"].split("__")
        if seed_text != f"s{s0}" or len(r["evals"]) < 2:
            continue
        arm = pt.arm_by_name(arm_name, d)
        xs, ys = zip(*[(s, v) for s, v in r["evals"] if s > 0], strict=True)
        label = f"{arm_name} (LR {lr_text[2:]}, running: step {r['step']})"
        (line,) = ax.plot(xs, ys, "-" if arm.link_steps else "--", lw=0.9, label=label)
        for k in arm.knots(d.steps):
            if k <= r["step"]:
                ax.axvline(k, color=line.get_color(), ls=":", lw=0.7)
        out_runs.append((arm_name, {"evals": r["evals"], "key": r["key"]}, arm))
    ax.set_xlabel("step after the warm start")
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.set_title(f"seed {s0}; knots dotted")
    lows = [v for _, r, _ in out_runs for s, v in r["evals"] if s >= d.steps // 3]
    if lows:
        ax.set_ylim(min(lows) - 0.02, max(lows) + 0.05)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(img / f"{prefix}_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    # 2. gap: final loss minus LoRA r's, same seed, every arm and seed
    lo = a["arms"].get(pt.lora_arm(d.rank).name, {}).get("seeds", {})
    names = [n for n, r in a["arms"].items() if r.get("paired")]
    if names:
        fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.6))
        for i, n in enumerate(names):
            p = a["arms"][n]["paired"]
            ax.barh(i, p["mean"], color="C0" if a["arms"][n]["arm"].link_steps else "C7")
            ax.plot(p["diffs"], [i] * len(p["diffs"]), "k.", ms=6)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()  # the plan's order, top down
        ax.set_xlabel(f"held-out loss − LoRA r{d.rank}'s (same seed; < 0: better than LoRA)")
        ax.set_title(f"bars: mean; dots: seeds (LoRA r{d.rank} seeds: {len(lo)})")
        fig.tight_layout()
        paths.append(img / f"{prefix}_gap.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)

    # 3. training-loss difference to LoRA r around the knots (moving average of 50 steps)
    def lora_key(r: dict[str, Any]) -> str | None:  # LoRA r of the chain's seed and LR
        key = r["key"].split("__")
        k = f"lora{d.rank}__{key[1]}__{key[2]}"
        return k if k in a["runs"] else None

    chains = [(n, r, arm) for n, r, arm in out_runs if arm.link_steps and lora_key(r)]
    if chains:
        fig, ax = plt.subplots(figsize=(7.5, 4.0))
        for n, r, arm in chains:
            rows = pt.curve_rows(a["out"], lora_key(r))  # type: ignore[arg-type]
            base = {x["step"]: x["loss"] for x in rows if "loss" in x}
            mine = {x["step"]: x["loss"] for x in pt.curve_rows(a["out"], r["key"]) if "loss" in x}
            steps = sorted(s for s in mine if s in base)
            diffs = [mine[s] - base[s] for s in steps]
            k = 50
            smooth = [statistics.fmean(diffs[max(0, i - k + 1) : i + 1]) for i in range(len(diffs))]
            lr = r["key"].split("__")[1][2:]  # the run key's "lr<value>"
            (line,) = ax.plot(steps, smooth, lw=1.1, label=f"{n} (LR {lr})")
            for kn in arm.knots(d.steps):
                ax.axvline(kn, color=line.get_color(), ls=":", lw=0.7)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("step after the warm start")
        ax.set_ylabel(f"train loss − LoRA r{d.rank}'s (50-step mean)")
        ax.set_title(f"seed {s0}, same batches; knots dotted")
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(img / f"{prefix}_knot_cost.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    # 4. the link-length curve: held-out chain − LoRA r over the run, every chain on 2+ seeds
    curve = [(n, r) for n, r in a["arms"].items() if r["arm"].link_steps and len(r["seeds"]) > 1]
    curve.sort(key=lambda nr: -nr[1]["arm"].link_steps)  # fewest links first
    if curve and lo:
        fig, axes = plt.subplots(1, len(curve), figsize=(3.4 * len(curve) + 0.6, 3.6),
                                 sharey=True, squeeze=False)  # fmt: skip
        for ax, (n, r) in zip(axes[0], curve, strict=True):
            by_seed = []
            for seed, run in sorted(r["seeds"].items()):
                if seed not in lo:
                    continue
                ref = dict(lo[seed]["evals"])
                pts = [(st, v - ref[st]) for st, v in run["evals"] if st in ref and st > 0]
                by_seed.append(dict(pts))
                ax.plot(*zip(*pts, strict=True), color="C0", lw=0.7, alpha=0.6)
            steps = sorted(set.intersection(*(set(b) for b in by_seed)))
            mean = [statistics.fmean(b[st] for b in by_seed) for st in steps]
            ax.plot(steps, mean, color="C0", lw=2, label=f"mean of {len(by_seed)} seeds")
            for k in r["arm"].knots(d.steps):
                ax.axvline(k, color="C3", ls=":", lw=0.8)
            ax.axhline(0, color="k", lw=0.8)
            ax.set_title(f"{n}: {len(r['arm'].knots(d.steps)) + 1} × {r['arm'].link_steps}")
            ax.set_xlabel("step after the warm start")
            ax.legend(fontsize=7, loc="upper left")
        axes[0][0].set_ylabel(f"held-out loss − LoRA r{d.rank}'s (< 0: ahead)")
        fig.suptitle("thin: each seed; knots dotted", fontsize=9)
        fig.tight_layout()
        paths.append(img / f"{prefix}_link_length.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    # 5. what a chain buys against what rank buys: loss − LoRA r's against the total rank
    lora_refs = sorted(
        (r["arm"].rank, n)
        for n, r in a["arms"].items()
        if not r["arm"].link_steps and r["arm"].kind == "lora" and r.get("paired")
    )
    if lora_refs and lo and curve:
        fig, ax = plt.subplots(figsize=(7.5, 4.4))
        xs, ys = [d.rank], [0.0]
        for rank, n in lora_refs:
            p = a["arms"][n]["paired"]
            xs.append(rank)
            ys.append(p["mean"])
            ax.plot([rank] * len(p["diffs"]), p["diffs"], ".", color="C7", ms=5)
        ax.plot(xs, ys, "o--", color="C7", lw=1.2, label="one LoRA of that rank (mean)")
        chains = [r for _, r in curve if r.get("paired")]  # 2+ seeds (diagnostics: seed 0)
        for i, r in enumerate(sorted(chains, key=lambda r: -r["arm"].link_steps)):
            arm, p = r["arm"], r["paired"]
            x = arm.total_rank(d.steps)
            label = f"{arm.name}: {len(arm.knots(d.steps)) + 1} rank-{d.rank} links"
            (dot,) = ax.plot([x], [p["mean"]], "s", color=f"C{i}", ms=7, label=label)
            ax.plot([x] * len(p["diffs"]), p["diffs"], ".", color=dot.get_color(), ms=4)
        full = a["arms"].get(pt.full_arm().name, {}).get("paired")
        if full:
            ax.axhline(full["mean"], color="k", ls=":", lw=1, label="full rank (mean)")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({*xs, *(r["arm"].total_rank(d.steps) for r in chains)}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("total rank of the update (a chain: links × rank)")
        ax.set_ylabel(f"held-out loss − LoRA r{d.rank}'s (same seed)")
        ax.set_title("squares: chains; circles: one LoRA; dots: seeds")
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 0.08))
        fig.tight_layout()
        paths.append(img / f"{prefix}_rank.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    for p in paths:
        print(f"wrote {p}")
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", type=Path, default=pt.DEFAULT_OUT, help="the results folder")
    p.add_argument("--plots", action="store_true", help="write the PNG figures")
    p.add_argument("--img", type=Path, default=None, help="where the figures go (--out)")
    args = p.parse_args(argv)
    a = analyse(args.out)
    text = markdown(a)
    print(text)
    (args.out / "report.md").write_text(text)
    if args.plots:
        plots(a, args.img or args.out)


if __name__ == "__main__":
    main()
