"""Tying a knot: fold a link into its frozen weight, exactly, in place.

The update ``s·B·A`` is computed in float32. A float32 weight takes it with one ``addmm_``. A
half-precision weight would lose most of a small update if rounded at every knot, so such weights
carry a *merge residual*: the part of ``W₀ + Σ sᵢ·Bᵢ·Aᵢ`` that rounding ``W`` to its dtype left out.
Each knot adds the residual back before rounding and stores what the new rounding leaves out, so
after any number of knots ``W`` equals ``W₀ + Σ sᵢ·Bᵢ·Aᵢ`` rounded once (to within the residual's
own precision, far below half an ulp of ``W``).

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

from .lora import BiasDelta, LoRAParametrization, bias_delta, lora_parametrization, original

__all__ = ["NonFiniteUpdateError", "find_non_finite", "merge_into_weight", "merged_weight"]


class NonFiniteUpdateError(FloatingPointError):
    """A link holds NaN or Inf at knot time; no weight was changed."""


def _parts(module: nn.Module) -> tuple[LoRAParametrization, BiasDelta | None]:
    link = lora_parametrization(module)
    if link is None:
        raise ValueError(f"module {type(module).__name__} carries no chainopt link")
    return link, bias_delta(module)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def find_non_finite(modules: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """Names of the modules whose link (factors, bias delta, residual) holds a NaN or Inf.

    One host synchronisation for all modules.
    """
    if not modules:
        return []
    flags = []
    for _name, module in modules:
        link, bias = _parts(module)
        tensors = [link.lora_A, link.lora_B]
        if bias is not None:
            tensors.append(bias.delta)
        flags.append(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
    ok = torch.stack([f.cpu() for f in flags]).tolist()
    return [name for (name, _m), good in zip(modules, ok, strict=True) if not good]


def _add_exact_(target: Tensor, update: Tensor, residual: Tensor | None) -> None:
    """``target += update`` in place, carrying what rounding leaves out in ``residual``."""
    if residual is None:
        target.add_(update.to(target.dtype))
        return
    exact = target.to(update.dtype).add_(residual.to(update.dtype)).add_(update)
    target.copy_(exact)
    residual.copy_(exact.sub_(target.to(update.dtype)))


@torch.no_grad()
def merge_into_weight(module: nn.Module) -> None:
    """Fold the module's pending ``s·B·A`` (and bias delta) into the frozen originals, in place.

    The factors are left as they are; re-initialise them afterwards. The caller checks finiteness
    first (:func:`find_non_finite`).
    """
    link, bias = _parts(module)
    weight = original(module)
    residual = link.merge_residual
    if residual is None and weight.dtype == torch.float32 and link.lora_A.dtype == torch.float32:
        # (out, r) @ (r, in) accumulated straight into W: no (out, in) temporary.
        weight.addmm_(link.lora_B, link.lora_A, alpha=link.scale)
    else:
        dt = _compute_dtype(weight.dtype)
        update = (link.lora_B.to(dt) @ link.lora_A.to(dt)).mul_(link.scale)
        _add_exact_(weight, update, residual)
    if bias is not None:
        original_bias = original(module, "bias")
        dt = _compute_dtype(original_bias.dtype)
        _add_exact_(original_bias, bias.delta.to(dt), bias.merge_residual)


@torch.no_grad()
def merged_weight(module: nn.Module) -> Tensor:
    """The adapted weight ``W + residual + s·B·A`` in the weight's dtype, as a new tensor."""
    link, _bias = _parts(module)
    weight = original(module)
    dt = _compute_dtype(weight.dtype)
    exact = weight.to(dt, copy=True)
    if link.merge_residual is not None:
        exact.add_(link.merge_residual.to(dt))
    exact.addmm_(link.lora_B.to(dt), link.lora_A.to(dt), alpha=link.scale)
    return exact.to(weight.dtype)


@torch.no_grad()
def merged_bias(module: nn.Module) -> Tensor | None:
    """The adapted bias ``b + residual + δ`` in the bias's dtype (``None`` without a bias)."""
    bias = bias_delta(module)
    if bias is None:
        b: Tensor | None = getattr(module, "bias", None)
        return None if b is None else b.detach().clone()
    orig = original(module, "bias")
    dt = _compute_dtype(orig.dtype)
    exact = orig.to(dt, copy=True).add_(bias.delta.to(dt))
    if bias.merge_residual is not None:
        exact.add_(bias.merge_residual.to(dt))
    return exact.to(orig.dtype)
