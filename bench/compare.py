"""chainopt vs PEFT LoRA vs full fine-tuning vs the floor, side by side in one process.

For each mode (eager, ``torch.compile``) and each model (a Llama and an OPT built from config),
one base model is copied into every variant: full fine-tuning (AdamW on everything), the floor
(no adapter, every weight frozen, gradients to the inputs of every layer: the least any adapter
method can cost), PEFT LoRA and chainopt (no knot in the timed window, and a knot every K steps),
each on q,v and on all linear projections. The variants are stepped in rotation and the script
prints, per variant, median step time (wall and process CPU time), peak tensor memory of a
steady step, trainable parameters and optimizer-state bytes, with ratios against PEFT LoRA on
the same targets and against the floor; then the cost of a knot and the compile counters; then
a PASS/FAIL line for each target of issue #3.

``--quant 4bit`` runs the same comparison on a QLoRA base: every linear layer but ``lm_head``
a bitsandbytes ``Linear4bit`` (NF4, double quantization, compute dtype ``--dtype``); full
fine-tuning is left out (4-bit weights take no gradient), PEFT's LoRA wraps the same 4-bit
layers, and chainopt's float32 host masters are reported apart from the model's bytes.

    python bench/compare.py                 # full run (see docs/benchmarks.md for its output)
    python bench/compare.py --quant 4bit    # the same on an NF4 base (QLoRA)
    python bench/compare.py --quick         # tiny config, a few steps: a smoke test
    python bench/compare.py --peft-chain    # also a chained PeftModel against the same unchained
    python bench/compare.py --modes eager --models llama --targets all --steps 30
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chainopt_bench.dynamo import configure_dynamo, count_diff, dynamo_counts
from chainopt_bench.environment import add_common_args, configure, load_average, machine_info
from chainopt_bench.memory import transient_peak_bytes
from chainopt_bench.models import (
    QUANT,
    TARGET_LABEL,
    ModelSpec,
    adapted_weight_elements,
    build_model,
    make_batches,
)
from chainopt_bench.output import markdown_table, mib, save_json
from chainopt_bench.rotation import run_alternating
from chainopt_bench.timing import iqr_ms, mean_ms, median_ms, paired_ratio
from chainopt_bench.variants import LoraSpec, Variant, make_variants

KNOT_KINDS = ("chain_knot", "peft_chain_knot")  # variants that tie knots (timed one by one)


def build_parser(doc: str | None = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p)
    p.add_argument("--models", nargs="+", default=["llama", "opt"], choices=["llama", "opt"])
    p.add_argument(
        "--compile-models",
        nargs="+",
        default=None,
        choices=["llama", "opt"],
        help="models of the compiled mode (default: --models; --quick: llama)",
    )
    p.add_argument("--targets", nargs="+", default=["qv", "all"], choices=["qv", "all"])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=["eager", "compile"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=20, help="timed rotations (>= 20 for the targets)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--no-full", action="store_true", help="leave full fine-tuning out")
    p.add_argument(
        "--no-floor",
        action="store_true",
        help="leave the floor out (no adapter, frozen weights, input gradients only)",
    )
    p.add_argument(
        "--quant",
        default="none",
        choices=list(QUANT),
        help="base weights: none (dense, --dtype) or 4bit (bitsandbytes NF4, double quant, "
        "compute dtype --dtype, on every linear layer but lm_head; no full fine-tuning)",
    )
    p.add_argument(
        "--quantized-master",
        default="host",
        choices=["host", "none"],
        help="chainopt's quantized_master with --quant 4bit (host: exact knots from a float32 "
        "master in host memory; none: dequantize-add-requantize in place)",
    )
    p.add_argument(
        "--backend",
        default="inductor",
        help="torch.compile backend (--quick: eager, i.e. dynamo without codegen)",
    )
    p.add_argument(
        "--keep-history",
        default="default",
        choices=["default", "on", "off"],
        help="chainopt's keep_history (default: the library's default, off)",
    )
    p.add_argument(
        "--peft-chain",
        action="store_true",
        help="also time the PEFT LoRA model chained (chainopt over PEFT's own layers)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of the model weights",
    )
    p.add_argument(
        "--exact-merge",
        default="auto",
        choices=["auto", "on", "off"],
        help="chainopt's exact_merge (auto: a merge residual for half weights)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    return quick_config(args)


def quick_config(args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.hidden, args.layers, args.seq, args.batch, args.vocab = 64, 2, 32, 2, 256
        args.steps, args.warmup = 5, 2
        args.compile_models = args.compile_models or ["llama"]
        args.knot_every = min(args.knot_every, 3)
        if args.backend == "inductor":
            args.backend = "eager"  # dynamo only: counts graphs, breaks and recompiles, fast
    return args


def run_group(args: argparse.Namespace, arch: str, mode: str) -> dict[str, Any]:
    """One model in one mode: build, warm up, time in rotation, measure memory."""
    start = time.perf_counter()
    spec = ModelSpec(
        arch,
        hidden=args.hidden,
        layers=args.layers,
        seq=args.seq,
        batch=args.batch,
        vocab=args.vocab,
    )
    exact = {"auto": None, "on": True, "off": False}[args.exact_merge]
    lora = LoraSpec(
        rank=args.rank,
        alpha=args.alpha,
        knot_every=args.knot_every,
        exact_merge=exact,
        keep_history={"default": None, "on": True, "off": False}[args.keep_history],
        quantized_master=args.quantized_master,
    )
    base = build_model(
        spec,
        seed=args.seed,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        quant=args.quant,
    )
    batches = make_batches(spec, seed=args.seed + 1, device=args.device)
    kinds = ["peft", "chain", "chain_knot"]
    kinds += ["peft_chain", "peft_chain_knot"] if args.peft_chain else []
    if not args.no_floor:
        kinds.insert(0, "floor")
    if not (args.no_full or args.quant != "none"):  # 4-bit weights take no gradient
        kinds.insert(0, "full")
    adapted = {t: adapted_weight_elements(base, arch, t) for t in args.targets}
    linears4 = sum(type(m).__name__ == "Linear4bit" for m in base.modules())
    variants = make_variants(base, arch, args.targets, lora, kinds)
    del base

    compile_info: dict[str, dict[str, Any]] = {}
    if mode == "compile":
        for v in variants:
            v.compile(backend=args.backend)
    last = {"counts": dynamo_counts(), "t": time.perf_counter()}

    def on_warm(v: Variant) -> None:
        now = dynamo_counts()
        d = count_diff(now, last["counts"])
        compile_info[v.name] = {
            "warmup_s": time.perf_counter() - last["t"],
            "frames": d["frames"],
            "graphs": d["graphs"],
            "graph_breaks": d["graph_breaks"],
        }
        last["counts"], last["t"] = now, time.perf_counter()

    how = f"compile ({args.backend})" if mode == "compile" else mode
    print(
        f"\n== {spec.label()} · {how} · {len(variants)} variants · "
        f"{args.warmup} warm-up + {args.steps} timed steps each ==",
        flush=True,
    )
    run_alternating(variants, batches, args.warmup, args.steps, f"{arch} {mode}", on_warm)

    rows = []
    for v in variants:  # the timed window's figures first: measuring memory steps on
        rows.append(
            {
                "variant": v.name,
                "kind": v.kind,
                "targets": v.targets,
                "step_times": list(v.step_times),
                "cpu_times": list(v.cpu_times),
                "wall_ms": median_ms(v.step_times),
                "wall_iqr_ms": iqr_ms(v.step_times),
                "wall_mean_ms": mean_ms(v.step_times),
                "cpu_ms": median_ms(v.cpu_times),
                "n_steps": len(v.step_times),
                "knot_ms": median_ms(v.knot_times),
                "knot_cpu_ms": median_ms(v.knot_cpu_times),
                "n_knots": len(v.knot_times),
                "knot_step_ms": median_ms(v.knot_step_times),
                "trainable": v.trainable_params(),
                "opt_state_bytes": v.opt_state_bytes,
                "compile": compile_info.get(v.name),
                "compiles_after_warmup": v.compiles_after_warmup if v.compiled else None,
                "compiles_after_knot": v.compiles_after_knot if v.compiled else None,
            }
        )
    for v, row in zip(variants, rows, strict=True):
        mem = v.measure_memory(batches[0])
        held = v.held_bytes()
        row["held_other_bytes"] = held["other"]
        row["merge_residual_bytes"] = held["merge_residual"]
        row["model_bytes"] = held["model"]
        row["host_master_bytes"] = held["host_master"]
        row["adapted_weight_elements"] = adapted.get(v.targets) if v.targets else None
        row["knots_at_memory"] = v.chain.knots_tied if v.chain is not None else None
        row.update(
            peak_bytes=mem["peak"],
            resident_bytes=mem["resident"],
            transient_bytes=mem["transient"],
            knot_transient_bytes=None,
        )
        if v.kind in KNOT_KINDS and mode == "eager" and v.device.type == "cpu":
            assert v.chain is not None
            row["knot_transient_bytes"] = transient_peak_bytes(v.chain.tie_knot, "cpu")
    _add_ratios(rows)
    quant = args.quant
    print(format_group(rows, mode, quant))
    print(f"({spec.arch} {mode}: {time.perf_counter() - start:.0f} s)", flush=True)
    return {
        "arch": arch,
        "mode": mode,
        "quant": quant,
        "quantized_master": args.quantized_master if quant != "none" else None,
        "spec": spec,
        "rows": rows,
        "knot_every": args.knot_every,
        "linear4bit_layers": linears4,
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    peft = {r["targets"]: r for r in rows if r["kind"] == "peft"}
    chain = {r["targets"]: r for r in rows if r["kind"] == "chain"}
    peft_chain = {r["targets"]: r for r in rows if r["kind"] == "peft_chain"}
    floor = next((r for r in rows if r["kind"] == "floor"), None)
    for r in rows:
        ref = peft.get(r["targets"]) if r["targets"] else None
        for key in ("wall_ms", "cpu_ms", "peak_bytes"):
            r[f"{key}_x"] = r[key] / ref[key] if ref else None
        if ref is not None and r is not ref:
            r["paired_wall"] = paired_ratio(r["step_times"], ref["step_times"])
        else:
            r["paired_wall"] = None
        for key in ("wall_ms", "cpu_ms"):  # against the floor: what an adapter adds to it
            r[f"{key}_floor_x"] = r[key] / floor[key] if floor and r is not floor else None
        if floor is not None and r is not floor:
            r["paired_wall_floor"] = paired_ratio(r["step_times"], floor["step_times"])
        else:
            r["paired_wall_floor"] = None
        own = (peft_chain if r["kind"] == "peft_chain_knot" else chain).get(r["targets"])
        if r["kind"] in KNOT_KINDS and own is not None:
            r["knot_frac_wall"] = r["knot_ms"] / own["wall_ms"]
            r["knot_frac_cpu"] = r["knot_cpu_ms"] / own["cpu_ms"]


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}×"


def _ci(v: tuple[float, float, float] | None) -> str:
    return "–" if v is None else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


def format_group(rows: list[dict[str, Any]], mode: str, quant: str = "none") -> str:
    headers = [
        "variant",
        "step ms (median)",
        "IQR ms",
        "CPU ms (median)",
        "×PEFT wall",
        "×PEFT CPU",
        "paired ×PEFT [95% CI]",
        "×floor wall",
        "×floor CPU",
        "peak MiB",
        "×PEFT mem",
        "trainable",
        "opt state MiB",
        "other held MiB",
    ]
    if quant != "none":
        headers += ["model MiB", "host master MiB"]
    if mode == "compile":
        headers.append("compiles after warm-up")
    table = []
    for r in rows:
        line = [
            r["variant"],
            f"{r['wall_ms']:.0f}",
            f"{r['wall_iqr_ms']:.0f}",
            f"{r['cpu_ms']:.0f}",
            _x(r["wall_ms_x"]),
            _x(r["cpu_ms_x"]),
            _ci(r["paired_wall"]),
            _x(r.get("wall_ms_floor_x")),
            _x(r.get("cpu_ms_floor_x")),
            f"{mib(r['peak_bytes']):.1f}",
            _x(r["peak_bytes_x"]),
            f"{r['trainable']:,}",
            f"{mib(r['opt_state_bytes']):.2f}",
            f"{mib(r['held_other_bytes']):.2f}",
        ]
        if quant != "none":
            line += [f"{mib(r['model_bytes']):.3f}", f"{mib(r['host_master_bytes']):.2f}"]
        if mode == "compile":
            line.append(str(r["compiles_after_warmup"]))
        table.append(line)
    out = [markdown_table(headers, table)]
    knots = [r for r in rows if r["kind"] in KNOT_KINDS]
    if knots:
        kh = [
            "variant",
            "knots",
            "knot ms (median)",
            "knot / step (wall)",
            "knot / step (CPU)",
            "knot-step ms (median)",
            "knot transient MiB",
            "compiles after a knot",
        ]
        kt = []
        for r in knots:
            kt.append(
                [
                    r["variant"],
                    r["n_knots"],
                    f"{r['knot_ms']:.1f}",
                    f"{100 * r.get('knot_frac_wall', float('nan')):.2f}%",
                    f"{100 * r.get('knot_frac_cpu', float('nan')):.2f}%",
                    f"{r['knot_step_ms']:.0f}",
                    "–"
                    if r["knot_transient_bytes"] is None
                    else f"{mib(r['knot_transient_bytes']):.2f}",
                    "–" if r["compiles_after_knot"] is None else str(r["compiles_after_knot"]),
                ]
            )
        out += ["", markdown_table(kh, kt)]
    if mode == "compile":
        ch = ["variant", "warm-up s (incl. compile)", "frames compiled", "graphs", "graph breaks"]
        ct = [
            [
                r["variant"],
                f"{r['compile']['warmup_s']:.1f}",
                r["compile"]["frames"],
                r["compile"]["graphs"],
                r["compile"]["graph_breaks"],
            ]
            for r in rows
        ]
        out += ["", markdown_table(ch, ct)]
    return "\n".join(out)


def headline_table(groups: list[dict[str, Any]]) -> str:
    """One line per model · mode · targets: chainopt against PEFT and against the floor (the
    table docs/ quotes); with 4-bit bases, the model bytes against PEFT's and the host master."""
    quant = any(g.get("quant", "none") != "none" for g in groups)
    headers = [
        "model · mode",
        "targets",
        "step time ×PEFT, wall / CPU",
        "per-round ratio [95% CI]",
        "step time ×floor, wall / CPU (PEFT's)",
        "peak memory ×PEFT (no knot / after knots)",
        *(["model MiB (= PEFT's?) · host master MiB"] if quant else []),
        "trainable (= PEFT's?)",
        "one knot, ms (% of a step)",
        "compiles after a knot",
    ]
    table = []
    for g in groups:
        rows = g["rows"]
        for targets in dict.fromkeys(r["targets"] for r in rows if r["targets"]):
            by_kind = {r["kind"]: r for r in rows if r["targets"] == targets}
            chain, knot, peft = by_kind.get("chain"), by_kind.get("chain_knot"), by_kind["peft"]
            if chain is None or knot is None:
                continue
            same = "yes" if chain["trainable"] == peft["trainable"] else "NO"
            after = knot["compiles_after_knot"]
            share = 100 * knot.get("knot_frac_wall", float("nan"))
            floor = (
                "–"
                if chain.get("wall_ms_floor_x") is None
                else f"**{chain['wall_ms_floor_x']:.3f}** / {chain['cpu_ms_floor_x']:.3f} "
                f"({peft['wall_ms_floor_x']:.3f})"
            )
            memory = []
            if quant:
                eq = "yes" if chain["model_bytes"] == peft["model_bytes"] else "NO"
                memory = [
                    f"{mib(chain['model_bytes']):.2f} ({eq}) · "
                    f"{mib(chain['host_master_bytes']):.2f}"
                ]
            table.append(
                [
                    f"{g['arch']} · {g['mode']}",
                    TARGET_LABEL[targets],
                    f"**{chain['wall_ms_x']:.3f}** / {chain['cpu_ms_x']:.3f}",
                    _ci(chain["paired_wall"]),
                    floor,
                    f"{chain['peak_bytes_x']:.3f} / {knot['peak_bytes_x']:.3f}",
                    *memory,
                    f"{chain['trainable']:,} ({same})",
                    f"{knot['knot_ms']:.1f} ({share:.2f}%)",
                    "–" if after is None else f"{after} (of {knot['n_knots']} knots)",
                ]
            )
    return markdown_table(headers, table)


