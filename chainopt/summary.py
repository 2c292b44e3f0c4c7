"""A chain at a glance: links, ranks, knot steps, and per module its update norms and rank.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer
    >>> model = nn.Sequential(nn.Linear(6, 6))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=[2, 1], knot_every=1)
    >>> _ = opt.tie_knot()
    >>> s = opt.chain_summary()
    >>> s.links, s.ranks, s.knot_steps
    (2, (2, 1), (0,))
    >>> s.to_dict()["modules"]["0"]["effective_rank"] is None  # keep_history=False
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from ._dtensor import full_tensor
from .history import LinkFactors
from .knot import Chain

__all__ = [
    "ChainSummary",
    "ModuleSummary",
]  # the public names (chainopt re-exports them); the rest is internal


@dataclass(frozen=True)
class ModuleSummary:
    """One adapted module's part of the chain.

    Attributes:
        update_norms: ``‖s·B·A‖_F`` merged at each knot (``None`` where the link was dropped).
        effective_rank: rank of ``Σ sᵢ·Bᵢ·Aᵢ`` over the merged links and the pending one
            (``None`` without ``keep_history``, and for fused experts: one rank per expert).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 8))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, knot_every=1,
        ...                          keep_history=True)
        >>> with torch.no_grad():
        ...     _ = opt.factors()[1].normal_()  # a B that is not zero: the link adds something
        >>> _ = opt.tie_knot()
        >>> summary = opt.chain_summary().modules["0"]
        >>> len(summary.update_norms), summary.update_norms[0] > 0, summary.effective_rank
        (1, True, 2)
    """

    update_norms: tuple[float | None, ...]
    effective_rank: int | None


@dataclass(frozen=True)
class ChainSummary:
    """What :meth:`~chainopt.ChainLoRAOptimizer.chain_summary` returns.

    Attributes:
        links: links so far (knots tied + the pending one).
        steps: optimizer steps taken.
        ranks: rank of each link so far.
        knot_steps: the optimizer step after which each knot was tied.
        modules: per adapted module, its :class:`ModuleSummary`.
        master_bytes: host memory the float32 masters of 4-bit targets take (0 without any).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer
        >>> model = nn.Sequential(nn.Linear(8, 8))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=[4, 2], knot_every=2)
        >>> for _ in range(2):
        ...     model(torch.randn(2, 8)).sum().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> summary = opt.chain_summary()
        >>> summary.links, summary.steps, summary.ranks, summary.knot_steps, list(summary.modules)
        (2, 2, (4, 2), (2,), ['0'])
    """

    links: int
    steps: int
    ranks: tuple[int, ...]
    knot_steps: tuple[int, ...]
    modules: Mapping[str, ModuleSummary]
    master_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts and lists, for logging (JSON-serialisable)."""
        out = asdict(self)
        out["ranks"], out["knot_steps"] = list(self.ranks), list(self.knot_steps)
        for m in out["modules"].values():
            m["update_norms"] = list(m["update_norms"])
        return out


def summarize(chain: Chain, steps: int) -> ChainSummary:
    """The :class:`ChainSummary` of ``chain`` after ``steps`` optimizer steps."""
    knots = chain.history.knots
    modules: dict[str, ModuleSummary] = {}
    for r in chain.records:
        effective = None
        if chain.history.keep_factors and r.link.experts == 1:
            pending = LinkFactors(
                full_tensor(r.link.lora_A.detach()).float(),
                full_tensor(r.link.lora_B.detach()).float(),
                r.link.scale,
            )
            effective = chain.history.effective_rank(r.name, pending)
        norms = tuple(k.norms.get(r.name) for k in knots)
        modules[r.name] = ModuleSummary(norms, effective)
    links = chain.knots_tied + 1
    return ChainSummary(
        links=links,
        steps=steps,
        ranks=tuple(chain.config.link_rank(i) for i in range(links)),
        knot_steps=tuple(k.step for k in knots),
        modules=modules,
        master_bytes=sum(
            r.quant.master.numel() * r.quant.master.element_size()
            for r in chain.records
            if r.quant is not None and r.quant.master is not None
        ),
    )
