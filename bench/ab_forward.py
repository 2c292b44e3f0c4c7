"""A/B of the forward in ``bench/_proposed.py`` against the library's and PEFT's.

Three variants of one base model, stepped in rotation in one process: PEFT LoRA, chainopt as
installed, and chainopt with its adapted-Linear forward replaced (for the modules of that one
optimizer only) by ``fused_lora_linear_forward``. Prints median wall and CPU step times, the
median of the per-round CPU ratios against PEFT, peak tensor memory, and the largest difference
between the two chainopt variants' losses, so a candidate is shown to be a pure speed-up. (The
results in ``bench/results/ab_forward_*.md`` were taken before the library adopted the fused
forward in commit 3e9be6d: "library" there is the previous three-op forward.)

    python bench/ab_forward.py                          # Llama, all linear projections, eager
    python bench/ab_forward.py --arch opt --targets qv --compile
    python bench/ab_forward.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as H
import torch

import chainopt.lora as chain_lora


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    H.common_args(p)
    p.add_argument("--arch", default="llama", choices=["llama", "opt"])
    p.add_argument("--targets", default="all", choices=["qv", "all"])
    p.add_argument("--compile", action="store_true", help="torch.compile the three models")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.seq, args.batch, args.steps = 64, 2, 32, 2, 6
    return args


def main(argv: list[str] | None = None) -> int:
    from _proposed import fused_lora_linear_forward

    args = parse_args(argv)
    H.apply_threads(args.threads)
    H.configure_dynamo()
    spec = H.ModelSpec(
        args.arch,
        hidden=args.hidden,
        layers=args.layers,
        seq=args.seq,
        batch=args.batch,
        vocab=256 if args.quick else 8192,
    )
    lora = H.LoraSpec(rank=args.rank, alpha=args.alpha)
    base = H.build_model(spec, seed=args.seed)
    batches = H.make_batches(spec, seed=args.seed + 1)
    peft = H.make_peft(base, args.arch, args.targets, lora)
    current = H.make_chain(base, args.arch, args.targets, lora, None)
    current.name = "chainopt (library)"
    fused = H.make_chain(base, args.arch, args.targets, lora, None)
    fused.name = "chainopt (proposed forward)"
    for _name, module in fused.chain.adapted_modules():  # type: ignore[union-attr]
        assert type(module).forward is chain_lora._lora_linear_forward
        type(module).forward = fused_lora_linear_forward  # this module's own class only
    variants = [peft, current, fused]
    if args.compile:
        for v in variants:
            H.compile_variant(v, backend="aot_eager" if args.quick else "inductor")

    # Same weights (B made non-zero), same batches: both chainopt variants give the same losses.
    with torch.no_grad():
        g = torch.Generator().manual_seed(args.seed)
        for p in current.chain.factors():  # type: ignore[union-attr]
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        fused.model.load_state_dict(current.model.state_dict())
        diffs = []
        for b in batches[:2]:
            losses = [v.model(**b).loss for v in (current, fused)]
            diffs.append(float((losses[0] - losses[1]).abs()))

    info = H.machine_info()
    header = (
        f"chainopt bench/ab_forward.py · {info['date']} · torch {info['torch']} · "
        f"peft {info['peft']} · {info['cpu_model']}, {info['torch_threads']} torch thread(s)"
        f"{' · --quick' if args.quick else ''}\n"
        f"{spec.label()} · targets {H.TARGET_LABEL[args.targets]} · "
        f"{'compiled' if args.compile else 'eager'} · {args.warmup} warm-up + {args.steps} "
        f"timed steps each · max |loss difference| chainopt library vs proposed: "
        f"{max(diffs):.2e}"
    )
    print(header, flush=True)
    t0 = time.perf_counter()
    H.run_alternating(variants, batches, args.warmup, args.steps, "A/B")
    rows = []
    for v in variants:
        mem = H.measure_memory(v, batches[0])
        paired = statistics.median(c / p for c, p in zip(v.cpu_times, peft.cpu_times, strict=True))
        rows.append(
            [
                v.name,
                f"{H.median_ms(v.step_times):.0f}",
                f"{H.median_ms(v.cpu_times):.0f}",
                f"{H.median_ms(v.step_times) / H.median_ms(peft.step_times):.3f}×",
                f"{H.median_ms(v.cpu_times) / H.median_ms(peft.cpu_times):.3f}×",
                f"{paired:.3f}×",
                f"{H.mib(mem['peak']):.1f}",
            ]
        )
    table = H.markdown_table(
        [
            "variant",
            "step ms (median)",
            "CPU ms (median)",
            "×PEFT wall",
            "×PEFT CPU",
            "paired CPU ratio (median)",
            "peak MiB",
        ],
        rows,
    )
    print(table)
    print(f"total wall time {(time.perf_counter() - t0) / 60:.1f} min")
    mode = "compile" if args.compile else "eager"
    name = f"ab_forward_{args.arch}_{args.targets}_{mode}" + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(f"{header}\n\n{table}\n")
    print(f"wrote {args.out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
