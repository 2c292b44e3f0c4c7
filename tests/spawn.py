"""Running a test's workers in forked processes: the one helper multi-process tests share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch.multiprocessing as mp


def spawn(
    fn: Callable[..., None], nprocs: int, *args: Any, timeout: float = 120.0, what: str = "workers"
) -> None:
    """Run ``fn(rank, *args)`` on ``nprocs`` forked processes; fail the test, never hang.

    Forked, so the workers do not import torch a second time. A worker that raises fails the
    test with its traceback; workers still running after ``timeout`` seconds (a deadlock) are
    killed and the test fails naming ``what``.
    """
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{what} did not finish within {timeout:.0f}s")
