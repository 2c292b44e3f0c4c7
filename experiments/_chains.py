"""The methods an experiment compares, as chains: ``NAME:LINKS:R1,R2,...[:KEY=VALUE,...]``.

A :class:`ChainSpec` names one method (``lora:1:8`` is plain LoRA, ``cola3:3:8`` three links of
rank 8, ``cola3_down:3:8,4,2`` a rank step-down); :func:`build_chain` turns it into a
:class:`chainopt.ChainLoRAOptimizer` (knots evenly spaced over the run, the library's own
``rank=[...]`` for a step-down, ``keep_history=True`` so ``chain_summary()`` reports the effective
rank) and a torch LR scheduler (linear decay to 0).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> (spec,) = parse_specs(["cola3_down:3:4,2"])
    >>> opt, sched = build_chain(model, spec, ["0"], total_steps=9, lr=1e-2, alpha=8.0)
    >>> for _ in range(9):
    ...     model(torch.randn(4, 8)).pow(2).mean().backward()
    ...     opt.step()
    ...     sched.step()
    ...     opt.zero_grad()
    >>> summary = opt.chain_summary()
    >>> summary.links, summary.ranks, summary.knot_steps
    (3, (4, 2, 2), (3, 6))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LinearLR

from chainopt import ChainLoRAOptimizer

__all__ = ["ChainSpec", "build_chain", "parse_specs"]


@dataclass(frozen=True)
class ChainSpec:
    """One method of a comparison.

    Attributes:
        name: label in tables and plots (``"lora"``, ``"cola3"``, ``"cola3_down"``).
        ranks: rank per link; the last one repeats (``(8, 4)`` with 3 links is 8, 4, 4).
        links: number of links (1 is plain LoRA); knots are evenly spaced over the run.
        options: extra ``ChainLoRAOptimizer`` keyword arguments as ``(key, value)`` pairs, e.g.
            ``(("reset", "none"),)`` or ``(("init", "gradient"),)``.
    """

    name: str
    ranks: tuple[int, ...]
    links: int
    options: tuple[tuple[str, Any], ...] = ()

    def rank_of(self, link: int) -> int:
        """Rank of link ``link`` (0-based)."""
        return self.ranks[min(link, len(self.ranks) - 1)]


def _option_value(text: str) -> Any:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text


def parse_specs(texts: Sequence[str]) -> list[ChainSpec]:
    """Parse ``NAME:LINKS:R1,R2,...[:KEY=VALUE,...]`` strings.

    Examples: ``cola3_down:3:8,4,2`` (rank step-down), ``cola3_grad:3:4:init=gradient``,
    ``cola3_prune:3:4:reset=prune,prune_ratio=0.9``.

    Args:
        texts: One string per method.

    Returns:
        One spec per string, in order.
    """
    specs = []
    for text in texts:
        name, links, ranks, *rest = text.split(":")
        options = tuple(
            (k, _option_value(v))
            for k, v in (kv.split("=") for kv in ",".join(rest).split(",") if kv)
        )
        specs.append(ChainSpec(name, tuple(int(r) for r in ranks.split(",")), int(links), options))
    return specs


def build_chain(
    model: nn.Module,
    spec: ChainSpec,
    targets: Sequence[str],
    *,
    total_steps: int,
    lr: float,
    alpha: float = 16.0,
    seed: int = 0,
) -> tuple[ChainLoRAOptimizer, LinearLR]:
    """The chain of ``spec`` on ``model`` over AdamW, and a linear LR decay to 0.

    Args:
        model: the model (its adapted modules become plain ``nn.Linear`` after
            ``opt.merge_and_unload()``).
        spec: ranks, number of links and options.
        targets: PEFT-style suffixes of the modules to adapt.
        total_steps: optimizer steps of the whole run; ``spec.links - 1`` knots split it evenly.
        lr: peak learning rate of AdamW (weight decay 0).
        alpha: LoRA alpha (``s = alpha / r`` per link).
        seed: seed of the factors' generator.

    Returns:
        ``(opt, sched)``: call ``opt.step()``, ``sched.step()``, ``opt.zero_grad()`` each step.
    """
    opt = ChainLoRAOptimizer(
        model,
        lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
        target_modules=list(targets),
        rank=spec.ranks[0] if len(spec.ranks) == 1 else list(spec.ranks),
        alpha=alpha,
        num_links=spec.links,
        total_steps=total_steps,
        seed=seed,
        keep_history=True,  # chain_summary()'s effective rank needs the merged links
        **dict(spec.options),
    )
    return opt, LinearLR(opt, 1.0, 0.0, total_iters=total_steps)
