"""Tying a knot: fold a link into its frozen weight, exactly, in place.

The update ``s·B·A`` is computed in float32. A float32 weight takes it with one ``addmm_``. A
half-precision weight would lose most of a small update if rounded at every knot, so such weights
carry a *merge residual*: the part of ``W₀ + Σ sᵢ·Bᵢ·Aᵢ`` that rounding ``W`` to its dtype left out.
Each knot adds the residual back before rounding and stores what the new rounding leaves out, so
after any number of knots ``W`` equals ``W₀ + Σ sᵢ·Bᵢ·Aᵢ`` rounded once (to within the residual's
own precision, far below half an ulp of ``W``).

Sharded parameters (``DTensor``, FSDP2's ``fully_shard``) are gathered, merged whole and written
back shard by shard (a residual sharded like its weight too, a whole one whole); every rank
computes the same merge. Gathering is a collective: every rank ties the knot.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt.lora import attach
    >>> from chainopt.merge import merge_into_weight, merged_weight
    >>> lin = nn.Linear(6, 4)
    >>> link = attach(lin, rank=2, alpha=2.0)
    >>> with torch.no_grad():
    ...     _ = link.lora_B.normal_()
    >>> expected = merged_weight(lin)
    >>> merge_into_weight(lin)
    >>> torch.allclose(lin.parametrizations.weight.original, expected)
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .history import LinkFactors
from .lora import (
    BiasDelta,
    LoRAParametrization,
    bias_delta,
    copy_full_,
    full_tensor,
    is_sharded,
    lora_parametrization,
    original,
)

__all__ = [
    "NonFiniteUpdateError",
    "find_non_finite",
    "inspect_links",
    "merge_into_weight",
    "merged_weight",
    "pending_links",
]


class NonFiniteUpdateError(FloatingPointError):
    """A link holds NaN or Inf at knot time; no weight was changed."""


def _parts(module: nn.Module) -> tuple[LoRAParametrization, BiasDelta | None]:
    link = lora_parametrization(module)
    if link is None:
        raise ValueError(f"module {type(module).__name__} carries no chainopt link")
    return link, bias_delta(module)


def pending_links(modules: Sequence[tuple[str, nn.Module]]) -> dict[str, LinkFactors]:
    """The pending link of each module by name, gathered whole (a collective under FSDP2)."""
    out: dict[str, LinkFactors] = {}
    for name, module in modules:
        link, bias = _parts(module)
        delta = None if bias is None else full_tensor(bias.delta)
        out[name] = LinkFactors(
            full_tensor(link.lora_A), full_tensor(link.lora_B), link.scale, delta
        )
    return out


def inspect_links(links: Mapping[str, LinkFactors]) -> tuple[list[str], dict[str, float]]:
    """``(bad, norms)``: the links that must not be merged, and ``‖s·B·A‖_F`` of every link.

    The norm comes from ``‖BA‖² = Σ (BᵀB) ⊙ (AAᵀ)`` (``(r, r)`` products, never ``(out, in)``),
    one batched product per group of same-shaped links. A NaN or Inf anywhere in A or B reaches
    that sum, so a link is bad exactly when its norm, or its bias delta's, is not finite in
    float32: a factor holds NaN/Inf, or its values are so large (``|x| ≳ 1e19``) that the update
    would overflow. One host synchronisation per device.
    """
    names = list(links)
    by_device: dict[torch.device, list[str]] = {}
    for name in names:
        by_device.setdefault(links[name].A.device, []).append(name)
    norms: dict[str, float] = {}
    finite: dict[str, bool] = {}
    for group in by_device.values():
        shapes: dict[tuple[Any, ...], list[str]] = {}
        for n in group:
            link = links[n]
            shapes.setdefault((link.A.shape, link.B.shape, link.A.dtype), []).append(n)
        order = [n for same in shapes.values() for n in same]
        with_bias = [n for n in group if links[n].bias is not None]
        parts = [_gram_norms([links[n] for n in same]) for same in shapes.values()]
        if with_bias:
            biases = [cast(Tensor, links[n].bias).float() for n in with_bias]
            parts.append(torch.stack(torch._foreach_norm(biases)))
        values = torch.cat(parts).tolist()  # the one host sync
        scaled = zip(order, values[: len(order)], strict=True)
        norms.update((n, links[n].scale * v) for n, v in scaled)
        finite.update((n, math.isfinite(norms[n])) for n in order)
        for n, value in zip(with_bias, values[len(order) :], strict=True):
            finite[n] = finite[n] and math.isfinite(value)
    return [n for n in names if not finite[n]], {n: norms[n] for n in names}


def _gram_norms(links: list[LinkFactors]) -> Tensor:
    """``‖Bᵢ·Aᵢ‖_F`` (unscaled) of same-shaped links, in float32, as one ``(n,)`` tensor."""
    a = torch.stack([link.A for link in links]).float()  # (n, r, in)
    b = torch.stack([link.B for link in links]).float()  # (n, out, r)
    gram = (b.mT @ b) * (a @ a.mT)  # (n, r, r): NaN/Inf in A or B reach it
    return gram.sum((1, 2)).clamp_min(0).sqrt()


def find_non_finite(modules: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Names of the modules whose pending link must not be merged (see :func:`inspect_links`).

    NaN/Inf in a factor or bias delta, or an update whose norm overflows float32. Sharded
    factors are gathered first, so every rank gets the same answer.
    """
    return inspect_links(pending_links(modules))[0]


