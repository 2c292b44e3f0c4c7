"""Print SmolLM2-135M's zero-shot accuracy on every task of the examples (the baseline).

Run::

    python examples/zero_shot.py --threads 1
    python examples/zero_shot.py --tasks strategyqa winowhy --n-test 100
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chainopt_examples.scoring import zero_shot_report
from chainopt_examples.tasks import TASKS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Zero-shot SmolLM2 baseline on the tasks.")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is fastest on a busy CPU)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    zero_shot_report(args.tasks, args.n_test, args.batch_size)


if __name__ == "__main__":
    main()