def check_targets(groups: list[dict[str, Any]]) -> list[tuple[bool | None, str]]:
    """The targets of issue #3, one line each; with 4-bit bases, issue #13's memory lines.

    ``None`` marks a line that is a measurement, not a target (a 4-bit knot's share of a step:
    issue #3's 2% is for dense weights, and bitsandbytes quantizes on the CPU in Python).
    """
    res: list[tuple[bool | None, str]] = []
    for g in groups:
        quant = g.get("quant", "none") != "none"
        tag = f"{g['arch']} {g['mode']}" + (" 4-bit" if quant else "")
        rows = g["rows"]
        peft = {r["targets"]: r for r in rows if r["kind"] == "peft"}
        for r in rows:
            if r["kind"] not in ("chain", "chain_knot"):
                continue
            p = peft[r["targets"]]
            t = TARGET_LABEL[r["targets"]]
            if r["kind"] == "chain":
                res.append(
                    (
                        r["wall_ms_x"] <= 1.0,
                        f"{tag} {t}: step time {r['wall_ms_x']:.3f}× PEFT wall "
                        f"({r['cpu_ms_x']:.3f}× CPU; per-round ratio "
                        f"{_ci(r['paired_wall'])}) ≤ 1.00×",
                    )
                )
                why = (
                    f" (merge residuals: {mib(r['merge_residual_bytes']):.2f} MiB, exact_merge)"
                    if r["merge_residual_bytes"]
                    else ""
                )
                res.append(
                    (
                        r["peak_bytes_x"] <= 1.0,
                        f"{tag} {t}: peak tensor memory {r['peak_bytes_x']:.3f}× PEFT ≤ 1.00×{why}",
                    )
                )
                res.append(
                    (
                        r["trainable"] == p["trainable"],
                        f"{tag} {t}: trainable parameters {r['trainable']:,} vs PEFT "
                        f"{p['trainable']:,} (identical)",
                    )
                )
                if quant:
                    res.append(
                        (
                            r["model_bytes"] == p["model_bytes"],
                            f"{tag} {t}: model bytes {r['model_bytes']:,} vs PEFT's QLoRA "
                            f"{p['model_bytes']:,} (equal; 4-bit weights, quantization "
                            "state, factors)",
                        )
                    )
                    host = g.get("quantized_master") == "host"
                    want = 4 * r["adapted_weight_elements"] if host else 0
                    res.append(
                        (
                            r["host_master_bytes"] == want,
                            f"{tag} {t}: host master {mib(r['host_master_bytes']):.2f} MiB "
                            + (
                                f"= 4 bytes × {r['adapted_weight_elements']:,} adapted weight "
                                "elements, in host memory, apart from the model's"
                                if host
                                else "(quantized_master='none': no master)"
                            ),
                        )
                    )
            else:
                other = mib(r["held_other_bytes"])
                res.append(
                    (
                        r["peak_bytes_x"] <= 1.0,
                        f"{tag} {t} knot/{g['knot_every']}: peak tensor memory "
                        f"{r['peak_bytes_x']:.3f}× PEFT ≤ 1.00× (holds {other:.2f} MiB besides "
                        f"model and optimizer state after {r['knots_at_memory']} knots"
                        + (": the chain history, keep_history=True" if other else "")
                        + (
                            f"; merge residuals {mib(r['merge_residual_bytes']):.2f} MiB)"
                            if r["merge_residual_bytes"]
                            else ")"
                        ),
                    )
                )
                if r["targets"] == "all":
                    res.append(
                        (
                            None if quant else r["knot_frac_wall"] <= 0.02,
                            f"{tag} {t}: one knot = {r['knot_ms']:.1f} ms = "
                            f"{100 * r['knot_frac_wall']:.2f}% of a step (CPU: "
                            f"{100 * r['knot_frac_cpu']:.2f}%)"
                            + (
                                ": master += s·B·A and requantize every adapted weight"
                                if quant
                                else " ≤ 2%"
                            ),
                        )
                    )
                if g["mode"] == "compile":
                    res.append(
                        (
                            r["compiles_after_knot"] == 0 and r["n_knots"] > 0,
                            f"{tag} {t}: {r['compiles_after_knot']} recompiles after "
                            f"{r['n_knots']} knots (0)",
                        )
                    )
    return res


