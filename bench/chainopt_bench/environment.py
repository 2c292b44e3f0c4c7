"""The process-wide setup of a benchmark run, its common flags, and where it ran.

:func:`configure` is the first thing each script's ``main()`` does; nothing in this package
changes environment variables, warning filters or torch settings at import. (The memory probe
makes c10 print a harmless "Memory block of unknown size was allocated before the profiling
started" line; c10 reads ``TORCH_CPP_LOG_LEVEL`` only when torch loads, so silence it from the
shell: ``TORCH_CPP_LOG_LEVEL=ERROR python bench/compare.py``.)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULT_OUT", "add_common_args", "configure", "load_average", "machine_info"]

#: Where results go unless ``--out`` says otherwise.
DEFAULT_OUT: Path = Path(__file__).resolve().parents[1] / "results"


def configure(threads: int | None) -> None:
    """Set up the process for a benchmark: offline Hugging Face, quiet logs, torch threads.

    Args:
        threads: torch intra-op threads; ``0`` or ``None``: one per CPU core.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are built from config: never download
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PEFT calls a transformers API that transformers 5 deprecates; not ours to fix.
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    # torch.compile'd CPU kernels read the same setting when they are built.
    torch.set_num_threads(threads or os.cpu_count() or 1)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Add the flags every script takes.

    Args:
        parser: The script's parser.
    """
    parser.add_argument("--quick", action="store_true", help="tiny config, few steps (< 1 min)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where results go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--knot-every", type=int, default=5, help="K of the knot variant")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1; 0: all CPU cores). On a shared machine one "
        "thread gives far steadier step times: see docs/benchmarks.md",
    )


def machine_info() -> dict[str, Any]:
    """Date, versions, CPU/GPU and torch threads of this run.

    Returns:
        A JSON-ready dict.
    """
    import peft
    import transformers

    import chainopt

    try:
        from importlib.metadata import version

        bnb: str | None = version("bitsandbytes")
    except Exception:  # not installed: only --quant 4bit needs it
        bnb = None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bnb,
        "chainopt": chainopt.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu_model": _cpu_model(),
        "loadavg": load_average(),
    }


def load_average() -> tuple[float, float, float] | None:
    """The machine's 1, 5 and 15-minute load averages (``None`` where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
