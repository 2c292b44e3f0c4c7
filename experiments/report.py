"""Print the Markdown tables of ``docs/results.md`` from the experiments' ``results.json`` files.

Every number in the document comes from here, so the tables can be regenerated after a rerun.

Run:
    python experiments/report.py            # all experiments found under experiments/results
    python experiments/report.py --quick    # same (the tables are cheap); kept for uniformity
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _chains import parse_specs
from _runs import REPO_ROOT, mean_std

sys.path.insert(0, str(REPO_ROOT / "examples"))

from chainopt_examples.tasks import load_task


def _pm(cell: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    return f"{cell['mean'] * scale:.{digits}f} ± {cell['std'] * scale:.{digits}f}"


def mechanism_table(d: dict[str, Any]) -> str:
    """Final relative error and effective rank per method."""
    lines = [
        "| method | links × rank | best lr | ‖ΔW−ΔW*‖/‖ΔW*‖ | eff. rank of ΔW | "
        "best possible at that rank |",
        "|---|---|---|---|---|---|",
    ]
    specs = {s.name: s for s in parse_specs(d["setup"]["methods"])}
    for name, row in d["summary"].items():
        spec = specs.get(name)
        shape = (
            "full" if spec is None else " + ".join(str(spec.rank_of(i)) for i in range(spec.links))
        )
        mean = row["rel_error"]["mean"]
        err = _pm(row["rel_error"], 1, 3) if mean <= 1.0 else f"diverged (mean {mean:.1e})"
        best = row.get("best_possible_at_max_rank")
        best_s = "–" if best is None else f"{best:.3f}"
        lines.append(
            f"| {name} | {shape} | {row['best_lr']:g} | {err} | "
            f"{_pm(row['effective_rank'], 1, 1)} | {best_s} |"
        )
    return "\n".join(lines)


def smollm2_tables(d: dict[str, Any]) -> str:
    """Accuracy per task and method, and the cost/rank table."""
    summary = d["summary"]
    methods = d["setup"]["methods"]
    head = "| task | zero-shot | " + " | ".join(methods) + " |"
    lines = [head, "|---" * (len(methods) + 2) + "|"]
    for task, rows in summary.items():
        cells = [_pm(rows[m]["accuracy"], 100) if m in rows else "–" for m in methods]
        lines.append(f"| {task} | {rows['zero_shot'] * 100:.1f} | " + " | ".join(cells) + " |")
    # average over tasks of the per-task means
    avg = []
    for m in methods:
        vals = [rows[m]["accuracy"]["mean"] for rows in summary.values() if m in rows]
        avg.append(f"{100 * sum(vals) / len(vals):.1f}" if vals else "–")
    zs = [rows["zero_shot"] for rows in summary.values()]
    lines.append(f"| mean | {100 * sum(zs) / len(zs):.1f} | " + " | ".join(avg) + " |")
    lines.append("")
    lines.append(
        "| task | method | final train loss | eff. rank of ΔW (mean over modules) | "
        "train GFLOPs | adapter share | seconds/run |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for task, rows in summary.items():
        for m in methods:
            if m not in rows:
                continue
            r = rows[m]
            share = r["adapter_flops"]["mean"] / r["train_flops"]["mean"]
            lines.append(
                f"| {task} | {m} | {_pm(r['final_train_loss'], 1, 3)} | "
                f"{_pm(r['effective_rank_mean'], 1, 1)} | {r['train_flops']['mean'] / 1e9:.0f} | "
                f"{100 * share:.2f}% | {r['train_seconds']['mean']:.0f} |"
            )
    return "\n".join(lines)


def per_seed(d: dict[str, Any]) -> str:
    """Accuracy of every run, to show the spread behind mean ± std."""
    methods = d["setup"]["methods"]
    lines = ["| task | seed | " + " | ".join(methods) + " |", "|---" * (len(methods) + 2) + "|"]
    keys = dict.fromkeys((r["task"], r["seed"]) for r in d["runs"])
    for task, seed in keys:
        acc = {
            r["method"]: r["accuracy"] for r in d["runs"] if (r["task"], r["seed"]) == (task, seed)
        }
        cells = [f"{100 * acc[m]:.1f}" if m in acc else "–" for m in methods]
        lines.append(f"| {task} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge_smollm2(paths: list[Path]) -> dict[str, Any]:
    """Merge the ``results.json`` of several ``smollm2_tasks.py`` runs (one per task)."""
    merged: dict[str, Any] = {"summary": {}, "runs": [], "configs": {}, "setup": None}
    for path in paths:
        d = json.loads(path.read_text())
        merged["setup"] = merged["setup"] or d["setup"]
        for task, rows in d["summary"].items():
            merged["summary"][task] = rows
        merged["runs"].extend(d["runs"])
        for task, info in d["setup"]["tasks"].items():
            a = d["meta"]["args"]
            merged["configs"][task] = {
                **info,
                "adapted": d["setup"]["adapted_layers"],
                "lr": a["lr"],
                "epochs": a["epochs"],
                "batch": a["batch_size"],
                "steps": next(r["total_steps"] for r in d["runs"] if r["task"] == task),
                "complete": d.get("complete", True),
                "command": d["meta"]["command"],
                "date": d["meta"]["date_utc"],
                "wall": d["meta"]["wall_seconds"],
                "majority": majority_accuracy(task, a),
            }
    methods: list[str] = []
    for r in merged["runs"]:
        if r["method"] not in methods:
            methods.append(r["method"])
    merged["setup"] = {**merged["setup"], "methods": methods}
    return merged


def majority_accuracy(task: str, a: dict[str, Any]) -> float:
    """Test accuracy of always answering the most frequent test label (same split as the run)."""
    ds = load_task(task, n_train=a["n_train"], n_test=a["n_test"], seed=a["data_seed"])
    labels = list(ds["test"]["label"])
    return max(labels.count(k) for k in set(labels)) / len(labels)


def config_table(merged: dict[str, Any]) -> str:
    """What was subsampled per task."""
    lines = [
        "| task | train / test examples | train label counts | prompt tokens (mean, cap) | "
        "adapted layers | lr | steps (5 epochs) | test majority class | complete |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, c in merged["configs"].items():
        lines.append(
            f"| {task} | {c['n_train']} / {c['n_test']} | {c['train_label_counts']} | "
            f"{c['mean_prompt_tokens']:.0f}, {c['max_prompt_tokens']} | {c['adapted']} | "
            f"{c['lr']:g} | {c['steps']} | {100 * c['majority']:.1f}% | {c['complete']} |"
        )
    return "\n".join(lines)


def paired_table(merged: dict[str, Any], base: str = "lora") -> str:
    """Accuracy difference to LoRA with the same seed (same data order and first link)."""
    methods = [m for m in merged["setup"]["methods"] if m != base]
    lines = [
        "| task | " + " | ".join(f"{m} − {base}" for m in methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]
    for task in merged["summary"]:
        cells = []
        for m in methods:
            diffs = []
            for r in merged["runs"]:
                if r["task"] == task and r["method"] == m:
                    b = [
                        x
                        for x in merged["runs"]
                        if x["task"] == task and x["method"] == base and x["seed"] == r["seed"]
                    ]
                    if b:
                        diffs.append(100 * (r["accuracy"] - b[0]["accuracy"]))
            mean, std = mean_std(diffs)
            wins = sum(d > 0 for d in diffs)
            cells.append(
                f"{mean:+.1f} ± {std:.1f} ({wins}/{len(diffs)} seeds better)" if diffs else "–"
            )
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rank_bound_section(results: Path, plots: bool) -> None:
    """Experiment 4 (``rank_bound.py``): its tables, from whatever runs finished."""
    import rank_bound_report

    for name in ("rank_bound",):
        out = results / name
        analysis = rank_bound_report.analyse(out) if out.is_dir() else None
        if analysis is None:
            continue
        print(f"\n## {name}\n")
        print(rank_bound_report.markdown(analysis))
        if plots:
            for path in rank_bound_report.plots(analysis):
                print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "experiments" / "results")
    parser.add_argument("--quick", action="store_true", help="no-op; tables are cheap")
    parser.add_argument("--plots", action="store_true", help="also draw the merged SmolLM2 plot")
    args = parser.parse_args()
    for name in ("mechanism", "mechanism_prune_fixed"):  # the rerun after the prune fix
        path = args.results / name / "results.json"
        if path.is_file():
            d = json.loads(path.read_text())
            print(f"## {name}  ({d['meta']['date_utc']}, {d['meta']['wall_seconds']} s)")
            print(f"`{d['meta']['command']}`\n")
            print(mechanism_table(d))
            print()
    paths = sorted(args.results.glob("smollm2_*/results.json"))
    if paths:
        merged = merge_smollm2(paths)
        print("## smollm2\n")
        for task, c in merged["configs"].items():
            print(f"- {task}: `{c['command']}` ({c['date']}, {c['wall']} s)")
        print()
        print(config_table(merged))
        print()
        print(smollm2_tables(merged))
        print()
        print(paired_table(merged))
        print()
        print(per_seed(merged))
        extras = [
            *args.results.glob("lr*_*/results.json"),
            *args.results.glob("longer_*/results.json"),
        ]
        for extra in sorted(extras):
            other = merge_smollm2([extra])
            print(f"\n### {extra.parent.name}\n")
            for task, c in other["configs"].items():
                print(f"- {task}: `{c['command']}` ({c['date']}, {c['wall']} s)")
            print()
            print(smollm2_tables(other))
            print()
            print(paired_table(other))
        if args.plots:
            from _plots import bar_by_task

            bar_by_task(
                merged["summary"],
                merged["setup"]["methods"],
                "accuracy",
                args.results / "smollm2_accuracy.png",
                ylabel="test accuracy (mean ± std over seeds)",
                baseline_key="zero_shot",
            )

    rank_bound_section(args.results, args.plots)


if __name__ == "__main__":
    main()
