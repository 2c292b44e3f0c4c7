"""Step times: waiting for the device, and the statistics the tables print.

Example:
    >>> median_ms([0.1, 0.2, 0.3])
    200.0
    >>> paired_ratio([2.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    (1.0, 1.0, 2.0)
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch

__all__ = ["iqr_ms", "mean_ms", "median_ms", "paired_ratio", "sync"]


def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on the CPU).

    Args:
        device: The device timed.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(xs: Sequence[float]) -> float:
    """Median of times in seconds, in milliseconds (NaN for none)."""
    return 1e3 * statistics.median(xs) if xs else float("nan")


def mean_ms(xs: Sequence[float]) -> float:
    """Mean of times in seconds, in milliseconds (NaN for none)."""
    return 1e3 * statistics.fmean(xs) if xs else float("nan")


def iqr_ms(xs: Sequence[float]) -> float:
    """Interquartile range of times in seconds, in milliseconds (NaN for fewer than 4)."""
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return 1e3 * (q[2] - q[0])


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> tuple[float, float, float]:
    """Median of the per-round ratios ``num[i] / den[i]`` and a ~95% interval for it.

    Steps ``i`` of two variants ran in the same round, seconds apart, so their ratio cancels
    slow drift of the machine. The interval is the distribution-free one for a median: order
    statistics ``n/2 ∓ 0.98·√n`` of the sorted ratios.

    Args:
        num: Step times of the variant.
        den: Step times of the reference, round by round.

    Returns:
        ``(median, low, high)``; NaNs for no rounds.
    """
    ratios = sorted(a / b for a, b in zip(num, den, strict=False))
    n = len(ratios)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    half = 0.98 * math.sqrt(n)
    lo = max(0, math.floor(n / 2 - half))
    hi = min(n - 1, math.ceil(n / 2 + half) - 1)
    return statistics.median(ratios), ratios[lo], ratios[hi]