def weights_label(args: argparse.Namespace) -> str:
    """``"float32 weights"``, or ``"NF4 (double quant) weights, float32 compute"``."""
    if args.quant == "4bit":
        return f"NF4 (double quant) Linear4bit weights, {args.dtype} compute and other weights"
    return f"{args.dtype} weights"


def _status(ok: bool | None) -> str:
    return "INFO" if ok is None else "PASS" if ok else "FAIL"


def _load(avg: tuple[float, float, float] | None) -> str:
    return "?" if avg is None else " / ".join(f"{x:.2f}" for x in avg) + " (1 / 5 / 15 min)"


def main(
    argv: list[str] | None = None, args: argparse.Namespace | None = None, name: str = "compare"
) -> int:
    args = args if args is not None else parse_args(argv)
    configure(args.threads)
    configure_dynamo()
    info = machine_info()
    where = (
        info["cuda"]
        if str(args.device).startswith("cuda")
        else (
            f"{info['cpu_model']}, {info['cpu_count']} CPUs, "
            f"{info['torch_threads']} torch thread(s)"
        )
    )
    print(
        f"chainopt bench/{name}.py · {info['date']} · torch {info['torch']} · "
        f"transformers {info['transformers']} · peft {info['peft']} · {where}"
        f"{' · --quick' if args.quick else ''}"
    )
    print(
        f"{weights_label(args)} on {args.device}, rank {args.rank}, alpha {args.alpha:g}, AdamW "
        f"lr 1e-4, knot every {args.knot_every} steps, chainopt exact_merge={args.exact_merge}"
        + (f", quantized_master={args.quantized_master}" if args.quant != "none" else "")
        + "; ratios are against PEFT LoRA on the same targets (×PEFT) and against the floor "
        f"(×floor); load average {_load(info['loadavg'])}"
    )
    t0 = time.perf_counter()
    plan = [
        (mode, arch)
        for mode in args.modes
        for arch in (args.compile_models or args.models if mode == "compile" else args.models)
    ]
    groups = [run_group(args, arch, mode) for mode, arch in plan]
    checks = check_targets(groups)
    print("\n== headline ==")
    print(headline_table(groups))
    print("\n== targets (issue #3" + (", #13" if args.quant != "none" else "") + ") ==")
    for ok, line in checks:
        print(f"{_status(ok)}  {line}")
    elapsed = time.perf_counter() - t0
    info["loadavg_end"] = load_average()
    print(
        f"\ntotal wall time {elapsed / 60:.1f} min; load average at the start "
        f"{_load(info['loadavg'])}, at the end {_load(info['loadavg_end'])}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    script = name
    name = f"{name}_{args.quant}" if args.quant != "none" else name
    name = f"{name}_quick" if args.quick else name
    save_json(
        args.out / f"{name}.json",
        {
            "info": info,
            "args": vars(args),
            "groups": groups,
            "checks": [{"ok": ok, "check": line} for ok, line in checks],
            "elapsed_s": elapsed,
        },
    )
    how = f" --quant {args.quant}" if args.quant != "none" else ""
    md = [f"# bench/{script}.py{how} — {info['date']} — {where}", ""]
    flags = [
        f"--{k.replace('_', '-')} {v}"
        for k, v in (("exact_merge", args.exact_merge), ("keep_history", args.keep_history))
        if v not in ("auto", "default")
    ]
    if args.quant != "none" and args.quantized_master != "host":
        flags.append(f"--quantized-master {args.quantized_master}")
    md += [
        f"{weights_label(args)} on {args.device}, torch {info['torch']}, peft {info['peft']}"
        + (f", bitsandbytes {info['bitsandbytes']}" if args.quant != "none" else "")
        + (f"; {', '.join(flags)}" if flags else "")
        + f"; load average {_load(info['loadavg'])} at the start, "
        f"{_load(info['loadavg_end'])} at the end; {elapsed / 60:.1f} min",
        "",
    ]
    for g in groups:
        md += [
            f"## {g['spec'].label()} · {g['mode']}",
            "",
            format_group(g["rows"], g["mode"], g["quant"]),
            "",
        ]
    md += ["## headline", "", headline_table(groups), ""]
    md += ["## targets", ""] + [f"- {_status(ok)} {line}" for ok, line in checks]
    (args.out / f"{name}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out / (name + '.json')} and {args.out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    raise SystemExit(main())
