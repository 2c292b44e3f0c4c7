"""RAdam and knots: does restarting its step counter at every knot hurt, and does reset="moments"
(zero the moments, keep the step counter) fix it?

RAdam rectifies its first ~5 steps (a warm-up built into the optimizer, driven by its ``step``
counter). ``reset="full"`` drops the state at every knot, so every link starts that warm-up again.
A linear student (64×64, a full-rank target) trained 300 steps with rank-4 links of 10 steps,
AdamW and RAdam, each reset policy, against one LoRA link of the same rank; best of 3 LRs, 3
seeds. Prints the final relative error ``‖W − W*‖/‖W*‖`` and writes
experiments/results/radam_reset/radam_reset.json::

    python experiments/radam_reset.py
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch import nn

from chainopt import ChainLoRAOptimizer

OPTIMIZERS = {"adamw": torch.optim.AdamW, "radam": torch.optim.RAdam}


def run(name: str, reset: str, links: bool, lr: float, seed: int, steps: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(64, 64, generator=gen) / 8
    model = nn.Sequential(nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    schedule = {"knot_every": 10} if links else {"knots": [steps + 1]}
    opt = ChainLoRAOptimizer(model, OPTIMIZERS[name](model.parameters(), lr=lr),
                             target_modules=["0"], rank=4, alpha=4, reset=reset, seed=seed,
                             **schedule)  # type: ignore[arg-type]  # fmt: skip
    for _ in range(steps):
        x = torch.randn(128, 64, generator=gen)
        nn.functional.mse_loss(model(x), x @ target.T).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        w = model[0].weight
        return float((w - target).norm() / target.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "radam_reset"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in OPTIMIZERS:
        for label, reset, links in [
            ("LoRA (one link)", "full", False),
            ('COLA, reset="full"', "full", True),
            ('COLA, reset="moments"', "moments", True),
        ]:
            best = None
            for lr in (3e-3, 1e-2, 3e-2):
                errors = [run(name, reset, links, lr, s, args.steps) for s in range(args.seeds)]
                mean = statistics.mean(errors)
                if best is None or mean < best[0]:
                    best = (mean, lr, errors)
            assert best is not None
            rows.append({"optimizer": name, "method": label, "error": best[0], "lr": best[1],
                         "errors": best[2]})  # fmt: skip
            print(f"{name:6} {label:24} error {best[0]:.4f} (lr {best[1]:g})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "radam_reset.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
