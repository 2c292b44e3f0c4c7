"""How step time, peak tensor memory and knot cost grow with hidden size and sequence length.

Two sweeps over a Llama built from config (eager, all linear projections adapted by default):
hidden size at a fixed sequence length, then sequence length at a fixed hidden size. At each
point the variants (full fine-tuning, PEFT LoRA, chainopt, chainopt with a knot every K steps)
are built from one base model and stepped in rotation, as in ``compare.py``. Prints one table
per sweep and draws ``scaling.png`` (step time, peak memory and knot cost against size).

    python bench/scaling.py               # full sweep (see docs/benchmarks.md)
    python bench/scaling.py --quick       # two tiny points per sweep: a smoke test
    python bench/scaling.py --hiddens 256 512 1024 --seqs 128 512 --targets qv
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chainopt_bench.environment import add_common_args, configure, machine_info
from chainopt_bench.models import TARGET_LABEL, ModelSpec, build_model, make_batches
from chainopt_bench.output import markdown_table, mib, save_json
from chainopt_bench.rotation import run_alternating
from chainopt_bench.timing import median_ms
from chainopt_bench.variants import LoraSpec, make_variants

KIND_LABEL = {
    "full": "full FT",
    "peft": "PEFT LoRA",
    "chain": "chainopt",
    "chain_knot": "chainopt + knots",
}
KIND_STYLE = {
    "full": ("tab:gray", "s", "-"),
    "peft": ("tab:blue", "o", "-"),
    "chain": ("tab:red", "^", "--"),
    "chain_knot": ("tab:orange", "v", ":"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--arch", default="llama", choices=["llama", "opt"])
    p.add_argument("--targets", default="all", choices=["qv", "all"])
    p.add_argument(
        "--kinds",
        nargs="+",
        default=["full", "peft", "chain", "chain_knot"],
        choices=["full", "peft", "chain", "chain_knot"],
    )
    p.add_argument(
        "--hiddens",
        nargs="+",
        type=int,
        default=[256, 512, 768],
        help="hidden sizes of the first sweep (at --seq)",
    )
    p.add_argument(
        "--seqs",
        nargs="+",
        type=int,
        default=[64, 128, 256, 512],
        help="sequence lengths of the second sweep (at --hidden)",
    )
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=12, help="timed rotations per point")
    p.add_argument(
        "--extra-knots",
        type=int,
        default=4,
        help="knots timed after the rotations (each after an untimed step), on top of those "
        "the schedule ties inside them",
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="redraw the PNG from a scaling JSON written before, run nothing",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.hiddens, args.seqs, args.hidden, args.seq = [32, 64], [16, 32], 64, 32
        args.layers, args.batch, args.vocab, args.steps, args.warmup = 1, 2, 256, 4, 1
        args.extra_knots = 1
        args.knot_every = min(args.knot_every, 3)
    return args


def run_point(args: argparse.Namespace, hidden: int, seq: int) -> list[dict[str, Any]]:
    spec = ModelSpec(
        args.arch, hidden=hidden, layers=args.layers, seq=seq, batch=args.batch, vocab=args.vocab
    )
    lora = LoraSpec(rank=args.rank, alpha=args.alpha, knot_every=args.knot_every)
    base = build_model(spec, seed=args.seed)
    batches = make_batches(spec, seed=args.seed + 1)
    variants = make_variants(base, args.arch, [args.targets], lora, args.kinds)
    del base
    run_alternating(variants, batches, args.warmup, args.steps, spec.label())
    for v in variants:  # a few more knots, each after an untimed step, for a steadier median
        if v.chain is not None and v.kind == "chain_knot":
            for i in range(args.extra_knots):
                v.step(batches[i % len(batches)])
                v.tie_knot()
    rows = []
    for v in variants:
        mem = v.measure_memory(batches[0])
        rows.append(
            {
                "hidden": hidden,
                "seq": seq,
                "kind": v.kind,
                "variant": v.name,
                "wall_ms": median_ms(v.step_times),
                "cpu_ms": median_ms(v.cpu_times),
                "peak_bytes": mem["peak"],
                "knot_ms": median_ms(v.knot_times),
                "n_knots": len(v.knot_times),
                "trainable": v.trainable_params(),
            }
        )
        del v
    peft = next((r for r in rows if r["kind"] == "peft"), None)
    chain = next((r for r in rows if r["kind"] == "chain"), None)
    for r in rows:
        r["wall_x"] = r["wall_ms"] / peft["wall_ms"] if peft and r["kind"] != "full" else None
        r["cpu_x"] = r["cpu_ms"] / peft["cpu_ms"] if peft and r["kind"] != "full" else None
        r["mem_x"] = r["peak_bytes"] / peft["peak_bytes"] if peft and r["kind"] != "full" else None
        if r["kind"] == "chain_knot" and chain is not None:
            r["knot_frac"] = r["knot_ms"] / chain["wall_ms"]
    return rows


def format_sweep(rows: list[dict[str, Any]], axis: str) -> str:
    headers = [
        axis,
        "variant",
        "step ms (median)",
        "CPU ms",
        "×PEFT wall",
        "×PEFT CPU",
        "peak MiB",
        "×PEFT mem",
        "knot ms (median, n)",
        "knot / step",
    ]
    table = []
    for r in rows:
        table.append(
            [
                r[axis],
                r["variant"],
                f"{r['wall_ms']:.0f}",
                f"{r['cpu_ms']:.0f}",
                "–" if r["wall_x"] is None else f"{r['wall_x']:.3f}×",
                "–" if r["cpu_x"] is None else f"{r['cpu_x']:.3f}×",
                f"{mib(r['peak_bytes']):.1f}",
                "–" if r["mem_x"] is None else f"{r['mem_x']:.3f}×",
                f"{r['knot_ms']:.1f} ({r['n_knots']})" if r["n_knots"] else "–",
                f"{100 * r['knot_frac']:.2f}%" if "knot_frac" in r else "–",
            ]
        )
    return markdown_table(headers, table)


def plot(
    sweeps: dict[str, list[dict[str, Any]]],
    args: argparse.Namespace,
    path: Path,
    threads: int | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(11, 11), constrained_layout=True)
    fixed = {"hidden": f"seq {args.seq}", "seq": f"hidden {args.hidden}"}
    for col, axis in enumerate(("hidden", "seq")):
        rows = sweeps[axis]
        xs = sorted({r[axis] for r in rows})
        for kind in args.kinds:
            pts = sorted((r[axis], r) for r in rows if r["kind"] == kind)
            if not pts:
                continue
            color, marker, ls = KIND_STYLE[kind]
            style = {"color": color, "marker": marker, "linestyle": ls, "label": KIND_LABEL[kind]}
            axes[0, col].plot([x for x, _ in pts], [r["wall_ms"] for _, r in pts], **style)
            axes[1, col].plot([x for x, _ in pts], [mib(r["peak_bytes"]) for _, r in pts], **style)
            if kind == "chain_knot":
                axes[2, col].plot(
                    [x for x, _ in pts], [100 * r["knot_frac"] for _, r in pts], **style
                )
        axes[0, col].set_ylabel("median step time (ms)")
        axes[1, col].set_ylabel("peak tensor memory (MiB)")
        axes[2, col].set_ylabel("one knot / one step (%)")
        axes[2, col].axhline(2.0, color="k", lw=0.8, ls="--", label="2% target")
        axes[2, col].set_ylim(bottom=0)
        for row in range(3):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.grid(True, alpha=0.3)
            ax.set_xlabel(f"{axis} ({fixed[axis]})")
            if row < 2:
                ax.set_yscale("log")
        axes[0, col].legend()
        axes[2, col].legend()
    title = (
        f"{args.arch}, {args.layers} layers, batch {args.batch}, targets "
        f"{TARGET_LABEL[args.targets]}, rank {args.rank}, eager CPU "
        f"({threads or machine_info()['torch_threads']} thread(s))"
    )
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        saved = json.loads(args.replot.read_text())
        kept = argparse.Namespace(**{**saved["args"], "out": args.out})
        png = args.out / args.replot.with_suffix(".png").name
        plot(saved["sweeps"], kept, png, saved["info"]["torch_threads"])
        print(f"wrote {png}")
        return 0
    configure(args.threads)
    info = machine_info()
    print(
        f"chainopt bench/scaling.py · {info['date']} · torch {info['torch']} · "
        f"peft {info['peft']} · {info['torch_threads']} torch thread(s)"
        f"{' · --quick' if args.quick else ''}"
    )
    print(
        f"{args.arch}, {args.layers} layers, batch {args.batch}, targets "
        f"{TARGET_LABEL[args.targets]}, rank {args.rank}, knot every {args.knot_every}, "
        f"{args.warmup} warm-up + {args.steps} timed steps per variant and point, knot cost "
        f"over the knots tied in them + {args.extra_knots} more"
    )
    t0 = time.perf_counter()
    sweeps: dict[str, list[dict[str, Any]]] = {"hidden": [], "seq": []}
    done: dict[tuple[int, int], list[dict[str, Any]]] = {}

    def point(hidden: int, seq: int) -> list[dict[str, Any]]:
        if (hidden, seq) not in done:  # the two sweeps cross at (--hidden, --seq): run it once
            done[hidden, seq] = run_point(args, hidden, seq)
        return done[hidden, seq]

    for h in args.hiddens:
        sweeps["hidden"] += point(h, args.seq)
    print(f"\n== hidden size sweep (seq {args.seq}) ==")
    print(format_sweep(sweeps["hidden"], "hidden"), flush=True)
    for s in args.seqs:
        sweeps["seq"] += point(args.hidden, s)
    print(f"\n== sequence length sweep (hidden {args.hidden}) ==")
    print(format_sweep(sweeps["seq"], "seq"), flush=True)
    name = "scaling_quick" if args.quick else "scaling"
    png = args.out / f"{name}.png"
    plot(sweeps, args, png)
    elapsed = time.perf_counter() - t0
    save_json(
        args.out / f"{name}.json",
        {"info": info, "args": vars(args), "sweeps": sweeps, "elapsed_s": elapsed},
    )
    print(
        f"\ntotal wall time {elapsed / 60:.1f} min\nwrote {png} and {args.out / (name + '.json')}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
