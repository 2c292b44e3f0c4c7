"""Inspecting the pending links before a knot: their norms, and whether merging them is safe.

A link must not be merged when a factor (or its bias delta) holds NaN/Inf, when its update
overflows float32, or when adding it would push an element of the frozen weight past the largest
finite value of the weight's dtype (65504 for float16). :func:`check_links` finds all of them
before anything is written, in batched passes and one host synchronisation:

- ``‖s·B·A‖_F`` from ``‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ)``: ``(r, r)`` products, one batched product per
  group of same-shaped links. A NaN or Inf anywhere in A or B reaches that sum.
- an overflow bound ``max|W| + max|residual| + ‖s·B·A‖_F`` per weight (and the same for a bias);
  only where the bound passes the dtype's largest value is the merged weight computed and checked
  exactly.

Under ``torch.distributed`` the verdict is agreed across ranks with one small all-reduce, so
every rank merges the same links, skips the same links, or raises together.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt._attach import attach
    >>> from chainopt._layers import record_of
    >>> lin = nn.Linear(4, 4).half()
    >>> link = attach(lin, rank=1, alpha=1.0, factor_dtype=torch.float32)
    >>> with torch.no_grad():
    ...     _ = link.lora_A.fill_(300.0), link.lora_B.fill_(300.0)  # finite, but 90000 > 65504
    >>> check = check_links([record_of("fc", lin)])
    >>> list(check.bad)
    ['fc']
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._dtensor import full_tensor, is_sharded
from ._record import Link, ModuleRecord
from ._validate import is_distributed
from .history import LinkFactors
from .lora import BiasDelta
from .merge import exact_sum

__all__ = [
    "NonFiniteUpdateError"
]  # the public names (chainopt re-exports them); the rest is internal

_FACTORS = "NaN/Inf in lora_A/lora_B, or an update that overflows float32"


class NonFiniteUpdateError(FloatingPointError):
    """A link holds NaN/Inf, or merging it would overflow the weight's dtype; nothing changed.

    Raised by a knot (with ``non_finite="raise"``), :func:`~chainopt.merge_and_unload` and the
    exports, before any weight is written. A ``FloatingPointError``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer, NonFiniteUpdateError
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, knot_every=1)
        >>> with torch.no_grad():
        ...     _ = opt.factors()[1].fill_(float("nan"))
        >>> frozen = model[0].parametrizations.weight.original
        >>> before = frozen.clone()
        >>> try:
        ...     _ = opt.tie_knot()
        ... except NonFiniteUpdateError:
        ...     print("refused; weight unchanged:", torch.equal(frozen, before))
        refused; weight unchanged: True
    """


@dataclass(frozen=True)
class LinkCheck:
    """What :func:`check_links` found.

    Attributes:
        norms: ``‖s·B·A‖_F`` per module name (float32; ``inf``/``nan`` for a bad link).
        bad: per module that must not be merged, why.
    """

    norms: dict[str, float]
    bad: dict[str, str]

    def describe(self) -> str:
        """The bad modules and their reasons, for an error message."""
        return "; ".join(f"{name!r}: {why}" for name, why in self.bad.items())


def pending_links(records: Sequence[ModuleRecord]) -> dict[str, LinkFactors]:
    """The pending link of each module by name, gathered whole (a collective under FSDP2)."""
    out: dict[str, LinkFactors] = {}
    for r in records:
        delta = None if r.delta is None else full_tensor(r.delta.delta.detach())
        out[r.name] = LinkFactors(
            full_tensor(r.link.lora_A.detach()),
            full_tensor(r.link.lora_B.detach()),
            r.link.scale,
            delta,
        )
    return out


def _gram_norms(links: list[LinkFactors], experts: int = 1) -> Tensor:
    """``‖Bᵢ·Aᵢ‖_F`` (unscaled) of same-shaped links, in float32, as one ``(n,)`` tensor.

    With ``experts > 1`` the factors are PEFT's fused-experts layout (A ``(r·E, in)`` expert by
    expert, B ``(out, r·E)`` interleaved) and the norm is that of all ``Bₑ·Aₑ`` together.
    """
    if experts > 1:
        a = torch.stack([link.A for link in links]).float()  # (n, r·E, in)
        b = torch.stack([link.B for link in links]).float()  # (n, out, r·E)
        a = a.view(a.shape[0], experts, -1, a.shape[-1])  # (n, E, r, in)
        b = b.view(b.shape[0], b.shape[1], -1, experts).permute(0, 3, 1, 2)  # (n, E, out, r)
        gram = (b.mT @ b) * (a @ a.mT)  # (n, E, r, r)
        return gram.sum((1, 2, 3)).clamp_min(0).sqrt()
    # (n, r, in) and (n, out, r); a convolution's (r, in, *k), (out, r, 1, …) flattened
    a = torch.stack([link.A for link in links]).float().flatten(2)
    b = torch.stack([link.B for link in links]).float().flatten(2)
    gram = (b.mT @ b) * (a @ a.mT)  # (n, r, r): NaN/Inf in A or B reach it
    return gram.sum((1, 2)).clamp_min(0).sqrt()


def _max_abs(tensors: list[Tensor]) -> list[Tensor]:
    """``max|t|`` of each tensor as 0-d float32 tensors (a collective for sharded ones).

    From one ``aminmax`` pass per tensor (NaN propagates): on CPU 8× faster than an infinity
    norm, which takes ``abs`` first.
    """
    out = []
    for t in tensors:
        low, high = torch.aminmax(t.detach())
        peak = torch.maximum(high.float(), low.float().neg())
        out.append(full_tensor(peak) if is_sharded(peak) else peak)
    return out


def check_links(
    records: Sequence[ModuleRecord], links: dict[str, LinkFactors] | None = None
) -> LinkCheck:
    """Norms of every pending link, and the links that must not be merged (with why).

    Args:
        records: the adapted modules.
        links: their pending links, if already gathered (:func:`pending_links`).

    Returns:
        A :class:`LinkCheck`. Under ``torch.distributed`` every rank gets the same ``bad``.
    """
    links = pending_links(records) if links is None else links
    if not records:
        return LinkCheck({}, {})
    names = [r.name for r in records]
    experts = {r.name: r.link.experts for r in records}  # fused experts' links
    # 1. ‖s·B·A‖ per link, grouped by shape, and max|·| of everything a merge adds together.
    shapes: dict[tuple[Any, ...], list[str]] = {}
    for n in names:
        link = links[n]
        key = (link.A.device, link.A.shape, link.B.shape, link.A.dtype, experts[n])
        shapes.setdefault(key, []).append(n)
    order = [n for same in shapes.values() for n in same]
    parts = [_gram_norms([links[n] for n in same], key[-1]) for key, same in shapes.items()]
    targets: list[Tensor] = []
    merges: list[tuple[ModuleRecord, Link | BiasDelta, Tensor, list[int]]] = []
    for r in records:
        for part, target in r.parts():
            operands = [target, part.merge_residual]
            operands.append(part.delta if isinstance(part, BiasDelta) else None)
            idx = []
            for t in operands:
                if t is not None:
                    idx.append(len(targets))
                    targets.append(t)
            merges.append((r, part, target, idx))
    flat = [p.reshape(-1) for p in parts] + [m.reshape(1) for m in _max_abs(targets)]
    device = flat[0].device
    values = torch.cat([f.to(device) for f in flat]).tolist()  # the one host sync
    norms = {n: links[n].scale * v for n, v in zip(order, values[: len(order)], strict=True)}
    peak = values[len(order) :]

    # 2. the verdict: NaN/Inf factors, or a merge that would overflow the weight's dtype.
    bad: dict[str, str] = {n: _FACTORS for n in names if not math.isfinite(norms[n])}
    for r, part, target, idx in merges:
        if r.name in bad:
            continue
        if isinstance(part, BiasDelta) and not math.isfinite(peak[idx[-1]]):
            bad[r.name] = "NaN/Inf in the bias delta"
            continue
        update = 0.0 if isinstance(part, BiasDelta) else norms[r.name]
        limit = torch.finfo(target.dtype).max
        if sum(peak[i] for i in idx) + update <= limit:  # no element can pass the limit
            continue
        if not bool(torch.isfinite(exact_sum(target, part).to(target.dtype)).all()):
            what = "bias" if isinstance(part, BiasDelta) else "weight"
            bad[r.name] = (
                f"merging it would put non-finite values into the {target.dtype} {what} "
                f"(largest finite value {limit:g}), or the {what} already holds NaN/Inf"
            )
    return LinkCheck(norms, _agreed(names, bad))


def non_finite_params(params: Sequence[Tensor]) -> str | None:
    """Which of ``params`` hold NaN/Inf (their count and shapes), or ``None``; sharded ones are
    read whole, and the verdict is agreed across ranks (a collective under
    ``torch.distributed``: every rank calls it)."""
    bad = [
        tuple(p.shape)
        for p in params
        if p.is_floating_point() and not bool(torch.isfinite(full_tensor(p.detach())).all())
    ]
    why = f"{len(bad)} of them, shapes {bad[:3]}" if bad else None
    return _agreed(["params"], {} if why is None else {"params": why}).get("params")


def _agreed(names: list[str], bad: dict[str, str]) -> dict[str, str]:
    """``bad`` made the same on every rank: a link bad on any rank is bad on all."""
    if not is_distributed():
        return bad
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flags = torch.tensor([n in bad for n in names], dtype=torch.float32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    agreed = {}
    for n, flag in zip(names, flags.tolist(), strict=True):
        if flag:
            agreed[n] = bad.get(n, "NaN/Inf or overflow on another rank")
    return agreed
