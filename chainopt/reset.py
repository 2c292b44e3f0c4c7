"""What happens to the factors' optimizer state at a knot.

- ``"full"`` (default, the COLA paper's "new optimizer state"): the state is dropped, so the next
  link starts from the optimizer's initial state (AdamW at its step 1).
- ``"none"``: the state is kept as it is.
- ``"prune"``: ReLoRA-style magnitude pruning: the ``prune_ratio`` fraction of entries with the
  smallest first moment (Adam's ``exp_avg``, SGD's ``momentum_buffer``: the first state tensor
  shaped like the parameter) is restarted in *every* state tensor shaped like the parameter, with
  one mask; counters such as Adam's ``step`` are kept. One shared mask matters: pruning Adam's
  second moment where the first survives divides by ``√0 + ε`` and diverges. State of another
  shape (Adafactor's factored row and column variances, torch's or transformers') has no
  entry-wise mask and is kept.
- ``"moments"``: every state tensor that is not a scalar (the moments, Adafactor's factored
  variances among them) is restarted, scalar counters (``step``) are kept: optimizers whose early
  steps are special (RAdam's rectification warm-up, a bias correction) do not start over.

To restart is to set where the optimizer itself starts that state (:class:`InitialState`):
zero for the moments of Adam, SGD, RMSprop, Adafactor, but Rprop's step sizes go back to ``lr``
(zero would freeze the factor for good) and Adagrad's sums to ``initial_accumulator_value``.
State that is not the parameter's own (LBFGS keeps one flat history for all its parameters)
is dropped by ``"prune"`` and ``"moments"``; a quantized state (bitsandbytes' 8-bit codes and
block maxima) is restarted by ``"moments"`` (counters kept) and dropped by ``"prune"``, whose
magnitudes it does not hold. A quantized tensor subclass shaped like the parameter (torchao's
``AdamW8bit``/``AdamW4bit``/``AdamWFp8`` states; under FSDP2 a ``DTensor`` of such shards, read
shard by shard) is read through its own ``dequantize()`` and written back through ``copy_``
(which quantizes it again): ``"moments"`` restarts it exactly where the optimizer starts it;
``"prune"`` masks its dequantized values, so the entries it keeps move by at most that
optimizer's own quantization step and those it restarts hold the smallest value their block can
(zero, but 1/16 of the block's largest for ``AdamW4bit``'s second moment, whose map has no
zero).

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

from collections.abc import Callable, Collection, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._dtensor import is_sharded, on_shards
from ._scratch import initial_state

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


Start: TypeAlias = Callable[[Tensor, dict[Any, Any]], Mapping[str, Any] | None]
"""``start(p, seen)``: the state the optimizer starts ``p``'s state at (:class:`InitialState`),
or ``None`` where it cannot tell (then moments restart at zero); ``seen`` caches within a knot."""


class InitialState:
    """Where ``optimizer`` starts a parameter's state: a scratch copy of it (the parameter's
    group's current hyperparameters) stepped once with a zero gradient on a zero parameter of that
    shape (:func:`chainopt._scratch.initial_state`). Zero for Adam's moments, ``lr`` for Rprop's
    step sizes, ``initial_accumulator_value`` for Adagrad's sums.

    Args:
        optimizer: the optimizer that holds the parameters (read at each call).
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer

    def __call__(self, p: Tensor, seen: dict[Any, Any]) -> Mapping[str, Any] | None:
        """``p``'s starting state; ``seen`` keeps those of one knot (one scratch step per
        group, shape and dtype)."""
        for i, group in enumerate(self.optimizer.param_groups):
            if any(q is p for q in group["params"]):
                key = (i, tuple(p.shape), p.dtype, p.device)
                if key not in seen:
                    seen[key] = initial_state(self.optimizer, i, p)
                return seen[key]  # type: ignore[no-any-return]
        return None


