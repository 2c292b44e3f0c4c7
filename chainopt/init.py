"""How a new link's A is chosen.

- ``"kaiming"`` (default): Kaiming-uniform as ``nn.Linear`` (bound ``1/√in``), from the
  optimizer's seeded generator.
- ``"gradient"``: data-aware, in the spirit of LoRA-GA/PiSSA: A spans the top-r right singular
  vectors of the adapted weight's gradient ``G = Σ gradᵀ·x``, accumulated over the micro-batches
  of the optimizer step just before the knot (B stays zero, so the function is unchanged). Rows are
  scaled to Kaiming's expected row norm ``1/√3``. Cost: during that one step, one float32
  ``(out, in)`` accumulator per adapted module and its ``gradᵀ·x`` product per micro-batch (what
  full fine-tuning pays for the weight gradient), then per module per knot the top singular vectors
  of ``G`` by a seeded randomized SVD (exact when ``G`` has rank ≤ r + 8; a full SVD for small
  matrices; see :func:`chainopt._lowrank.top_right_singular_vectors`). Under
  ``torch.distributed`` the gradients are averaged over ranks first, so every rank draws the same A.

:func:`resolve_init` turns a policy into a :class:`LinkInit` the optimizer keeps.

Example:
    >>> import torch
    >>> g = torch.zeros(6, 5); g[0, 1] = 3.0; g[2, 3] = 1.0
    >>> a = a_from_gradient(g, rank=1)
    >>> a.abs().argmax().item(), round(a.norm().item(), 4)
    (1, 0.5774)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal, TypeAlias

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._lowrank import top_right_singular_vectors
from ._validate import is_distributed
from .advice import ChainLoRAWarning

__all__ = [
    "InitPolicy",
    "a_from_gradient",
]  # the public names (chainopt re-exports them); the rest is internal

InitPolicy: TypeAlias = Literal["kaiming", "gradient"]
"""How a new link's A is chosen (see :mod:`chainopt.init`)."""


def a_from_gradient(gradient: Tensor, rank: int) -> Tensor:
    """The A that ``init="gradient"`` gives a new link for a summed weight gradient.

    The top ``rank`` right singular vectors of ``gradient`` (a seeded randomized SVD, see
    :func:`chainopt._lowrank.top_right_singular_vectors`), rows scaled to Kaiming's expected row
    norm ``1/√3``; zero rows where ``gradient`` has fewer singular vectors than ``rank``.

    Args:
        gradient: ``(out, in)``, the weight's gradient summed over the step before a knot.
        rank: the new link's rank.

    Returns:
        ``(rank, in)`` float32.

    Example:
        >>> import torch
        >>> a = a_from_gradient(torch.eye(4, 6), rank=2)
        >>> tuple(a.shape), [round(n, 4) for n in a.norm(dim=1).tolist()]
        ((2, 6), [0.5774, 0.5774])

    Raises:
        TypeError: ``gradient`` is not a floating 2-D tensor.
        ValueError: ``rank`` is not a positive int, or ``gradient`` holds NaN/Inf.
    """
    if not isinstance(gradient, Tensor) or gradient.dim() != 2:
        got = tuple(gradient.shape) if isinstance(gradient, Tensor) else type(gradient).__name__
        raise TypeError(f"gradient must be a 2-D (out, in) tensor, got {got}")
    if not gradient.is_floating_point():
        raise TypeError(f"gradient must be a floating tensor, got {gradient.dtype}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if not bool(torch.isfinite(gradient).all()):
        raise ValueError("gradient holds NaN or Inf: it has no singular vectors to take")
    a = top_right_singular_vectors(gradient.float(), rank)
    if a.shape[0] < rank:  # fewer singular vectors than the rank: pad with zeros
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
    scaled: Tensor = a / math.sqrt(3.0)
    return scaled


class LinkInit:
    """``init="kaiming"``: the generator draws every new A Kaiming-uniform; nothing to watch."""

    def arm(self, armed: bool) -> None:
        """Whether the coming optimizer step is the one just before a knot."""

    def initial_a(self, names: Sequence[str], rank: int) -> list[Tensor | None]:
        """Per module, the new link's A, or ``None`` to draw it Kaiming-uniform."""
        return [None] * len(names)

    def remove(self) -> None:
        """Stop watching the modules."""


class GradientInit(LinkInit):
    """``init="gradient"``: accumulates ``G = Σ gradᵀ·x`` of the adapted modules while armed.

    Args:
        modules: ``(name, module)`` pairs to watch.
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        self.armed = False
        self.gradients: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(_Watch(self, name)) for name, module in modules
        ]

    def arm(self, armed: bool) -> None:
        self.armed = armed

    def take(self) -> dict[str, Tensor]:
        """Return and forget the accumulated gradients (averaged over ranks if distributed)."""
        gradients, self.gradients = self.gradients, {}
        self.armed = False
        if is_distributed():
            for g in gradients.values():
                dist.all_reduce(g)
                g.div_(dist.get_world_size())
        return gradients

    def initial_a(self, names: Sequence[str], rank: int) -> list[Tensor | None]:
        gradients = self.take()  # a manual knot with no gradient falls back to Kaiming
        # An overflowed step (a GradScaler skip) leaves Inf/NaN in the sum: no singular vectors
        # to take. Every rank sees the same averaged sum, so every rank falls back alike.
        bad = [n for n in names if n in gradients and not bool(gradients[n].isfinite().all())]
        if bad:
            warnings.warn(
                f'init="gradient": the gradient of {bad} summed over the step before the knot is '
                "not finite (an overflowed step?); their new A is drawn Kaiming-uniform",
                ChainLoRAWarning,
                stacklevel=4,
            )
        return [
            a_from_gradient(gradients[n], rank) if n in gradients and n not in bad else None
            for n in names
        ]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _Watch:
    """The forward hook on one module: on an armed step, adds ``gradᵀ·x`` to the probe's sum.

    An object rather than a closure, so that a ``copy.deepcopy`` of the model and optimizer
    gets hooks that feed the copied probe.
    """

    def __init__(self, probe: GradientInit, name: str) -> None:
        self.probe, self.name = probe, name

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        if not (self.probe.armed and torch.is_grad_enabled() and output.requires_grad):
            return
        output.register_hook(_Accumulate(self.probe, self.name, args[0].detach()))  # type: ignore[no-untyped-call]


class _Accumulate:
    """The gradient hook on one module's output: ``G += gradᵀ·x`` in float32."""

    def __init__(self, probe: GradientInit, name: str, x: Tensor) -> None:
        self.probe, self.name, self.x = probe, name, x

    def __call__(self, grad: Tensor) -> None:
        x = self.x
        # (..., out)ᵀ @ (..., in) -> (out, in), accumulated in float32
        g = grad.reshape(-1, grad.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
        gradients = self.probe.gradients
        if self.name in gradients:
            gradients[self.name].add_(g)
        else:
            gradients[self.name] = g


def resolve_init(policy: InitPolicy, modules: Sequence[tuple[str, nn.Module]]) -> LinkInit:
    """The :class:`LinkInit` for ``policy`` over ``modules``.

    Raises:
        ValueError: an unknown policy.
    """
    if policy == "kaiming":
        return LinkInit()
    if policy == "gradient":
        return GradientInit(modules)
    raise ValueError(f"init must be one of ('kaiming', 'gradient'), got {policy!r}")
