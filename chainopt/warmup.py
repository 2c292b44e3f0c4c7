"""LR re-warmup after each knot (ReLoRA's "jagged" schedule), around any torch scheduler.

:class:`KnotWarmup` multiplies the learning rates the wrapped scheduler sets by
``min(1, (steps since the last knot + 1) / warmup_steps)``. The wrapped scheduler keeps its own
arithmetic: before each of its steps the unscaled rates are put back, so chainable schedulers
(``ExponentialLR``, ``ReduceLROnPlateau``-style state) never see the warm-up factor.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer, KnotWarmup
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=1.0),
    ...                          target_modules=["0"], rank=2, knot_every=4)
    >>> sched = KnotWarmup(torch.optim.lr_scheduler.ConstantLR(opt, 1.0), opt, warmup_steps=2)
    >>> lrs = []
    >>> for _ in range(6):
    ...     model(torch.ones(1, 4)).sum().backward()
    ...     opt.step(); sched.step(); opt.zero_grad(); lrs.append(opt.param_groups[0]["lr"])
    >>> lrs  # the knot after step 4 restarts the warm-up
    [1.0, 1.0, 1.0, 0.5, 1.0, 1.0]
"""

from __future__ import annotations

from typing import Any, Protocol

from torch.optim import Optimizer

from .optimizer import ChainLoRAOptimizer

__all__ = ["KnotWarmup"]


class _Scheduler(Protocol):
    def step(self, *args: Any, **kwargs: Any) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class KnotWarmup:
    """Re-warm the learning rate linearly over ``warmup_steps`` after every knot.

    Call :meth:`step` where you called the wrapped scheduler's ``step`` (once per optimizer step,
    after ``opt.step()``), with the same arguments (``ReduceLROnPlateau``'s metric).

    Args:
        scheduler: any torch LR scheduler over ``optimizer`` (or an object with ``step``,
            ``state_dict`` and ``load_state_dict``), ``ReduceLROnPlateau`` included: it reduces
            the unscaled rates.
        optimizer: the :class:`ChainLoRAOptimizer` whose knots restart the warm-up.
        warmup_steps: steps to reach the full rate after a knot (``1`` is no warm-up).

    Raises:
        TypeError: ``optimizer`` is not a ChainLoRAOptimizer, or ``scheduler`` has no ``step``,
            ``state_dict`` or ``load_state_dict``.
        ValueError: ``warmup_steps`` is not a positive int.

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
        self.scheduler = scheduler
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self._unscaled = [g["lr"] for g in optimizer.param_groups]

    def factor(self) -> float:
        """The current multiplier: ``min(1, (steps since the last knot + 1) / warmup_steps)``."""
        if self.optimizer.knots_tied == 0:
            return 1.0
        since = self.optimizer.optimizer_steps - self.optimizer.history.knots[-1].step
        return min(1.0, (since + 1) / self.warmup_steps)

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Step the wrapped scheduler on unscaled rates, then apply the warm-up factor.

        ``args`` and ``kwargs`` go to the wrapped scheduler's ``step`` (``ReduceLROnPlateau``'s
        ``metrics``). If it raises (a metric missing), the rates are left as they were.
        """
        groups = self.optimizer.param_groups
        scaled = [g["lr"] for g in groups]
        # a group added since (add_param_group) starts at its own rate, unscaled
        self._unscaled += scaled[len(self._unscaled) :]
        for group, lr in zip(groups, self._unscaled, strict=True):
            group["lr"] = lr
        try:
            self.scheduler.step(*args, **kwargs)
        except BaseException:
            for group, lr in zip(groups, scaled, strict=True):
                group["lr"] = lr
            raise
        self._unscaled = [g["lr"] for g in groups]
        f = self.factor()
        for group in groups:
            group["lr"] = group["lr"] * f

    def get_last_lr(self) -> list[float]:
        """The rates in effect (warm-up applied)."""
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """The wrapped scheduler's state and the unscaled rates."""
        return {"scheduler": self.scheduler.state_dict(), "unscaled": list(self._unscaled)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved."""
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self._unscaled = list(state_dict["unscaled"])