def _per_parameter(entry: dict[str, Any], shape: torch.Size) -> bool:
    """Whether ``entry`` holds only counters and moments of this parameter: tensors of its shape,
    or factored ones (torch's Adafactor's ``(rows, 1)`` and ``(1, cols)``, transformers'
    ``(rows,)`` and ``(cols,)``), or scalars. LBFGS' flat history over all its parameters is
    not."""
    # transformers' Adafactor keeps a matrix's factors without the dimension they reduce:
    # rows shape[:-1], columns shape[:-2] + shape[-1:]
    reduced = {tuple(shape[:-1]), tuple(shape[:-2] + shape[-1:])} if len(shape) >= 2 else set()
    for value in entry.values():
        if isinstance(value, (list, tuple, dict)):
            return False
        if isinstance(value, Tensor) and value.dim() > 0:
            fits = value.dim() == len(shape) and all(
                v in (s, 1) for v, s in zip(value.shape, shape, strict=True)
            )
            if not fits and tuple(value.shape) not in reduced:
                return False
    return True


def _covered(entry: dict[str, Any], start: Mapping[str, Any] | None) -> bool:
    """Whether ``start`` (where the optimizer starts a parameter's state) has every non-scalar
    tensor of ``entry`` under the same key and shape, and ``entry`` holds nothing but tensors
    and numbers."""
    if start is None:
        return False
    for key, value in entry.items():
        if isinstance(value, (list, tuple, dict)):
            return False
        if isinstance(value, Tensor) and value.dim() > 0:
            begin = start.get(key)
            if not isinstance(begin, Tensor) or begin.shape != value.shape:
                return False
    return True


def _moments(entry: dict[str, Any]) -> list[tuple[str, Tensor]]:
    """The state tensors that are not scalars (the moments), with their keys."""
    return [(k, v) for k, v in entry.items() if isinstance(v, Tensor) and v.dim() > 0]


def _quantized(t: Tensor) -> bool:
    """Whether ``t`` is a quantized tensor subclass with its own ``dequantize()`` (torchao's
    low-bit optimizer states), which supports ``copy_`` but not the in-place fills and masks;
    or, under FSDP2, a ``DTensor`` whose shards are."""
    local = t.to_local() if is_sharded(t) else t  # type: ignore[attr-defined]
    return type(local).dequantize is not Tensor.dequantize


def _dense(t: Tensor) -> Tensor:
    """``t``'s values as a plain tensor (dequantized where ``t`` is quantized), laid out as ``t``
    (a ``DTensor`` of the dequantized shards for a sharded one)."""
    return on_shards(t, lambda part: part.dequantize()) if _quantized(t) else t


def _start_of(key: str, t: Tensor, start: Mapping[str, Any] | None) -> Tensor | None:
    """What the optimizer starts ``t`` (state ``key``) at, if it told: ``None`` is zero."""
    value = None if start is None else start.get(key)
    if isinstance(value, Tensor) and value.shape == t.shape:
        return value.to(device=t.device, dtype=t.dtype)
    return None


@torch.no_grad()
def _prune_(
    moments: list[tuple[str, Tensor]],
    ratio: float,
    shape: torch.Size,
    start: Mapping[str, Any] | None,
) -> None:
    """Restart, in every moment of ``shape``, the entries where the first one is among the
    smallest ``ratio`` (at zero, or where the optimizer starts that state); moments of other
    shapes are kept."""
    moments = [(k, t) for k, t in moments if t.shape == shape]
    if not moments:
        return
    k = int(ratio * moments[0][1].numel())
    if k <= 0:
        return
    magnitude = _dense(moments[0][1].detach()).abs().float()
    threshold = magnitude.flatten().kthvalue(k).values
    drop = magnitude <= threshold
    for key, t in moments:
        begin = _start_of(key, t, start)
        if _quantized(t):  # masked on its values, then quantized again by copy_
            value = _dense(t)
            t.copy_(torch.where(drop, 0 if begin is None else _dense(begin), value))
        elif begin is None:
            t.masked_fill_(drop, 0)
        else:
            t.copy_(torch.where(drop, begin, t))


