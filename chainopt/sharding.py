"""FSDP2: pointing the wrapped optimizer at the sharded Parameters ``fully_shard`` made.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=1)
    >>> opt.rebind_parameters()  # nothing was replaced: nothing changes
    >>> len(opt.param_groups[0]["params"])
    2
"""

from __future__ import annotations

from collections.abc import MutableSequence
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer

from ._dtensor import is_sharded, shard_like
from .adapted import AdaptedModule

__all__ = ["rebind"]


def rebind(
    optimizer: Optimizer,
    model: nn.Module,
    names: dict[int, str],
    records: MutableSequence[AdaptedModule],
) -> dict[int, str]:
    """Replace, in ``optimizer``'s groups, each Parameter ``model`` no longer holds by its new one.

    ``names`` maps ``id`` of the Parameters the optimizer was built with to their qualified
    names. ``records`` are looked up again in place, and merge residuals are sharded like their
    (now sharded) weights. Returns the new ``id → name`` map.

    Raises:
        RuntimeError: a parameter the optimizer holds left the model, was replaced after it
            got optimizer state, or is a sharded 4-bit weight. Nothing is changed then.
    """
    for r in records:
        weight = getattr(r.module, "weight", None)
        if r.quant is not None and isinstance(weight, Tensor) and is_sharded(weight):
            raise RuntimeError(
                f"fully_shard sharded the 4-bit weight of {r.name!r}: a bitsandbytes Params4bit "
                "or torchao NF4Tensor loses its quantization state when sharded; keep the 4-bit "
                "weights whole with fully_shard(..., ignored_params={the 4-bit weights}) (the "
                "factors and other parameters are still sharded), or use DDP"
            )
    current = dict(model.named_parameters())
    moves: list[tuple[list[Any], int, Tensor]] = []
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            new = current.get(names.get(id(p), ""))
            if new is None:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} held by the optimizer is no "
                    "longer in the model"
                )
            if new is not p and p in optimizer.state:
                raise RuntimeError(
                    f"parameter {names[id(p)]!r} was replaced after it got optimizer state: "
                    "shard the model before the first step"
                )
            if new is not p:
                moves.append((group["params"], i, new))
    for params, i, replacement in moves:
        params[i] = replacement
    records[:] = [r.refreshed() for r in records]
    for r in records:  # FSDP2 leaves buffers whole: shard the residuals
        for part, target in r.parts():
            residual = part.merge_residual
            if residual is not None and is_sharded(target) and not is_sharded(residual):
                part.merge_residual = shard_like(residual, target)
    return {id(p): n for n, p in current.items()}
