"""How a new link's A is chosen.

- ``"kaiming"`` (default): Kaiming-uniform as ``nn.Linear`` (bound ``1/√in``), from the
  optimizer's seeded generator.
- ``"gradient"``: data-aware, in the spirit of LoRA-GA/PiSSA: A spans the top-r right singular
  vectors of the adapted weight's gradient ``G = Σ gradᵀ·x``, accumulated over the micro-batches
  of the optimizer step just before the knot (B stays zero, so the function is unchanged). Rows are
  scaled to Kaiming's expected row norm ``1/√3``. Cost: during that one step, one float32
  ``(out, in)`` accumulator per adapted module and its ``gradᵀ·x`` product per micro-batch (what
  full fine-tuning pays for the weight gradient), then one SVD per module per knot. Under
  ``torch.distributed`` the gradients are averaged over ranks first, so every rank draws the same A.

Example:
    >>> import torch
    >>> g = torch.zeros(6, 5); g[0, 1] = 3.0; g[2, 3] = 1.0
    >>> a = a_from_gradient(g, rank=1)
    >>> a.abs().argmax().item(), round(a.norm().item(), 4)
    (1, 0.5774)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, TypeAlias

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["GradientProbe", "InitPolicy", "a_from_gradient"]

InitPolicy: TypeAlias = Literal["kaiming", "gradient"]


def a_from_gradient(gradient: Tensor, rank: int) -> Tensor:
    """``(rank, in)``: the top right singular vectors of ``gradient``, rows of norm ``1/√3``."""
    _u, _s, vh = torch.linalg.svd(gradient.float(), full_matrices=False)
    a = vh[:rank]
    if a.shape[0] < rank:  # fewer singular vectors than the rank: pad with zeros
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
    scaled: Tensor = a / math.sqrt(3.0)
    return scaled


class GradientProbe:
    """Accumulates ``G = Σ gradᵀ·x`` of the adapted modules while :attr:`armed`.

    Args:
        modules: ``(name, nn.Linear)`` pairs to watch.
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        self.armed = False
        self.gradients: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._hook(name)) for name, module in modules
        ]

    def _hook(self, name: str) -> Any:
        def forward_hook(_module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if not (self.armed and torch.is_grad_enabled() and output.requires_grad):
                return
            x = args[0].detach()

            def grad_hook(grad: Tensor) -> None:
                # (..., out)ᵀ @ (..., in) -> (out, in), accumulated in float32
                g = grad.reshape(-1, grad.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                if name in self.gradients:
                    self.gradients[name].add_(g)
                else:
                    self.gradients[name] = g

            output.register_hook(grad_hook)  # type: ignore[no-untyped-call]

        return forward_hook

    def take(self) -> dict[str, Tensor]:
        """Return and forget the accumulated gradients (averaged over ranks if distributed)."""
        gradients, self.gradients = self.gradients, {}
        self.armed = False
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for g in gradients.values():
                dist.all_reduce(g)
                g.div_(dist.get_world_size())
        return gradients

    def remove(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []
