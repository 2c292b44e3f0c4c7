"""``torch.compile`` bookkeeping: dynamo's counters, and a recompile limit for many model copies.

Example:
    >>> before = dynamo_counts()
    >>> count_diff(dynamo_counts(), before)
    {'frames': 0, 'graphs': 0, 'graph_breaks': 0}
"""

from __future__ import annotations

__all__ = ["configure_dynamo", "count_diff", "dynamo_counts"]


def dynamo_counts() -> dict[str, int]:
    """Snapshot of dynamo's counters: frames compiled, graphs, graph breaks.

    Returns:
        ``frames`` (every frame dynamo was asked to compile: a first compile or a recompile),
        ``graphs`` and ``graph_breaks``.
    """
    from torch._dynamo.utils import counters

    return {
        "frames": int(counters["frames"]["total"]),
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }


def count_diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    """What the counters of :func:`dynamo_counts` went up by between two snapshots."""
    return {k: after[k] - before.get(k, 0) for k in after}


def configure_dynamo(limit: int = 64) -> None:
    """Raise dynamo's recompile limits to at least ``limit``.

    Several model copies of one class are compiled in one process: each may add a cache entry on
    the same code objects. Raising the limit keeps every one of them from falling back to eager.

    Args:
        limit: The smallest limit to allow.
    """
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), limit))
