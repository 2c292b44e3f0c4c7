"""LR re-warmup after each knot (ReLoRA's "jagged" schedule), around any torch scheduler.

:class:`KnotWarmup` multiplies the learning rates the wrapped scheduler sets by
``min(1, (steps since the last knot + 1) / warmup_steps)``. The wrapped scheduler keeps its own
arithmetic: before each of its steps the unscaled rates are put back, so chainable schedulers
(``ExponentialLR``, ``ReduceLROnPlateau``-style state) never see the warm-up factor.

It is a :class:`torch.optim.lr_scheduler.LRScheduler`, so whatever takes a torch scheduler takes
it: Lightning's ``configure_optimizers`` (``"interval": "step"``), the HF ``Trainer``'s
``optimizers=(opt, sched)``, Accelerate's ``prepare`` (which then steps it on synchronised steps
only) and ``save_state``, ``ChainedScheduler``. Like torch's own ``ReduceLROnPlateau`` it does not
call ``LRScheduler.__init__``: that would step once at construction (stepping the wrapped
scheduler a second time) and wrap ``optimizer.step`` (the chain's); it sets the attributes that
``LRScheduler`` documents (``optimizer``, ``last_epoch``, ``base_lrs``, ``get_last_lr()``) and the
step counter Accelerate adds to on accumulation steps. Constructing it changes no rate.

Three rules follow from what it is:

- It must be stepped after every optimizer step (that is when it applies the factor): a
  :meth:`~KnotWarmup.step` that finds more than one optimizer step since its last one raises
  (Lightning's default ``"interval": "epoch"`` would skip the warm-up silently). The check
  starts again after :meth:`~KnotWarmup.load_state_dict`: a trainer may save it before its last
  step (Lightning steps plateau schedulers after a step's checkpoint).
- It goes outermost: ``KnotWarmup(SequentialLR([...]), opt, n)``. ``SequentialLR`` restarts the
  schedulers it holds at their milestones, which a warm-up tied to knots cannot follow, so a
  ``SequentialLR`` holding one (directly or inside a ``ChainedScheduler``) is refused when it is
  built. Inside a ``ChainedScheduler`` it composes with chainable schedulers (those that
  multiply the current rate: ``StepLR``, ``ExponentialLR``, ``LinearLR``, ...): a rate that
  another scheduler (or the user) changed since its last step is taken as the new warmed-up
  rate, and the warm-up factor is divided out of it before the wrapped scheduler steps. A
  scheduler that sets the rate outright (``LambdaLR``, which transformers'
  ``get_*_schedule_with_warmup`` return, ``OneCycleLR``, ``CyclicLR``,
  ``CosineAnnealingWarmRestarts``) goes inside it instead, ``KnotWarmup(LambdaLR(...), opt, n)``:
  beside it in a ``ChainedScheduler`` the warm-up either never shows (after it) or divides the
  new rate by the last step's factor (before it: the second step after a knot runs at 2x the
  schedule's rate where half was due, with ``warmup_steps=4``), which it cannot tell from a
  chainable change.
- Pickling it pickles the chain, which torch cannot: save its :meth:`~KnotWarmup.state_dict`
  (``torch.load(..., weights_only=True)`` reads it back), as the trainers do.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer, KnotWarmup
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0),
    ...                          target_modules=["0"], rank=2, knot_every=4)
    >>> sched = KnotWarmup(torch.optim.lr_scheduler.ConstantLR(opt, 1.0), opt, warmup_steps=2)
    >>> isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    True
    >>> lrs = []
    >>> for _ in range(6):
    ...     model(torch.ones(1, 4)).sum().backward()
    ...     opt.step(); sched.step(); opt.zero_grad(); lrs.append(opt.param_groups[0]["lr"])
    >>> lrs  # the knot after step 4 restarts the warm-up
    [1.0, 1.0, 1.0, 0.5, 1.0, 1.0]
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from numbers import Real
from typing import Any, NoReturn, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from .optimizer import ChainLoRAOptimizer

__all__ = ["KnotWarmup"]

_STATE_KEYS = ("scheduler", "unscaled", "applied", "factor", "last_epoch", "step_count")


class _Scheduler(Protocol):
    def step(self, *args: Any, **kwargs: Any) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def _same(a: Any, b: Any) -> bool:
    """Whether a group's rate is still the one this scheduler set (a float or a 0-d tensor)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    return bool(a == b)


