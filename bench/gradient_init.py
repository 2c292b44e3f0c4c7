"""What ``init="gradient"`` pays per module at a knot: chainopt's seeded randomized SVD against a
full SVD (what chainopt did before, and what a plain LoRA-GA/PiSSA-style init computes).

For each weight shape of SmolLM2-135M and of a 7B Llama layer, a gradient-like matrix
``G = Σ_t gᵀ_t·x_t`` of T tokens with a decaying spectrum (rank T; T = 64 and T = 1024) is built,
and both methods find A (rank r) from it in rotation, so machine noise hits both alike. Prints the
median time of each, the ratio (full SVD / chainopt, with the range over rounds), and how much of
the exact top-r energy ``‖G·Vᵣᵀ‖²`` chainopt's A captures (1 = the SVD's subspace).

    python bench/gradient_init.py            # SmolLM2 shapes and 4096 × 4096 (a few minutes)
    python bench/gradient_init.py --big      # also 11008 × 4096 (a 7B MLP; long on a CPU)
    python bench/gradient_init.py --quick    # two small shapes, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chainopt_bench.environment import configure, machine_info
from chainopt_bench.output import markdown_table, save_json

from chainopt import a_from_gradient

SHAPES = {
    "SmolLM2 q/o (576×576)": (576, 576),
    "SmolLM2 k/v (192×576)": (192, 576),
    "SmolLM2 gate/up (1536×576)": (1536, 576),
    "SmolLM2 down (576×1536)": (576, 1536),
    "7B q/k/v/o (4096×4096)": (4096, 4096),
}
BIG = {"7B gate/up (11008×4096)": (11008, 4096)}
QUICK = {"small (256×192)": (256, 192), "small (192×256)": (192, 256)}


def gradient_like(out: int, inp: int, tokens: int, seed: int) -> torch.Tensor:
    """``Σ_t gᵀ_t·x_t`` over ``tokens`` tokens whose sizes decay as ``1/√t``: rank ``tokens``."""
    gen = torch.Generator().manual_seed(seed)
    t = min(tokens, out, inp)
    g = torch.randn(t, out, generator=gen) / torch.arange(1, t + 1).sqrt()[:, None]
    return g.T @ torch.randn(t, inp, generator=gen)


def full_svd_a(g: torch.Tensor, rank: int) -> torch.Tensor:
    """The peer: A from the full SVD, rows scaled as chainopt scales them."""
    return torch.linalg.svd(g, full_matrices=False).Vh[:rank] / 3**0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two small shapes, one round")
    p.add_argument("--big", action="store_true", help="also the 7B MLP shape")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    configure(args.threads)
    shapes = QUICK if args.quick else SHAPES | (BIG if args.big else {})
    rounds = 2 if args.quick else args.rounds
    cases = [(n, s, r, t) for n, s in shapes.items() for t in args.tokens for r in args.ranks]
    rows, records = [], []
    for name, (out, inp), rank, tokens in tqdm(cases, unit="case", file=sys.stderr):
        g = gradient_like(out, inp, tokens, seed=out + inp + tokens)
        times: dict[str, list[float]] = {"svd": [], "chainopt": []}
        for _ in range(rounds):  # in rotation: load on the machine hits both alike
            for label, fn in (("svd", full_svd_a), ("chainopt", a_from_gradient)):
                tick = time.perf_counter()
                fn(g, rank)
                times[label].append(time.perf_counter() - tick)
        exact = full_svd_a(g, rank) * 3**0.5
        mine = a_from_gradient(g, rank) * 3**0.5
        captured = float((g @ mine.T).square().sum() / (g @ exact.T).square().sum())
        ratios = [s / c for s, c in zip(times["svd"], times["chainopt"], strict=True)]
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        records.append({"shape": name, "out": out, "in": inp, "rank": rank, "tokens": tokens,
                        "ms": med, "ratios": ratios, "captured": captured})  # fmt: skip
        rows.append([name, tokens, rank, f"{med['svd']:.1f}", f"{med['chainopt']:.1f}",
                     f"**{statistics.median(ratios):.1f}** [{min(ratios):.1f}, {max(ratios):.1f}]",
                     f"{captured:.6f}"])  # fmt: skip
    print("== headline ==")
    print(markdown_table(["shape", "tokens T", "rank r", "full SVD ms", "chainopt ms",
                          "× faster (median [range of rounds])", "top-r energy captured"],
                         rows))  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gradient_init_quick.json" if args.quick else "gradient_init.json"
    save_json(args.out / name, {"machine": machine_info(), "rounds": rounds, "cases": records})
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
