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

from collections.abc import Sequence

import torch
from torch import Tensor, nn

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

__all__ = ["NonFiniteUpdateError", "find_non_finite", "merge_into_weight", "merged_weight"]


class NonFiniteUpdateError(FloatingPointError):
    """A link holds NaN or Inf at knot time; no weight was changed."""


def _parts(module: nn.Module) -> tuple[LoRAParametrization, BiasDelta | None]:
    link = lora_parametrization(module)
    if link is None:
        raise ValueError(f"module {type(module).__name__} carries no chainopt link")
    return link, bias_delta(module)


def find_non_finite(modules: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Names of the modules whose link (factors, bias delta, residual) holds a NaN or Inf.

    One host synchronisation for all modules (sharded factors are gathered first, so every rank
    gets the same answer).
    """
    if not modules:
        return []
    flags = []
    for _name, module in modules:
        link, bias = _parts(module)
        tensors: list[Tensor] = [link.lora_A, link.lora_B]
        if bias is not None:
            tensors.append(bias.delta)
        tensors = [full_tensor(t) for t in tensors]
        flags.append(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
    ok = torch.stack([f.cpu() for f in flags]).tolist()
    return [name for (name, _m), good in zip(modules, ok, strict=True) if not good]


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
def merged_weight(module: nn.Module) -> Tensor:
    """The adapted weight ``W + residual + s·B·A`` in the weight's dtype, as a new tensor."""
    link, _bias = _parts(module)
    weight = original(module)
    return _exact(weight, link.merge_residual, link).to(weight.dtype)  # whole, even if sharded


@torch.no_grad()
def merged_bias(module: nn.Module) -> Tensor | None:
    """The adapted bias ``b + residual + δ`` in the bias's dtype (``None`` without a bias)."""
    bias = bias_delta(module)
    if bias is None:
        b: Tensor | None = getattr(module, "bias", None)
        return None if b is None else b.detach().clone()
    target = original(module, "bias")
    return _exact(target, bias.merge_residual, None, bias.delta).to(target.dtype)
