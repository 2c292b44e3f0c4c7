"""Refusing a chain that trains nothing: frozen factors, or factors that get no gradient.

A chain can look healthy while nothing trains: a loss is logged, knots are counted, and the
saved model equals the base. That happens when something froze the chain's factors after it was
built (PEFT's ``get_peft_model`` freezes every parameter that is not its own adapter's: TRL's
``SFTTrainer(peft_config=...)`` or ``--use_peft`` over a chained model does exactly that), or
when the loss is computed through another model than the chained one (a copy, a wrapper built
later). :class:`TrainingWatch` looks once per link, on the optimizer steps until a factor has a
gradient (nothing after that, until the next knot), and raises before a knot would merge
nothing.

A chain can also train while no knot is ever tied: when another optimizer steps its factors (a
``Trainer`` handed the chained model but not the chain builds an AdamW of its own over
``model.parameters()``; so does a Lightning ``configure_optimizers()`` that returns a plain
optimizer beside a chain built in ``__init__``). The model then trains as one LoRA link and
``save_pretrained`` writes it, silently. :func:`own_factor_steps` registers a chain so that a
step of any other optimizer over its factors raises before it changes anything (torch's global
optimizer step pre-hook).

Example:
    >>> import torch
    >>> from torch import nn
    >>> a, b = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.zeros(4, 2))
    >>> watch = TrainingWatch(lambda: [("fc", a, b)])
    >>> watch.before_knot(1)
    Traceback (most recent call last):
    ...
    RuntimeError: no factor of the chain received a gradient in link 1 ...
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

__all__ = ["TrainingWatch", "own_factor_steps"]

FactorSource = Callable[[], Sequence[tuple[str, Tensor, Tensor]]]
"""``(module name, A, B)`` of every link, live."""

_FIX = (
    "If PEFT is involved: do not pass peft_config (TRL's SFTTrainer, --use_peft) or call "
    "get_peft_model on a chained model; build the PeftModel first, chain it with "
    "ChainLoRAOptimizer(peft_model, optimizer, ...) and no target_modules, and hand that model "
    "and optimizer to the trainer (see docs/integrations.md, 'You already use PEFT')"
)


class TrainingWatch:
    """Checks that a chain's factors train; see the module docstring.

    Args:
        links: returns ``(name, A, B)`` of every link, live.
    """

    def __init__(self, links: FactorSource) -> None:
        self._links = links
        self._seen = False

    def on_step(self) -> None:
        """After an optimizer step: until a factor has had a gradient in this link, check that
        not every factor is frozen and whether one has a gradient now. (Freezing some on purpose,
        A for LoRA-FA say, is fine.)

        Raises:
            RuntimeError: no factor requires grad any more.
        """
        if self._seen:
            return
        links = self._links()
        if links and not any(a.requires_grad or b.requires_grad for _n, a, b in links):
            names = [n for n, _a, _b in links]
            raise RuntimeError(
                f"none of the chain's factors ({names[:3]}{' …' if len(names) > 3 else ''}) "
                "requires grad any more: something froze them after the chain was built (PEFT's "
                "get_peft_model does, e.g. through a trainer's peft_config), so nothing trains "
                f"and every knot would merge nothing. {_FIX}"
            )
        self._seen = any(a.grad is not None or b.grad is not None for _n, a, b in links)

    def before_knot(self, link: int) -> None:
        """Before a scheduled knot ending link ``link`` (1-based).

        Raises:
            RuntimeError: no factor had a gradient in this link and every B is zero (the knot
                would merge nothing); nothing was changed.
        """
        if self._seen:
            return
        links = self._links()
        if any(bool(b.detach().any()) for _n, _a, b in links):
            return  # set by hand, or trained by an engine that keeps its own gradients
        raise RuntimeError(
            f"no factor of the chain received a gradient in link {link} and every link is zero, "
            "so the knot due now would merge nothing: the loss was not computed through the "
            "chained model (a copy of it, or a wrapper built after the chain) or backward() was "
            f"not called before step(). Nothing was changed. {_FIX}"
        )

    def after_knot(self) -> None:
        """A new link starts: look again."""
        self._seen = False


class FactorOwner(Protocol):
    """What :func:`own_factor_steps` reads of a chain optimizer."""

    _stepping: bool  # inside its own step (the optimizer it wraps may step others inside it)
    _uncounted: bool  # the optimizer it wraps stepped outside its step, not counted since

    @property
    def optimizer(self) -> Optimizer: ...  # the optimizer it wraps

    def _named_factors(self) -> Sequence[tuple[str, Tensor]]: ...  # (module name, factor)


_OWNERS: weakref.WeakSet[Any] = weakref.WeakSet()
_HOOK: list[RemovableHandle] = []  # torch's global step pre-hook, installed with the first owner
_WRAPPER_DEPTH = 4  # Accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer, ...


def own_factor_steps(owner: FactorOwner) -> None:
    """From now on, refuse a step of any optimizer but ``owner`` over ``owner``'s factors.

    Allowed: ``owner``'s own step and whatever steps inside it (the optimizer it wraps, and
    what that one delegates to), and wrappers around ``owner`` (Accelerate's
    ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``). The optimizer ``owner`` wraps
    may also be stepped on its own by an engine that then calls ``owner.count_step()``; a second
    such step with no ``count_step()`` in between raises (nothing counts those steps: the
    wrapped optimizer was handed to the trainer in place of the chain).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, knot_every=2)
        >>> other = torch.optim.SGD(model.parameters(), lr=0.1)  # the factors, not the chain
        >>> other.step()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        RuntimeError: this SGD is not the chain's optimizer, and it was about to step 2 of ...
    """
    _OWNERS.add(owner)
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_refuse_foreign_step))


def _wraps(optimizer: object, target: object) -> bool:
    """Whether ``optimizer`` is ``target`` or a wrapper around it (Accelerate's keeps the
    optimizer it wraps as ``.optimizer``, Lightning's as ``._optimizer``)."""
    found = [optimizer]
    for _ in range(_WRAPPER_DEPTH):
        if any(o is target for o in found):
            return True
        found = [i for o in found for a in _INNER if (i := getattr(o, a, None)) is not None]
    return False


_INNER = ("optimizer", "_optimizer")


_FIX_FOREIGN = (
    "Nothing was changed. Step the ChainLoRAOptimizer itself: hand it to the trainer (Trainer "
    "and TRL: optimizers=(opt, None); Lightning: return it from configure_optimizers(); "
    "Accelerate: accelerator.prepare(model, opt))"
)


def _refuse_foreign_step(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    owners = [o for o in list(_OWNERS) if not (o._stepping or _wraps(optimizer, o))]
    groups = getattr(optimizer, "param_groups", None)
    if not owners or not isinstance(groups, list):
        return
    stepped = {id(p) for g in groups if isinstance(g, dict) for p in g.get("params", ())}
    for owner in owners:
        held = [name for name, p in owner._named_factors() if id(p) in stepped]
        if not held:
            continue
        kind = type(optimizer).__name__
        if not _wraps(optimizer, owner.optimizer):
            raise RuntimeError(
                f"this {kind} is not the chain's optimizer, and it was about to step "
                f"{len(held)} of the chain's factors (of {held[0]!r}, …): it ties no knot, so "
                f"the chain would train as one LoRA link, silently. {_FIX_FOREIGN}"
            )
        if owner._uncounted:
            raise RuntimeError(
                f"the {kind} the chain wraps was stepped again outside the chain's step() with "
                "no opt.count_step() since its last such step: nothing counts these steps, so "
                "no knot would ever be tied and the chain would train as one LoRA link, "
                f"silently (the wrapped optimizer was handed over in place of the chain?). "
                f"{_FIX_FOREIGN}; an engine that steps the wrapped optimizer itself calls "
                "opt.count_step() after each of its steps"
            )
        owner._uncounted = True
