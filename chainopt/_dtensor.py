"""DTensor helpers: whole tensors from FSDP2 shards, and shards from whole tensors.

FSDP2's ``fully_shard`` turns parameters into ``DTensor``s. A knot needs whole tensors (it merges
a whole weight), then writes each rank's part back; a checkpoint or an export needs every tensor
whole (:func:`gathered`). ``torch.distributed.tensor`` is imported only when something has
already imported it: no DTensor can exist otherwise.

Example:
    >>> import torch
    >>> t = torch.ones(2, 3)
    >>> is_sharded(t), full_tensor(t) is t
    (False, True)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, cast

from torch import Tensor, nn

__all__ = ["copy_full_", "full_tensor", "gathered", "holds_shards", "is_sharded", "shard_like"]


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor``, e.g. a parameter sharded by FSDP2's ``fully_shard``."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist: skip the import
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def holds_shards(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is a ``DTensor`` (FSDP2 sharded it)."""
    if "torch.distributed.tensor" not in sys.modules:
        return False
    return any(is_sharded(t) for t in (*model.parameters(), *model.buffers()))


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole of ``tensor``: a ``DTensor`` is all-gathered, anything else returned as it is.

    Gathering is a collective: under FSDP2 every rank must call this, in the same order.
    """
    if is_sharded(tensor):
        whole: Tensor = tensor.full_tensor()  # type: ignore[attr-defined]
        return whole
    return tensor


def gathered(obj: Any) -> Any:
    """``obj`` with every ``DTensor`` in it (in dicts, lists, tuples) gathered whole onto the CPU.

    A collective under FSDP2: every rank calls it on the same structure. Whole onto the CPU
    because a sharded model need not fit one device whole; other tensors and values are
    returned as they are (by reference), dicts in their order.

    Example:
        >>> import torch
        >>> t = torch.ones(2)
        >>> out = gathered({"a": t, "b": [1, (t,)]})
        >>> out["a"] is t, out["b"][1][0] is t
        (True, True)
    """
    if isinstance(obj, Tensor):
        return full_tensor(obj).cpu() if is_sharded(obj) else obj
    if isinstance(obj, dict):
        return {k: gathered(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [gathered(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(gathered(v) for v in obj)
    return obj


def copy_full_(dst: Tensor, src: Tensor) -> Tensor:
    """``dst.copy_(src)`` from a whole ``src``; into a ``DTensor`` only the local part is copied.

    Every rank holds the same ``src`` (drawn from the same generator, merged from the same
    gathered tensors), so each takes its own shard of it without communicating.

    Example:
        >>> import torch
        >>> copy_full_(torch.zeros(2), torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return dst.copy_(shard_like(src, dst) if is_sharded(dst) else src)


def on_shards(tensor: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn`` applied to this rank's part of ``tensor``: a ``DTensor`` laid out as ``tensor`` is
    for a ``DTensor`` (no communication; ``fn`` keeps the shape), ``fn(tensor)`` otherwise.

    Example:
        >>> import torch
        >>> on_shards(torch.ones(2), lambda t: 2 * t).tolist()
        [2.0, 2.0]
    """
    if not is_sharded(tensor):
        return fn(tensor)
    from torch.distributed.tensor import DTensor

    sharded = cast(DTensor, tensor)
    return DTensor.from_local(
        fn(sharded.to_local()), sharded.device_mesh, sharded.placements,
        shape=sharded.shape, stride=sharded.stride(),
    )  # fmt: skip


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of ``whole``, as a ``DTensor`` laid out like ``like`` (no communication).

    Every rank must hold the same ``whole``; each keeps its own part. ``like`` must be a DTensor.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        raise TypeError(f"like must be a DTensor, got {type(like).__name__}")
    shard: Tensor = distribute_tensor(
        whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None
    )
    return shard
