"""Experiment 1: the mechanism, in seconds on CPU (the Frank-Wolfe picture of COLA).

A linear student ``y = W x`` starts at ``W0`` and must learn a target ``W* = W0 + ΔW*`` whose
update ``ΔW*`` is full rank with a decaying spectrum (``σ_k = k^-decay``). One LoRA of rank r can
at best reach the rank-r truncation of ``ΔW*`` (Eckart-Young); a chain of L links of rank r can
reach rank ``L·r``. At an equal number of optimizer steps this compares full fine-tuning,
LoRA r, COLA with 2, 3, … links of rank r, and COLA with rank step-down, reporting the final
relative error ``‖ΔW − ΔW*‖_F / ‖ΔW*‖_F`` (the population loss for isotropic inputs, up to a
constant) and the effective rank of the learned ``ΔW``. Each method gets the best learning rate
of a small grid (by mean final error over seeds).

Run:
    python experiments/mechanism.py --quick
    python experiments/mechanism.py
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from _chains import ChainSpec, build_chain, parse_specs
from _plots import line_plot
from _runs import add_common_args, mean_std, run_metadata, seed_everything, write_json
from torch import nn
from torch.optim.lr_scheduler import LinearLR
from tqdm import tqdm

from chainopt import ChainLoRAOptimizer

DEFAULT_METHODS = [
    "lora:1:4",
    "cola2:2:4",
    "cola3:3:4",
    "cola4:4:4",
    "cola6:6:4",
    "cola8:8:4",
    "cola4_down:4:4,2",
    "lora8:1:8",
    "cola4_keep:4:4:reset=none",
    "cola4_prune:4:4:reset=prune,prune_ratio=0.9",
    "cola4_grad:4:4:init=gradient",
]


def make_target(d_out: int, d_in: int, decay: float, seed: int) -> tuple[torch.Tensor, ...]:
    """``W0`` and a full-rank ``ΔW*`` with singular values ``k^-decay`` (``σ_1 = 1``)."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    u, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g))
    v, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=g))
    k = min(d_out, d_in)
    sigma = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    delta = u[:, :k] @ torch.diag(sigma) @ v[:, :k].T  # (out, k) @ (k, k) @ (k, in)
    return w0, delta, sigma


def full_rank(delta: torch.Tensor, tol: float = 1e-3) -> int:
    """Rank of a full fine-tuning update: singular values above ``tol·σ_max``.

    The convention of ``chain_summary()``'s ``effective_rank``, which covers the chains; full
    fine-tuning has no chain to ask.
    """
    s = torch.linalg.svdvals(delta.double())
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > tol * s[0]).sum())


