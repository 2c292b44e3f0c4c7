"""Writing a file once under ``torch.distributed``: rank 0 writes, every rank hears how it went.

A save that every rank calls (it gathers FSDP2 shards, a collective) writes its files on rank 0
only. No rank returns before they are in place, and if rank 0 could not write, every rank
raises: a rank that went on as if the files existed would wait for the others at its next
collective, or deploy nothing. Without a process group the write simply runs.

Example:
    >>> on_rank_zero(lambda: "written", "the file")  # no process group: it runs here
    'written'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist
from torch import nn

from ._dtensor import holds_shards
from ._validate import is_distributed

__all__ = ["on_rank_zero", "write_once"]

T = TypeVar("T")


def on_rank_zero(write: Callable[[], T], what: str) -> T | None:
    """Run ``write()`` on rank 0 only; a collective: every rank calls it.

    Args:
        write: writes the files (and returns anything).
        what: what it writes, for the other ranks' error (``"the checkpoint 'x.pt'"``).

    Returns:
        What ``write()`` returned on rank 0; ``None`` on the other ranks.

    Raises:
        Exception: on rank 0, whatever ``write()`` raised. On every other rank an ``OSError``
            ``"rank 0 could not write {what}: …"``, with rank 0's error in it.
    """
    if not is_distributed():
        return write()
    failure: list[str | None] = [None]
    result: T | None = None
    if dist.get_rank() == 0:
        try:
            result = write()
        except Exception as exc:
            failure[0] = f"{type(exc).__name__}: {exc}"
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)  # also the barrier: the files are in place
    if failure[0] is not None:
        raise OSError(f"rank 0 could not write {what}: {failure[0]}")
    return result


def write_once(model: nn.Module, write: Callable[[], T], what: str) -> T | None:
    """Write an export of ``model``: on rank 0 alone (:func:`on_rank_zero`) when FSDP2 shards it,
    since every rank then gathered the same whole tensors (a collective); otherwise here, as
    each caller saves as it is called (DDP, one process).

    Example:
        >>> write_once(nn.Linear(2, 2), lambda: "written", "the file")
        'written'
    """
    return on_rank_zero(write, what) if holds_shards(model) else write()