def _exact(
    target: Tensor,
    residual: Tensor | None,
    link: LoRAParametrization | None,
    delta: Tensor | None = None,
) -> Tensor:
    """``target + residual + (s·B·A or delta)`` in at least float32, as a new (whole) tensor."""
    dt = torch.promote_types(target.dtype, torch.float32)
    exact = full_tensor(target).to(dt, copy=True)
    if residual is not None:
        exact.add_(full_tensor(residual).to(dt))
    if link is not None:
        a, b = full_tensor(link.lora_A), full_tensor(link.lora_B)
        # (out, r) @ (r, in) accumulated into the copy: no separate (out, in) update tensor.
        exact.addmm_(b.to(dt), a.to(dt), alpha=link.scale)
    if delta is not None:
        exact.add_(full_tensor(delta).to(dt))
    return exact


def _store_(target: Tensor, exact: Tensor, residual: Tensor | None) -> None:
    """Round ``exact`` into ``target`` in place; keep what rounding dropped in ``residual``."""
    if is_sharded(target):
        rounded = exact.to(target.dtype, copy=True)
        copy_full_(target, rounded)  # this rank's shard only
    else:
        target.copy_(exact)
        rounded = target
    if residual is not None:
        copy_full_(residual, exact.sub_(rounded.to(exact.dtype)))


@torch.no_grad()
def merge_into_weight(module: nn.Module) -> None:
    """Fold the module's pending ``s·B·A`` (and bias delta) into the frozen originals, in place.

    The factors are left as they are; re-initialise them afterwards. The caller checks finiteness
    first (:func:`find_non_finite`).
    """
    link, bias = _parts(module)
    weight = original(module)
    residual = link.merge_residual
    fast = weight.dtype == link.lora_A.dtype == torch.float32 and not is_sharded(weight)
    if residual is None and fast:
        weight.addmm_(link.lora_B, link.lora_A, alpha=link.scale)  # in place, no temporary
    else:
        _store_(weight, _exact(weight, residual, link), residual)
    if bias is not None:
        target = original(module, "bias")
        _store_(target, _exact(target, bias.merge_residual, None, bias.delta), bias.merge_residual)


@torch.no_grad()
def merged_weight(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """The adapted weight ``W + residual + s·B·A`` as a new, whole tensor.

    Args:
        module: an adapted module.
        dtype: the result's dtype (default: the weight's). ``torch.float32`` keeps what rounding
            into a half-precision weight would drop.
    """
    link, _bias = _parts(module)
    weight = original(module)
    return _exact(weight, link.merge_residual, link).to(dtype or weight.dtype)


@torch.no_grad()
def merged_bias(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor | None:
    """The adapted bias ``b + residual + δ`` (``None`` without a bias), dtype as above."""
    bias = bias_delta(module)
    if bias is None:
        b: Tensor | None = getattr(module, "bias", None)
        return None if b is None else b.detach().to(dtype or b.dtype, copy=True)
    target = original(module, "bias")
    return _exact(target, bias.merge_residual, None, bias.delta).to(dtype or target.dtype)
