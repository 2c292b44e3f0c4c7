"""What happens to the factors' optimizer state at a knot.

- ``"full"`` (default, the COLA paper's "new optimizer state"): the state is dropped, so the next
  link starts from the optimizer's initial state (AdamW at its step 1).
- ``"none"``: the state is kept as it is.
- ``"prune"``: ReLoRA-style magnitude pruning: the ``prune_ratio`` fraction of entries with the
  smallest first moment (Adam's ``exp_avg``, SGD's ``momentum_buffer``: the first state tensor
  shaped like the parameter) is zeroed in *every* state tensor shaped like the parameter, with
  one mask; counters such as Adam's ``step`` are kept. One shared mask matters: pruning Adam's
  second moment where the first survives divides by ``√0 + ε`` and diverges. State of another
  shape (Adafactor's factored row and column variances) has no entry-wise mask and is kept.
- ``"moments"``: every state tensor that is not a scalar (the moments, Adafactor's factored
  variances among them) is zeroed, scalar counters (``step``) are kept: optimizers whose early
  steps are special (RAdam's rectification warm-up, a bias correction) do not start over.

A factor whose shape changed (rank step-down: the knot says which), and a link dropped because
it was not finite, always lose their state; the state of any other factor keeps its entries and
their shapes under ``"none"``, ``"prune"`` and ``"moments"`` (Adafactor's included).
:func:`resolve_reset` turns a policy into the function a knot calls.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(4))
    >>> state = {p: {"step": torch.tensor(7.0), "exp_avg": torch.tensor([0.1, -3.0, 0.2, 4.0]),
    ...              "exp_avg_sq": torch.tensor([9.0, 1.0, 0.5, 2.0])}}
    >>> resolve_reset("prune", prune_ratio=0.5)(state, [p])
    >>> state[p]["exp_avg"].tolist(), state[p]["exp_avg_sq"].tolist(), float(state[p]["step"])
    ([0.0, -3.0, 0.0, 4.0], [0.0, 1.0, 0.0, 2.0], 7.0)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor

__all__ = ["ResetPolicy"]  # the public names (chainopt re-exports them); the rest is internal

ResetPolicy: TypeAlias = Literal["full", "none", "prune", "moments"]
"""What a knot does to the factors' optimizer state (see :mod:`chainopt.reset`)."""

StateReset: TypeAlias = Callable[
    [MutableMapping[Any, dict[str, Any]], Sequence[Tensor], Collection[Tensor]], None
]
"""``reset(state, params, resized)``: apply a policy to ``state[p]`` of each of ``params``, in
place; the state of those in ``resized`` (new shapes) is dropped whatever the policy."""


class FreshState:
    """The state an optimizer built at construction (Adagrad's sums), restored by a full reset.

    Kept here, outside the optimizer's own ``state``, with the shape each entry was built for.

    Args:
        state: the optimizer's ``state`` right after construction.
        params: the factors.
    """

    def __init__(self, state: MutableMapping[Any, dict[str, Any]], params: Iterable[Tensor]):
        self._entries = {p: (tuple(p.shape), _clone(state[p])) for p in params if state.get(p)}

    def restore(self, state: MutableMapping[Any, dict[str, Any]], p: Tensor) -> None:
        """Put ``p``'s construction-time state back, if it had one for its current shape."""
        entry = self._entries.get(p)
        if entry is not None and entry[0] == tuple(p.shape):
            state[p] = _clone(entry[1])


def _clone(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in entry.items()}


def _shaped(entry: dict[str, Any]) -> list[Tensor]:
    """The state tensors that are not scalars (moments, of the parameter's shape or not)."""
    return [v for v in entry.values() if isinstance(v, Tensor) and v.dim() > 0]


@torch.no_grad()
def _prune_(tensors: list[Tensor], ratio: float, shape: torch.Size) -> None:
    """Zero, in every tensor of ``shape``, the entries where the first one is among the smallest
    ``ratio`` (tensors of other shapes are kept)."""
    tensors = [t for t in tensors if t.shape == shape]
    if not tensors:
        return
    k = int(ratio * tensors[0].numel())
    if k <= 0:
        return
    magnitude = tensors[0].detach().abs().float()
    threshold = magnitude.flatten().kthvalue(k).values
    drop = magnitude <= threshold
    for t in tensors:
        t.masked_fill_(drop, 0)


@dataclass(frozen=True)
class _Reset:
    """A reset policy as a callable object (deep-copied with the optimizer, unlike a closure).

    ``edit(tensors, prune_ratio, shape)`` changes a parameter's non-scalar state tensors in place
    (``shape``: the parameter's); ``None`` drops the state (the full reset).
    """

    edit: Callable[[list[Tensor], float, torch.Size], None] | None
    prune_ratio: float
    fresh: FreshState | None

    def __call__(
        self,
        state: MutableMapping[Any, dict[str, Any]],
        params: Sequence[Tensor],
        resized: Collection[Tensor] = (),
    ) -> None:
        new_shapes = {id(p) for p in resized}
        for p in params:
            entry = state.get(p)
            if entry is None:
                continue
            shaped = _shaped(entry)
            if self.edit is None or id(p) in new_shapes:
                del state[p]
                if self.fresh is not None:
                    self.fresh.restore(state, p)
            elif shaped:
                self.edit(shaped, self.prune_ratio, p.shape)


def _keep(tensors: list[Tensor], ratio: float, shape: torch.Size) -> None:
    """``reset="none"``: nothing changes."""


@torch.no_grad()
def _zero_(tensors: list[Tensor], ratio: float, shape: torch.Size) -> None:
    """``reset="moments"``: every moment is zeroed; counters stay."""
    for t in tensors:
        t.zero_()


_EDITS: dict[str, Callable[[list[Tensor], float, torch.Size], None] | None] = {
    "full": None,
    "none": _keep,
    "prune": _prune_,
    "moments": _zero_,
}


def resolve_reset(
    policy: ResetPolicy, prune_ratio: float = 0.9, fresh: FreshState | None = None
) -> StateReset:
    """The function a knot calls for ``policy``.

    Args:
        policy: ``"full"``, ``"none"``, ``"prune"`` or ``"moments"``.
        prune_ratio: fraction of entries zeroed by ``"prune"``.
        fresh: construction-time state that ``"full"`` restores.

    Raises:
        ValueError: an unknown policy.
    """
    if policy not in _EDITS:
        raise ValueError(f"reset must be one of {sorted(_EDITS)}, got {policy!r}")
    return _Reset(_EDITS[policy], prune_ratio, fresh)
