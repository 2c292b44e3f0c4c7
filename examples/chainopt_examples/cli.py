"""The flags of the LoRA-vs-COLA example script, ``llama_classify.py``.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_arguments(parser, default_model="tiny-opt")
    >>> args = apply_quick(parser.parse_args(["--quick"]))
    >>> args.model, args.n_train, args.epochs, args.max_length
    ('tiny-opt', 16, 1, 64)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .tasks import TASKS

__all__ = ["add_arguments", "apply_quick"]


def add_arguments(parser: argparse.ArgumentParser, default_model: str) -> None:
    """Add the flags both example scripts take.

    Args:
        parser: The script's parser.
        default_model: ``--model``'s default (a name :func:`chainopt_examples.models.load_model`
            takes).
    """
    parser.add_argument("--model", default=default_model, help="smollm2, tiny-opt, or a hub id")
    parser.add_argument("--task", default="bbc_news", choices=sorted(TASKS))
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--links", type=int, default=3, help="COLA links (LoRA is 1)")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--quick", action="store_true", help="a tiny run, for CI (< 2 min)")


def apply_quick(args: argparse.Namespace) -> argparse.Namespace:
    """With ``--quick``, shrink the run to 2 × 4 steps of 4 short sequences (the mechanics).

    Args:
        args: Parsed flags of :func:`add_arguments`; changed in place.

    Returns:
        ``args``.
    """
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.batch_size = 16, 24, 1, 4
        args.max_length = args.max_length or 64
    return args
