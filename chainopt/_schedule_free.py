"""Optimizers whose parameters hold a working iterate, not the one a user keeps: schedule-free.

Schedule-free optimizers (``schedulefree.AdamWScheduleFree``, ``SGDScheduleFree``,
``RAdamScheduleFree``) keep in their state a base iterate ``z``; in train mode the parameters
hold the interpolation ``y`` the gradient is taken at, in eval mode the average ``x`` that is
the model to evaluate and keep (``opt.eval()``/``opt.train()`` switch). A knot must merge ``x``,
so that the eval-mode model is unchanged by it, and restart the new link's iterates together.
:func:`resolve_iterates` recognises such an optimizer by that protocol (``train``/``eval``
methods and a ``train_mode`` flag in every param group) and gives the knot a context that:

1. switches the optimizer to eval mode (the parameters now hold ``x``),
2. lets the knot inspect, merge and restart ``x``,
3. sets every factor's ``z`` to its restarted value (where the reset policy kept ``z``), so the
   new link starts with ``x = y = z``, and switches back to train mode.

The averaging weights (a param group's ``weight_sum``, ``k``) are left as they are.

Example:
    >>> import torch
    >>> resolve_iterates(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)) is None
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["KnotContext", "ScheduleFreeIterates", "resolve_iterates"]


class _Chain(Protocol):
    def factors(self) -> list[Tensor]: ...


KnotContext = Callable[[Any], AbstractContextManager[None]]
"""``context(chain)``: entered around a whole knot (every step of it), exited even if it raises.

A context with a true ``steps_factors`` attribute declares that an engine steps the factors
through copies of its own (DeepSpeed's masters) and keeps them in step across the knot."""


class ScheduleFreeIterates:
    """The knot context for a schedule-free ``optimizer`` (see the module docstring).

    Args:
        optimizer: the wrapped optimizer.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer

    @contextmanager
    def __call__(self, chain: _Chain) -> Iterator[None]:
        opt: Any = self.optimizer
        training = any(g.get("train_mode") for g in opt.param_groups)
        if training:
            opt.eval()  # the parameters now hold x
        try:
            yield
        finally:
            with torch.no_grad():
                for p in chain.factors():
                    state = opt.state.get(p)
                    if state and isinstance(state.get("z"), Tensor):
                        state["z"] = p.detach().clone()  # z = x = the restarted link
            if training:
                opt.train()


def resolve_iterates(optimizer: Optimizer) -> KnotContext | None:
    """The knot context ``optimizer`` needs, or ``None`` for an optimizer of moments only."""
    schedule_free = (
        callable(getattr(optimizer, "train", None))
        and callable(getattr(optimizer, "eval", None))
        and bool(optimizer.param_groups)
        and all("train_mode" in g for g in optimizer.param_groups)
    )
    return ScheduleFreeIterates(optimizer) if schedule_free else None
