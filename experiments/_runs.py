"""What every experiment run does around its training: seeds, flags, metadata, JSON, statistics.

Example:
    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "REPO_ROOT",
    "add_common_args",
    "mean_std",
    "run_metadata",
    "seed_everything",
    "write_json",
]

#: Root of the chainopt repository (the parent of ``experiments/``).
REPO_ROOT: Path = Path(__file__).resolve().parent.parent


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch.

    Args:
        seed: The seed of all three.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def add_common_args(parser: argparse.ArgumentParser, out_default: str) -> None:
    """Add the flags every experiment script takes: ``--quick``, ``--seeds``, ``--out``, threads.

    Args:
        parser: The script's parser.
        out_default: ``--out``'s default, relative to the repository root.
    """
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test run (< 1 minute)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / out_default, help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true", help="hide tqdm progress bars")


def run_metadata(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """Where, when and how a run happened (stored in every results JSON).

    Args:
        args: The script's flags.
        started: ``time.time()`` when the run started.

    Returns:
        Command, flags, date, wall time, git commit, machine and versions.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": round(time.time() - started, 1),
        "git_commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating the folder.

    Args:
        path: The file to write.
        payload: What to write (non-JSON numbers such as tensors' floats go through ``float``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"wrote {path}")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value, NaN for none).

    Args:
        values: The numbers.

    Returns:
        ``(mean, std)``.
    """
    xs = [float(v) for v in values]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var)