def run(
    spec: ChainSpec | None,
    w0: torch.Tensor,
    delta: torch.Tensor,
    lr: float,
    seed: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Train one method (``spec=None``: full fine-tuning) and return its error curve and rank."""
    seed_everything(seed)
    d_out, d_in = w0.shape
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w0)
    target = w0 + delta
    norm = delta.norm()
    chain: ChainLoRAOptimizer | None = None
    if spec is None:
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        sched = LinearLR(opt, 1.0, 0.0, total_iters=args.steps)
    else:
        chain, sched = build_chain(
            model, spec, ["0"], total_steps=args.steps, lr=lr, alpha=2.0 * spec.ranks[0], seed=seed
        )
        opt = chain
    g = torch.Generator().manual_seed(10_000 + seed)
    curve: list[float] = []
    for step in range(args.steps):
        x = torch.randn(args.batch_size, d_in, generator=g)
        y = x @ target.T + args.noise * torch.randn(args.batch_size, d_out, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()  # a chain ties its knots here
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps - 1:
            w = model[0].weight.detach()  # parametrized: W + s·B·A
            curve.append(float((w - target).norm() / norm))
    if chain is None:
        rank = full_rank(model[0].weight.detach() - w0)
    else:
        rank = chain.chain_summary().modules["0"].effective_rank
        chain.merge_and_unload()
    learned = model[0].weight.detach() - w0
    return {
        "rel_error": float((learned - delta).norm() / norm),
        "effective_rank": rank,
        "curve": curve,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, "experiments/results/mechanism")
    parser.add_argument("--dim", type=int, default=64, help="d_in = d_out")
    parser.add_argument("--decay", type=float, default=1.0, help="σ_k = k^-decay")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--noise", type=float, default=0.01)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="NAME:LINKS:R1,R2,... (ranks per link, last repeats)",
    )
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--replot", action="store_true", help="redraw from OUT/results.json")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads((args.out / "results.json").read_text()), args)
        return
    if args.quick:
        args.steps, args.lrs = 240, [1e-2]
        args.methods = ["lora:1:4", "cola3:3:4", "cola3_down:3:4,2"]
        args.seeds = args.seeds or [0]
    args.seeds = args.seeds or [0, 1, 2]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    specs: list[ChainSpec | None] = [None, *parse_specs(args.methods)]
    names = ["full_ft", *[s.name for s in specs if s is not None]]
    jobs = [(s, lr, seed) for s in specs for lr in args.lrs for seed in args.seeds]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in names}
    sigma = None
    for spec, lr, seed in tqdm(jobs, desc="runs", disable=args.no_progress):
        w0, delta, sigma = make_target(args.dim, args.dim, args.decay, seed)
        name = "full_ft" if spec is None else spec.name
        results[name].setdefault(str(lr), []).append(run(spec, w0, delta, lr, seed, args))
    assert sigma is not None

    summary: dict[str, Any] = {}
    for name, by_lr in results.items():
        best_lr = min(by_lr, key=lambda lr: mean_std(r["rel_error"] for r in by_lr[lr])[0])
        rs = by_lr[best_lr]
        err, err_sd = mean_std(r["rel_error"] for r in rs)
        rank, rank_sd = mean_std(r["effective_rank"] for r in rs)
        spec = next((s for s in specs if s is not None and s.name == name), None)
        summary[name] = {
            "best_lr": float(best_lr),
            "rel_error": {"mean": err, "std": err_sd},
            "effective_rank": {"mean": rank, "std": rank_sd},
            "max_rank": args.dim
            if spec is None
            else sum(spec.rank_of(i) for i in range(spec.links)),
            "best_possible_at_max_rank": None,
            "trainable_per_link": args.dim**2 if spec is None else 2 * args.dim * spec.ranks[0],
        }
    # Eckart-Young: the best any update of rank k can do, ‖ΔW* − [ΔW*]_k‖ / ‖ΔW*‖
    tail = sigma.pow(2).flip(0).cumsum(0).flip(0)  # tail[k] = Σ_{j>=k} σ_j²
    bound = {
        k: float((tail[k] / tail[0]).sqrt()) if k < len(sigma) else 0.0
        for k in range(0, len(sigma) + 1)
    }
    for row in summary.values():
        row["best_possible_at_max_rank"] = bound[min(row["max_rank"], len(sigma))]
    payload = {
        "experiment": "mechanism",
        "setup": {
            "dim": args.dim,
            "decay": args.decay,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "noise": args.noise,
            "lrs": args.lrs,
            "methods": args.methods,
            "optimizer": "AdamW, linear LR decay, alpha = 2r",
        },
        "eckart_young_rel_error": bound,
        "meta": run_metadata(args, started),
        "summary": summary,
        "runs": results,
    }
    write_json(args.out / "results.json", payload)
    plot(payload, args)


def plot(payload: dict[str, Any], args: argparse.Namespace) -> None:
    """Error curves of every method (best LR, mean over seeds) and error against chain length."""
    summary, results = payload["summary"], payload["runs"]
    bound = {int(k): v for k, v in payload["eckart_young_rel_error"].items()}
    specs: list[ChainSpec | None] = [None, *parse_specs(payload["setup"]["methods"])]
    # a diverged method (final error > 1: worse than not training) would squash the plot
    best = {
        n: results[n][str(summary[n]["best_lr"])]
        for n in summary
        if summary[n]["rel_error"]["mean"] <= 1.0
    }
    steps_run = payload["setup"]["steps"]
    n_points = len(best["full_ft"][0]["curve"])
    steps = [min(i * args.log_every, steps_run - 1) for i in range(n_points)]
    line_plot(
        {
            n: (steps, [sum(r["curve"][i] for r in rs) / len(rs) for i in range(len(steps))])
            for n, rs in best.items()
        },
        args.out / "error_curves.png",
        xlabel="optimizer step",
        ylabel="‖ΔW − ΔW*‖ / ‖ΔW*‖ (mean over seeds)",
        logy=True,
        hlines={f"best rank-{k}": v for k, v in bound.items() if k in (4, 8, 16)},
    )
    chain_plot(summary, specs, bound, args.out / "error_vs_links.png")


def chain_plot(
    summary: dict[str, Any],
    specs: list[ChainSpec | None],
    bound: dict[int, float],
    path: Any,
) -> None:
    """Final error against chain length for the constant-rank chains, with the rank bound."""
    chains = sorted(
        (
            s
            for s in specs
            if s is not None and not s.options and len(set(s.ranks)) == 1 and s.ranks[0] == 4
        ),
        key=lambda s: s.links,
    )
    if len(chains) < 2:
        return
    links = [s.links for s in chains]
    line_plot(
        {
            "COLA, rank-4 links (measured)": (
                links,
                [summary[s.name]["rel_error"]["mean"] for s in chains],
            ),
            "best rank-4L update (Eckart-Young)": (links, [bound[4 * n] for n in links]),
        },
        path,
        xlabel="links in the chain (same total steps)",
        ylabel="‖ΔW − ΔW*‖ / ‖ΔW*‖",
        hlines={"full fine-tuning": summary["full_ft"]["rel_error"]["mean"]},
        markers=True,
    )


if __name__ == "__main__":
    main()
