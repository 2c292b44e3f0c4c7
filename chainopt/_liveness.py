"""Refusing a chain that trains nothing: frozen factors, or factors that get no gradient.

A chain can look healthy while nothing trains: a loss is logged, knots are counted, and the
saved model equals the base. That happens when something froze the chain's factors after it was
built (PEFT's ``get_peft_model`` freezes every parameter that is not its own adapter's: TRL's
``SFTTrainer(peft_config=...)`` or ``--use_peft`` over a chained model does exactly that), or
when the loss is computed through another model than the chained one (a copy, a wrapper built
later). :class:`TrainingWatch` looks once per link, on the optimizer steps until a factor has a
gradient (nothing after that, until the next knot), and raises before a knot would merge
nothing.

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

from collections.abc import Callable, Sequence

from torch import Tensor

__all__ = ["TrainingWatch"]

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
