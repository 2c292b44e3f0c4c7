"""What happens to the factors' optimizer state at a knot.

- ``"full"`` (default, the COLA paper's "new optimizer state"): the state is dropped, so the next
  link starts from the optimizer's initial state (AdamW at its step 1).
- ``"none"``: the state is kept as it is.
- ``"prune"``: ReLoRA-style magnitude pruning: the ``prune_ratio`` fraction of entries with the
  smallest first moment (Adam's ``exp_avg``, SGD's ``momentum_buffer``: the first state tensor
  shaped like the parameter) is zeroed in *every* state tensor shaped like the parameter, with
  one mask; counters such as Adam's ``step`` are kept. One shared mask matters: pruning Adam's
  second moment where the first survives divides by ``√0 + ε`` and diverges.

A factor whose shape changed (rank step-down) always loses its state.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(4))
    >>> state = {p: {"step": torch.tensor(7.0), "exp_avg": torch.tensor([0.1, -3.0, 0.2, 4.0]),
    ...              "exp_avg_sq": torch.tensor([9.0, 1.0, 0.5, 2.0])}}
    >>> reset_state(state, [p], "prune", prune_ratio=0.5)
    >>> state[p]["exp_avg"].tolist(), state[p]["exp_avg_sq"].tolist(), float(state[p]["step"])
    ([0.0, -3.0, 0.0, 4.0], [0.0, 1.0, 0.0, 2.0], 7.0)
"""

from __future__ import annotations

from collections.abc import Iterable, MutableMapping
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor

__all__ = ["ResetPolicy", "reset_state"]

ResetPolicy: TypeAlias = Literal["full", "none", "prune"]


@torch.no_grad()
def _prune_(tensors: list[Tensor], ratio: float) -> None:
    """Zero, in every tensor, the entries where the first one is among the smallest ``ratio``."""
    k = int(ratio * tensors[0].numel())
    if k <= 0:
        return
    magnitude = tensors[0].detach().abs().float()
    threshold = magnitude.flatten().kthvalue(k).values
    drop = magnitude <= threshold
    for t in tensors:
        t.masked_fill_(drop, 0)


def reset_state(
    state: MutableMapping[Any, dict[str, Any]],
    params: Iterable[Tensor],
    policy: ResetPolicy,
    prune_ratio: float = 0.9,
    fresh: MutableMapping[Any, dict[str, Any]] | None = None,
) -> None:
    """Apply ``policy`` to the optimizer ``state`` of ``params`` (keyed by tensor, in place).

    Args:
        state: the wrapped optimizer's ``state``.
        params: the factors whose link was just merged.
        policy: ``"full"``, ``"none"`` or ``"prune"``.
        prune_ratio: fraction of entries zeroed by ``"prune"``.
        fresh: for ``"full"``: state to restore instead of nothing (optimizers that build their
            state at construction, such as Adagrad).
    """
    for p in params:
        entry = state.get(p)
        if entry is None:
            continue
        shaped = [v for v in entry.values() if isinstance(v, Tensor) and v.dim() > 0]
        if policy == "full" or any(v.shape != p.shape for v in shaped):
            del state[p]
            if fresh is not None and p in fresh and fresh[p]["__shape__"] == p.shape:
                state[p] = {
                    k: v.clone() if isinstance(v, Tensor) else v
                    for k, v in fresh[p].items()
                    if k != "__shape__"
                }
        elif policy == "prune" and shaped:
            _prune_(shaped, prune_ratio)
