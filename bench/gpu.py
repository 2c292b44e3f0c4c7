"""The comparison of ``compare.py`` on a GPU: bf16 weights and a larger model.

Same variants, same rotation, same tables and target checks as ``compare.py``; only the defaults
differ: ``--device cuda``, ``--dtype bfloat16``, a Llama and an OPT of hidden 2048, 8 layers,
sequence 1024, batch 8, vocabulary 32000. Step times are taken between
``torch.cuda.synchronize()`` calls; peak memory comes from the CUDA caching allocator's
statistics (``max_memory_allocated`` over one steady step, on top of the resident tensors).

With bf16 weights chainopt keeps its factors in float32 (as PEFT does with
``autocast_adapter_dtype=True``) and, by default (``--exact-merge auto``), one bf16 merge
residual per adapted weight element, so that knots are exact; ``--exact-merge off`` drops it.

``--quant 4bit`` is QLoRA's setting, as in ``compare.py``: every linear layer but ``lm_head`` a
bitsandbytes ``Linear4bit`` (NF4, double quantization, bf16 compute), PEFT's LoRA and chainopt
on the same 4-bit layers, float32 factors. Memory is the GPU's (the caching allocator's
figures and the tensors on the GPU); chainopt's float32 masters live in pinned host memory and
are reported apart ("host master MiB"); a knot adds ``s·B·A`` to each master on the host and
requantizes it on the GPU.

    python bench/gpu.py                          # on a machine with a CUDA GPU
    python bench/gpu.py --quant 4bit             # the same on an NF4 base (QLoRA)
    python bench/gpu.py --hidden 4096 --layers 4 --modes eager compile
    python bench/gpu.py --quick                  # tiny config, runs on CPU when there is no GPU
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare
import torch


def main(argv: list[str] | None = None) -> int:
    p = compare.build_parser(__doc__)
    p.set_defaults(
        device="cuda" if torch.cuda.is_available() else "cpu",
        dtype="bfloat16",
        hidden=2048,
        layers=8,
        seq=1024,
        batch=8,
        vocab=32000,
        steps=20,
        warmup=3,
        modes=["eager"],
    )
    args = p.parse_args(argv)
    if not args.quick and not str(args.device).startswith("cuda"):
        p.error("no CUDA device: run on a GPU machine, or pass --quick for a CPU smoke run")
    args = compare.quick_config(args)
    return compare.main(args=args, name="gpu")


if __name__ == "__main__":
    raise SystemExit(main())