def _copy(lrs: list[Any]) -> list[Any]:
    return [lr.clone() if isinstance(lr, Tensor) else lr for lr in lrs]


def _set_lr(group: dict[str, Any], lr: Any) -> None:
    """Set a group's rate as torch's schedulers do: a tensor rate is filled in place (a compiled
    or CUDA-graph-captured step reads that tensor), any other is assigned."""
    if not isinstance(group["lr"], Tensor):
        group["lr"] = lr
    elif isinstance(lr, Tensor):
        group["lr"].copy_(lr)  # not fill_(lr.item()): no host sync for a device rate
    else:
        group["lr"].fill_(lr)


def _is_rate(x: Any) -> bool:
    if isinstance(x, Tensor):
        return x.dim() == 0 and x.is_floating_point()
    return isinstance(x, Real) and not isinstance(x, bool)


class KnotWarmup(LRScheduler):
    """Re-warm the learning rate linearly over ``warmup_steps`` after every knot.

    Call :meth:`step` where you called the wrapped scheduler's ``step`` (once per optimizer step,
    after ``opt.step()``), with the same arguments (``ReduceLROnPlateau``'s metric). Hand it to a
    trainer as you would the wrapped scheduler: Lightning
    ``{"scheduler": sched, "interval": "step"}`` (with ``"monitor"`` and
    ``"reduce_on_plateau": True`` over ``ReduceLROnPlateau``), the HF ``Trainer``'s
    ``optimizers=(opt, sched)``, ``accelerator.prepare(model, opt, sched)``.

    Args:
        scheduler: any torch LR scheduler over ``optimizer`` (or an object with ``step``,
            ``state_dict`` and ``load_state_dict``), ``ReduceLROnPlateau`` included: it reduces
            the unscaled rates.
        optimizer: the :class:`ChainLoRAOptimizer` whose knots restart the warm-up.
        warmup_steps: steps to reach the full rate after a knot (``1`` is no warm-up).

    Raises:
        TypeError: ``optimizer`` is not a ChainLoRAOptimizer, or ``scheduler`` has no ``step``,
            ``state_dict`` or ``load_state_dict``.
        ValueError: ``warmup_steps`` is not a positive int, or ``scheduler`` schedules another
            optimizer's param groups.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0),
        ...                          target_modules=["0"], rank=2, knot_every=3)
        >>> sched = KnotWarmup(torch.optim.lr_scheduler.ConstantLR(opt, 1.0), opt, warmup_steps=4)
        >>> lrs = []
        >>> for _ in range(5):
        ...     model(torch.ones(1, 4)).sum().backward()
        ...     opt.step(); sched.step(); opt.zero_grad(); lrs.append(opt.param_groups[0]["lr"])
        >>> lrs  # the knot after step 3 restarts the warm-up over 4 steps
        [1.0, 1.0, 0.25, 0.5, 0.75]
        >>> sched.get_last_lr(), sched.last_epoch
        ([0.75], 5)
    """

    def __init__(
        self, scheduler: _Scheduler, optimizer: ChainLoRAOptimizer, warmup_steps: int
    ) -> None:
        if not isinstance(optimizer, ChainLoRAOptimizer):
            raise TypeError(
                f"optimizer must be a ChainLoRAOptimizer, got {type(optimizer).__name__}"
            )
        needed = ("step", "state_dict", "load_state_dict")
        missing = [m for m in needed if not callable(getattr(scheduler, m, None))]
        if missing or isinstance(scheduler, Optimizer):
            what = "an optimizer" if isinstance(scheduler, Optimizer) else f"without {missing}"
            raise TypeError(
                "scheduler must be an LR scheduler (step, state_dict, load_state_dict), got "
                f"{type(scheduler).__name__} ({what})"
            )
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be a positive int, got {warmup_steps!r}")
        over = getattr(scheduler, "optimizer", None)
        theirs = getattr(over, "param_groups", None)
        if isinstance(theirs, list) and {id(g) for g in theirs} != {
            id(g) for g in optimizer.param_groups
        }:  # its own optimizer's rates would be scheduled, the chain's never (silently)
            raise ValueError(
                f"scheduler must schedule optimizer's rates, but {type(scheduler).__name__} is "
                f"over another optimizer ({type(over).__name__} with other param groups): "
                "build it over the chain (or the optimizer the chain wraps)"
            )
        # LRScheduler.__init__ is deliberately not called (see the module docstring).
        self.scheduler = scheduler
        self.optimizer = optimizer
        self._chain = optimizer  # typed as the chain (LRScheduler types .optimizer as Optimizer)
        self.warmup_steps = warmup_steps
        rates = [g["lr"] for g in optimizer.param_groups]
        self._unscaled = _copy(rates)
        self._applied: list[Any] | None = _copy(rates)  # the rates as this scheduler left them
        self._factor = 1.0  # the factor in them
        self._seen: int | None = None  # optimizer steps at the last step()
        self.base_lrs = _copy(list(getattr(scheduler, "base_lrs", rates)))  # the schedule's
        self.last_epoch = 0
        self._step_count = 1  # as a torch scheduler after its initial step; Accelerate adds to it

    @property
    def _schedulers(self) -> NoReturn:
        # SequentialLR.__init__ reads `_schedulers` of what it holds (recursive_undo) before it
        # restarts the first one: the one point where it can be refused as it is built.
        raise TypeError(
            "KnotWarmup cannot go inside a SequentialLR (which restarts its schedulers at "
            "milestones): put it outermost, KnotWarmup(SequentialLR(opt, [...], milestones), "
            "opt, warmup_steps)"
        )

    def factor(self) -> float:
        """The current multiplier: ``min(1, (steps since the last knot + 1) / warmup_steps)``."""
        if self._chain.knots_tied == 0:
            return 1.0
        since = self._chain.optimizer_steps - self._chain.history.knots[-1].step
        return min(1.0, (since + 1) / self.warmup_steps)

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Step the wrapped scheduler on unscaled rates, then apply the warm-up factor.

        ``args`` and ``kwargs`` go to the wrapped scheduler's ``step`` (``ReduceLROnPlateau``'s
        ``metrics``). If it raises (a metric missing), the rates are left as they were.

        Raises:
            TypeError: the wrapped scheduler is a ``ReduceLROnPlateau`` and no metric was given.
            RuntimeError: more than one optimizer step since the last call: the warm-up is
                applied here, so step it after every optimizer step (Lightning:
                ``"interval": "step"``). Nothing is changed.
        """
        if isinstance(self.scheduler, ReduceLROnPlateau) and not args and "metrics" not in kwargs:
            raise TypeError(
                "KnotWarmup over ReduceLROnPlateau needs the metrics each step: "
                'sched.step(metric). In Lightning\'s lr_scheduler dict give "monitor" and '
                '"reduce_on_plateau": True (with "interval": "step"); the HF Trainer steps '
                "its scheduler without metrics and cannot drive one. Nothing was changed"
            )
        steps = self._chain.optimizer_steps
        if self._seen is not None and steps - self._seen > 1:
            raise RuntimeError(
                f"KnotWarmup.step() must follow every optimizer step (it applies the warm-up "
                f"after knots), but {steps - self._seen} optimizer steps passed since its last "
                'step; step it once per opt.step() (Lightning: "interval": "step" in the '
                "lr_scheduler dict). Nothing was changed"
            )
        groups = self.optimizer.param_groups
        scaled = _copy([g["lr"] for g in groups])  # copies: a tensor rate is set in place
        unscaled = []
        for i, lr in enumerate(scaled):
            if i >= len(self._unscaled):  # a group added since (add_param_group): its own rate
                unscaled.append(lr)
            elif self._applied is None or _same(lr, self._applied[i]):
                unscaled.append(self._unscaled[i])
            else:  # changed since by another scheduler (ChainedScheduler) or by hand
                unscaled.append(lr / self._factor)
        for group, lr in zip(groups, unscaled, strict=True):
            _set_lr(group, lr)
        try:
            self.scheduler.step(*args, **kwargs)
        except BaseException:
            for group, lr in zip(groups, scaled, strict=True):
                _set_lr(group, lr)
            raise
        self._unscaled = _copy([g["lr"] for g in groups])
        f = self.factor()
        for group in groups:
            _set_lr(group, group["lr"] * f)
        rates = [g["lr"] for g in groups]
        self._applied, self._factor, self._seen = _copy(rates), f, steps
        self.last_epoch += 1
        self._step_count += 1

    def get_last_lr(self) -> list[float | Tensor]:
        """The rates in effect after the last :meth:`step` (warm-up applied)."""
        # as this scheduler left them (an old state without them: the unscaled rates)
        return _copy(self._applied if self._applied is not None else self._unscaled)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped scheduler's state, the unscaled rates and the warm-up's own counters."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "unscaled": _copy(self._unscaled),
            "applied": None if self._applied is None else _copy(self._applied),
            "factor": self._factor,
            "last_epoch": self.last_epoch,
            "step_count": self._step_count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved (or an older chainopt's ``scheduler``/``unscaled``).

        All or nothing: the state is checked first, and if the wrapped scheduler's own
        ``load_state_dict`` raises, its state is put back.

        Raises:
            TypeError: ``state_dict`` or one of its entries has the wrong type.
            ValueError: an unknown key, a missing ``scheduler``/``unscaled``, more rates than
                the optimizer has param groups, or a factor outside ``(0, 1]``.
        """
        state = self._checked(state_dict)
        before = copy.deepcopy(self.scheduler.state_dict())
        try:
            self.scheduler.load_state_dict(state["scheduler"])
        except BaseException:
            self.scheduler.load_state_dict(before)
            raise
        self._unscaled = _copy(state["unscaled"])
        applied = state.get("applied")
        self._applied = None if applied is None else _copy(applied)
        self._factor = float(state.get("factor", 1.0))
        # the check that it follows every optimizer step starts again: a trainer may save it
        # before its last step (Lightning's plateau schedulers step after checkpoints)
        self._seen = None
        self.last_epoch = state.get("last_epoch", self.last_epoch)
        self._step_count = state.get("step_count", self._step_count)

    def _checked(self, state: Any) -> Mapping[str, Any]:
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state).__name__}")
        unknown = sorted(set(state) - set(_STATE_KEYS), key=str)
        missing = [k for k in ("scheduler", "unscaled") if k not in state]
        if unknown or missing:
            raise ValueError(
                f"state_dict is not a KnotWarmup state: keys {sorted(state, key=str)} "
                f"(unknown {unknown}, missing {missing}; expected {list(_STATE_KEYS)})"
            )
        if not isinstance(state["scheduler"], Mapping):
            raise TypeError(
                "state_dict['scheduler'] must be the wrapped scheduler's state dict, got "
                f"{type(state['scheduler']).__name__}"
            )
        groups = len(self.optimizer.param_groups)
        for key in ("unscaled", "applied"):
            rates = state.get(key)
            if key == "applied" and rates is None:
                continue
            if not isinstance(rates, list) or not all(_is_rate(r) for r in rates):
                raise TypeError(f"state_dict[{key!r}] must be a list of rates, got {rates!r}")
            if len(rates) > groups or len(rates) != len(state["unscaled"]):
                raise ValueError(
                    f"state_dict[{key!r}] holds {len(rates)} rates, but the optimizer has "
                    f"{groups} param groups and state_dict['unscaled'] {len(state['unscaled'])}"
                )
        factor = state.get("factor", 1.0)
        if not _is_rate(factor) or not 0.0 < float(factor) <= 1.0:
            raise ValueError(f"state_dict['factor'] must be in (0, 1], got {factor!r}")
        for key in ("last_epoch", "step_count"):
            value = state.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"state_dict[{key!r}] must be an int, got {value!r}")
        return state
