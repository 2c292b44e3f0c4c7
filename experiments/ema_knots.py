"""How wrong is ``AveragedModel`` EMA/SWA of a chain across its knots, with and without tracking?

One training run of a small MLP (every Linear chained, rank 4, a knot every ``--knot-every``
steps) feeds three averages at every step:

- ``reference``: the EMA (or SWA mean) of the *merged* weights ``W + s·B·A``, by hand, in
  float64, from ``chainopt.merged_state_dict(model)``;
- ``untracked``: ``AveragedModel(model, multi_avg_fn=...)`` as a user would write it, averaging
  ``W``, ``A`` and ``B`` separately;
- ``tracked``: the same, with ``chainopt.track_average(opt, ema)``.

For each average it reports, over the steps before the first knot (what plain LoRA's EMA has:
the product-of-averages error) and over the whole run, the largest

- weight error: ``‖merged(avg) − reference‖_F / ‖reference − W_init‖_F`` over all adapted
  weights together (relative to the averaged update), and
- output error: ``‖avg(x) − ref(x)‖ / ‖ref(x) − init(x)‖`` on a fixed batch.

Run::

    python experiments/ema_knots.py                  # EMA 0.99 and 0.999, SWA; prints a table
    python experiments/ema_knots.py --json out.json  # and writes the figures
    python experiments/ema_knots.py --dtype bfloat16 --averages ema:0.99 swa  # untracked only

It also prints how far a bfloat16 ``AveragedModel`` EMA moves at all (:func:`stall`): the reason
``track_average`` refuses half-precision weights.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

from chainopt import ChainLoRAOptimizer, merged_state_dict, track_average


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)
    )


def run(
    average: str,
    steps: int,
    knot_every: int,
    warmup: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """One run; ``average`` is ``"ema:<decay>"`` or ``"swa"``."""
    torch.manual_seed(seed)
    model = mlp().to(dtype)
    init = mlp().to(dtype)
    init.load_state_dict(model.state_dict())
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=2e-3),
        target_modules=["0", "2", "4"],
        rank=4,
        alpha=8,
        knot_every=knot_every,
    )
    if average == "swa":
        fn = get_swa_multi_avg_fn()

        def ref_update(avg: Tensor, new: Tensor, n: int) -> None:
            avg.add_((new - avg) / (n + 1))
    else:
        decay = float(average.split(":")[1])
        fn = get_ema_multi_avg_fn(decay)

        def ref_update(avg: Tensor, new: Tensor, n: int) -> None:
            avg.lerp_(new, 1 - decay)

    untracked = AveragedModel(model, multi_avg_fn=fn)
    tracked = AveragedModel(model, multi_avg_fn=fn)
    arms = [("untracked", untracked)]
    if dtype == torch.float32:  # track_average refuses half-precision weights (see stall())
        track_average(opt, tracked)
        arms.append(("tracked", tracked))
    reference: dict[str, Tensor] = {}
    g = torch.Generator().manual_seed(seed + 1)
    w_true = torch.randn(16, 4, generator=g)
    probe = torch.randn(256, 16, generator=g)
    with torch.no_grad():
        init_out = init(probe.to(dtype)).double()
    init_w = {k: v.double() for k, v in init.state_dict().items()}
    worst: dict[str, dict[str, float]] = {
        name: {
            "weight_first_link": 0.0,
            "weight_after": 0.0,
            "weight_after_mean": 0.0,
            "out_first_link": 0.0,
            "out_after": 0.0,
        }
        for name, _ in arms
    }
    ref_model = mlp().double()
    for step in range(steps):
        x = torch.randn(64, 16, generator=g)
        y = torch.sin(x @ w_true) + 0.1 * torch.randn(64, 4, generator=g)
        nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        opt.step()
        opt.zero_grad()
        merged = {k: v.double() for k, v in merged_state_dict(model).items()}
        for k, v in merged.items():
            if step == 0:
                reference[k] = v.clone()
            else:
                ref_update(reference[k], v, step)
        untracked.update_parameters(model)
        tracked.update_parameters(model)
        ref_model.load_state_dict(reference)
        with torch.no_grad():
            ref_out = ref_model(probe.double())
        update = math.sqrt(sum(float((reference[k] - init_w[k]).square().sum()) for k in reference))
        first_link = opt.knots_tied == 0
        if step < warmup:
            continue
        for name, avg in arms:
            mine = {k: v.double() for k, v in merged_state_dict(avg.module).items()}
            err = math.sqrt(sum(float((mine[k] - reference[k]).square().sum()) for k in mine))
            with torch.no_grad():
                out = avg(probe.to(dtype)).double()
            out_err = float((out - ref_out).norm() / (ref_out - init_out).norm())
            w = worst[name]
            if not first_link:
                w["weight_after"] = max(w["weight_after"], err / update)
                w["weight_after_mean"] += err / update / (steps - knot_every + 1)
                w["out_after"] = max(w["out_after"], out_err)
            else:
                w["weight_first_link"] = max(w["weight_first_link"], err / update)
                w["out_first_link"] = max(w["out_first_link"], out_err)
    return {
        "average": average,
        "dtype": str(dtype),
        "steps": steps,
        "knot_every": knot_every,
        "warmup": warmup,
        "knots": opt.knots_tied,
        **worst,
    }


def stall(decay: float = 0.999, steps: int = 1000, change: float = 0.01) -> float:
    """How far a bfloat16 ``AveragedModel`` EMA moves towards a weight that changed by
    ``change`` (relative), as a fraction of the way; a float64 EMA moves ``1 − decayˢᵗᵉᵖˢ``."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 64).to(torch.bfloat16)
    ema = AveragedModel(layer, multi_avg_fn=get_ema_multi_avg_fn(decay))
    ema.update_parameters(layer)
    start = ema.module.weight.detach().float().clone()
    with torch.no_grad():
        layer.weight.mul_(1 + change)
    for _ in range(steps):
        ema.update_parameters(layer)
    moved = (ema.module.weight.detach().float() - start).norm()
    return float(moved / (layer.weight.detach().float() - start).norm())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--knot-every", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--averages", nargs="+", default=["ema:0.99", "ema:0.999", "swa"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    rows = [run(a, args.steps, args.knot_every, args.warmup, dtype=dtype) for a in args.averages]
    fmt: Callable[[float], str] = "{:.2e}".format
    print("| average | arm | weight err, first link | weight err after knots: max | mean "
          "| output err, first link | output err after knots: max |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        for arm in ("untracked", "tracked"):
            if arm not in row:
                print(f"| {row['average']} | {arm} | refused (half precision) | | | | |")
                continue
            w = row[arm]
            print(
                f"| {row['average']} | {arm} | {fmt(w['weight_first_link'])} | "
                f"{fmt(w['weight_after'])} | {fmt(w['weight_after_mean'])} | "
                f"{fmt(w['out_first_link'])} | {fmt(w['out_after'])} |"
            )
    moved = stall()
    print(f"bfloat16 EMA 0.999, weight moved by 1%: {moved:.3f} of the way after 1,000 updates "
          f"(float64: {1 - 0.999**1000:.3f})")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "bf16_ema_stall_fraction_moved": moved}, f, indent=1)


if __name__ == "__main__":
    main()
