"""The command line: ``python rank_bound.py [--tiny] [--out DIR] [--set KEY=VALUE ...]``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from _runs import REPO_ROOT, claim, finished, with_overrides, write_json_atomic

from . import __doc__ as _ABOUT
from .design import TINY, Design, method_by_name
from .plan import base_metrics, drive, estimate, qualification
from .train import Context, Stop, run_key, train_run

__all__ = ["DEFAULT_OUT", "main"]

DEFAULT_OUT = REPO_ROOT / "experiments" / "results" / "rank_bound"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=_ABOUT, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, tiny task (a test)")
    p.add_argument("--out", type=Path, default=None, help=f"results folder ({DEFAULT_OUT})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--estimate-only", action="store_true", help="print the budget and stop")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override design fields (pilots): n_people=80 only=lora1,full",
    )
    p.add_argument(
        "--extra",
        nargs="*",
        default=[],
        metavar="METHOD@LR",
        help="supplementary runs after the plan, outside its analysis: METHOD at LR on every "
        "seed (cola4x2@0.003)",
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = with_overrides(TINY if args.tiny else Design(), args.set)
    extras = []
    for spec in args.extra:
        name, _, lr = spec.partition("@")
        try:
            extras.append((method_by_name(name, d), float(lr)))
        except (KeyError, ValueError):
            p.error(f"--extra wants METHOD@LR with a method of the design, got {spec!r}")
    out = args.out or DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("ckpt/\n")
    ctx = Context(d, out, stop_after=args.stop_after_steps, verbose=not args.quiet)
    est_path = out / "estimate.json"
    if est_path.exists() and not args.estimate_only:
        est = json.loads(est_path.read_text())
    else:
        est = estimate(ctx)
        write_json_atomic(est_path, est)
    if not args.quiet:
        print("estimated compute (one core):", json.dumps(est, indent=1), flush=True)
    if args.estimate_only:
        return
    base_metrics(ctx)
    try:
        runs = drive(ctx, args.max_runs)
    except Stop as stop:
        print(f"stopped inside {stop} (--stop-after-steps)", flush=True)
        return
    for method, lr in extras:  # claimed like the plan's runs: several drivers may share them
        for seed in d.seeds:
            handle = claim(ctx.out / "ckpt", run_key(method, lr, seed))
            if handle is None:
                continue
            with handle:
                if not (ctx.out / "runs" / f"{run_key(method, lr, seed)}.json").exists():
                    train_run(ctx, method, lr, seed, "extra")
        runs = finished(ctx.out)
    q = qualification(runs, d)
    write_json_atomic(out / "qualification.json", q)
    if not args.quiet:
        print(f"{len(runs)} runs finished; qualification: {json.dumps(q, indent=1)}", flush=True)
