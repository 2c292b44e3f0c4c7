"""How exact are half-precision knots? The merge residual against a float64 reference.

After K knots of small updates, a bf16/fp16 weight should be ``W₀ + Σ sᵢ·Bᵢ·Aᵢ`` rounded once to
its dtype. The residual that carries what rounding drops is itself rounded (bfloat16 for bfloat16
weights, float32 for float16 ones), so a few elements can end one ulp away from that. This
script counts them, for the library's defaults and, for comparison, without a residual (rounding
at every knot)::

    python experiments/merge_exactness.py            # writes experiments/results/merge_exactness/

Each row: K knots on a (64, 64) weight (4,096 elements), every update of relative size ``size``
of std(W), 5 seeds; "off" counts elements whose value differs from the reference rounded once,
"max ulps" the largest distance in units of the ulp at the element itself (large where an element
is near zero), "ulp at std(W)" the largest distance in units of the ulp at the weight's typical
magnitude.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from chainopt._attach import attach
from chainopt._layers import record_of
from chainopt.merge import merge_

RESIDUALS = {torch.bfloat16: torch.bfloat16, torch.float16: torch.float32}


def ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|a − b| in units of the ulp of ``dtype`` at ``b`` (both given as float64)."""
    return (a - b).abs() / _ulp(b.abs().clamp_min(torch.finfo(dtype).tiny), dtype)


def run(dtype: torch.dtype, knots: int, size: float, seed: int, residual: bool) -> dict[str, float]:
    torch.manual_seed(seed)
    lin = nn.Linear(64, 64, bias=False).to(dtype)
    start = lin.weight.detach().double().clone()
    link = attach(lin, rank=4, alpha=4, factor_dtype=torch.float32,
                  residual_dtype=RESIDUALS[dtype] if residual else None)  # fmt: skip
    record = record_of("lin", lin)
    gen = torch.Generator().manual_seed(seed + 1)
    total = torch.zeros_like(start)
    scale = size * start.std().item()
    for _ in range(knots):
        with torch.no_grad():
            link.lora_A.normal_(generator=gen)
            link.lora_B.normal_(generator=gen)
            link.lora_B.mul_(scale / link.delta().std().item())
        total += link.delta().double()  # what the float32 merge adds, summed exactly
        merge_(record)
    reference = (start + total).to(dtype).double()
    final = record.weight.detach().double()
    distance = ulps(final, reference, dtype)
    typical = (final - reference).abs() / _ulp(start.std(), dtype)
    return {
        "off": int((final != reference).sum()),
        "max_ulps": float(distance.max()),
        "max_typical_ulps": float(typical.max()),
    }


def _ulp(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    return 2.0 ** (torch.floor(torch.log2(value.abs())) - mantissa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--knots", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e-3, 1e-4])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "merge_exactness"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    bar = tqdm(total=len(RESIDUALS) * len(args.sizes) * 2 * args.seeds * sum(args.knots),
               unit="knot", file=sys.stderr, mininterval=5)  # fmt: skip
    for dtype in RESIDUALS:
        for size in args.sizes:
            for k in args.knots:
                for residual in (True, False):
                    runs = []
                    for s in range(args.seeds):
                        runs.append(run(dtype, k, size, s, residual))
                        bar.update(k)
                    rows.append({
                        "dtype": str(dtype).removeprefix("torch."), "size": size, "knots": k,
                        "residual": residual,
                        "off_max": max(r["off"] for r in runs),
                        "off_mean": sum(r["off"] for r in runs) / len(runs),
                        "max_ulps": max(r["max_ulps"] for r in runs),
                        "max_typical_ulps": max(r["max_typical_ulps"] for r in runs),
                    })  # fmt: skip
                    print(rows[-1], flush=True)
    bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "merge_exactness.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "| weight | update size | knots | merge | elements off (mean / max of 5, of 4096) "
        "| max ulps | max error / ulp at std(W) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        merge = "residual (default)" if r["residual"] else "rounded every knot"
        lines.append(
            f"| {r['dtype']} | {r['size']:g} | {r['knots']} | {merge} | "
            f"{r['off_mean']:.1f} / {r['off_max']} | {r['max_ulps']:.2f} | "
            f"{r['max_typical_ulps']:.3f} |"
        )
    (args.out / "merge_exactness.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    assert not math.isnan(rows[0]["max_ulps"])


if __name__ == "__main__":
    main()