@dataclass(frozen=True)
class _Reset:
    """A reset policy as a callable object (deep-copied with the optimizer, unlike a closure).

    ``edit(moments, prune_ratio, shape, start)`` changes a parameter's non-scalar state tensors in
    place (``shape``: the parameter's; ``start``: where the optimizer starts that state, or
    ``None``); ``None`` drops the state (the full reset).
    """

    edit: (
        Callable[[list[tuple[str, Tensor]], float, torch.Size, Mapping[str, Any] | None], None]
        | None
    )
    prune_ratio: float
    fresh: FreshState | None
    start: Start | None = None

    def __call__(
        self,
        state: MutableMapping[Any, dict[str, Any]],
        params: Sequence[Tensor],
        resized: Collection[Tensor] = (),
    ) -> None:
        new_shapes = {id(p) for p in resized}
        seen: dict[Any, Any] = {}
        for p in params:
            entry = state.get(p)
            if entry is None or (self.edit is _keep and id(p) not in new_shapes):
                continue
            if self.edit is None or id(p) in new_shapes:
                self._drop(state, p)
                continue
            moments = _moments(entry)
            begin = self.start(p, seen) if moments and self.start is not None else None
            # a quantized state (bitsandbytes' 8-bit codes and block maxima) is not shaped like
            # the parameter, but "moments" can restart it where the optimizer starts it
            own = _per_parameter(entry, p.shape) or (
                self.edit is _restart_ and _covered(entry, begin)
            )
            if not own:
                self._drop(state, p)
            elif moments:
                self.edit(moments, self.prune_ratio, p.shape, begin)

    def _drop(self, state: MutableMapping[Any, dict[str, Any]], p: Tensor) -> None:
        del state[p]
        if self.fresh is not None:
            self.fresh.restore(state, p)


def _keep(
    moments: list[tuple[str, Tensor]],
    ratio: float,
    shape: torch.Size,
    start: Mapping[str, Any] | None,
) -> None:
    """``reset="none"``: nothing changes."""


@torch.no_grad()
def _restart_(
    moments: list[tuple[str, Tensor]],
    ratio: float,
    shape: torch.Size,
    start: Mapping[str, Any] | None,
) -> None:
    """``reset="moments"``: every moment restarts (at zero, or where the optimizer starts it);
    counters stay."""
    for key, t in moments:
        begin = _start_of(key, t, start)
        if begin is not None:
            t.copy_(begin)
        elif _quantized(t):  # no zero_ on a quantized subclass; copy_ quantizes the zeros
            t.copy_(torch.zeros_like(_dense(t)))
        else:
            t.zero_()


_EDITS: dict[
    str,
    Callable[[list[tuple[str, Tensor]], float, torch.Size, Mapping[str, Any] | None], None] | None,
] = {
    "full": None,
    "none": _keep,
    "prune": _prune_,
    "moments": _restart_,
}


def resolve_reset(
    policy: ResetPolicy,
    prune_ratio: float = 0.9,
    fresh: FreshState | None = None,
    start: Start | None = None,
) -> StateReset:
    """The function a knot calls for ``policy``.

    Args:
        policy: ``"full"``, ``"none"``, ``"prune"`` or ``"moments"``.
        prune_ratio: fraction of entries zeroed by ``"prune"``.
        fresh: construction-time state that ``"full"`` restores.
        start: where the optimizer starts a parameter's state (``"moments"`` and ``"prune"``
            restart there; zero without it).

    Raises:
        ValueError: an unknown policy.
    """
    if policy not in _EDITS:
        raise ValueError(f"reset must be one of {sorted(_EDITS)}, got {policy!r}")
    return _Reset(_EDITS[policy], prune_ratio, fresh, start)
