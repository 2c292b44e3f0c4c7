"""Registering a link on a dense module (``nn.Linear``, transformers ``Conv1D``) and removing it.

:func:`attach` registers a :class:`~chainopt.lora.LoRAParametrization` on a module's weight (and
optionally a :class:`~chainopt.lora.BiasDelta` on its bias) through ``torch.nn.utils.parametrize``
and installs the factorised forward; :func:`detach` removes them (and a 4-bit layer's link, see
:mod:`chainopt.quantized`), putting the module's parameters back in their order. The lookups
(:func:`lora_parametrization`, :func:`bias_delta`, :func:`original`) find chainopt's parts on a
module by type, never by name. :class:`~chainopt._layers.DenseBuilder` builds its records on these.

Example:
    >>> from torch import nn
    >>> lin = nn.Linear(8, 4)
    >>> link = attach(lin, rank=2, alpha=4.0)
    >>> lora_parametrization(lin) is link, original(lin) is lin.parametrizations.weight.original
    (True, True)
    >>> detach(lin)
    >>> type(lin) is nn.Linear
    True
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._marks import LINK_NAME, PARAMETER_ORDER
from ._surgery import (
    install_forward,
    parameter_order,
    remove_parametrizations,
    restore_parameter_order,
)
from .lora import BiasDelta, LoRAParametrization, lora_conv1d_forward, lora_linear_forward
from .quantized import detach_quantized, quantized_weight

__all__ = [
    "attach",
    "attach_bias_delta",
    "bias_delta",
    "detach",
    "is_conv1d",
    "lora_parametrization",
    "original",
    "parametrization_count",
    "plist_of",
    "residual_dtype",
    "stock_forward",
]


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's weight-transposed Linear)."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def plist_of(module: nn.Module, name: str) -> parametrize.ParametrizationList | None:
    """``module.parametrizations[name]`` (``None`` if ``name`` is not parametrized)."""
    if not parametrize.is_parametrized(module, name):
        return None
    return cast(parametrize.ParametrizationList, cast(Any, module).parametrizations[name])


def lora_parametrization(module: nn.Module) -> LoRAParametrization | None:
    """Return chainopt's link on ``module`` (``None`` if there is none).

    On ``module.weight``'s parametrizations, or the ``chainopt_link`` child of a quantized layer.
    """
    plist = plist_of(module, "weight")
    if plist is not None and isinstance(plist[0], LoRAParametrization):
        return plist[0]
    child = dict(module.named_children()).get(LINK_NAME)
    return child if isinstance(child, LoRAParametrization) else None


def bias_delta(module: nn.Module) -> BiasDelta | None:
    """Return chainopt's bias delta on ``module.bias`` (``None`` if there is none)."""
    plist = plist_of(module, "bias")
    if plist is not None and isinstance(plist[0], BiasDelta):
        return plist[0]
    return None


def original(module: nn.Module, name: str = "weight") -> Tensor:
    """The frozen tensor under ``module.<name>``'s parametrizations (its Parameter object)."""
    plist = plist_of(module, name)
    if plist is None:
        raise ValueError(f"{type(module).__name__}.{name} is not parametrized")
    tensor: Tensor = plist.original
    return tensor


def parametrization_count(module: nn.Module, name: str = "weight") -> int:
    """How many parametrizations are stacked on ``module.<name>`` (0 if none)."""
    plist = plist_of(module, name)
    return 0 if plist is None else len(plist)


def residual_dtype(weight: torch.dtype, exact_merge: bool | None) -> torch.dtype | None:
    """The merge residual's dtype for a weight of dtype ``weight`` (``None``: no residual)."""
    if exact_merge is False:
        return None
    if weight == torch.bfloat16:
        return torch.bfloat16  # same exponent range as float32: enough for what rounding drops
    if weight == torch.float16:
        return torch.float32  # a float16 residual would be subnormal
    return weight if exact_merge else None


def stock_forward(module: nn.Module) -> bool:
    """``module`` runs ``nn.Linear``'s (or ``Conv1D``'s) own forward, which the fused one replaces.

    A subclass with a forward of its own keeps it; it then reads the materialised weight.
    """
    forward = getattr(type(module), "forward", None)
    if is_conv1d(module):
        conv1d = next(c for c in type(module).__mro__ if c.__name__ == "Conv1D")
        return bool(forward is getattr(conv1d, "forward", None))
    return bool(forward is nn.Linear.forward)


def attach(
    module: nn.Module,
    rank: int,
    alpha: float,
    *,
    bias: bool = False,
    factor_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    ranks: Sequence[int] | None = None,
    fused: bool = True,
) -> LoRAParametrization:
    """Register a link (and optionally a bias delta) on ``module``; return the link.

    ``module`` is an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored ``(in, out)``).
    The weight's Parameter object is kept (``module.parametrizations.weight.original``), so
    references to it held elsewhere stay valid. Callers validate the arguments; this function
    assumes a plain (unparametrized) module.

    Args:
        module: the module to adapt.
        rank: rank of the first link.
        alpha: LoRA alpha.
        bias: also register a :class:`~chainopt.lora.BiasDelta` on ``module.bias``.
        factor_dtype: dtype of the factors (default: the weight's).
        residual_dtype: dtype of the merge residual buffer (``None``: no buffer).
        generator: generator for the initial A.
        ranks: every rank the link may take (rank step-down).
        fused: install the factorised forward; ``False`` keeps the module's own forward, which
            then reads the materialised ``W + s·B·A`` (a subclass with its own ``forward``).

    Returns:
        The registered :class:`~chainopt.lora.LoRAParametrization`.
    """
    weight = cast(Tensor, module.weight)
    conv1d = is_conv1d(module)
    in_features, out_features = weight.shape if conv1d else weight.shape[::-1]
    module.__dict__[PARAMETER_ORDER] = parameter_order(module)
    link = LoRAParametrization(
        out_features,
        in_features,
        rank,
        alpha,
        dtype=factor_dtype or weight.dtype,
        device=weight.device,
        residual_dtype=residual_dtype,
        fan_in_fan_out=conv1d,
        ranks=ranks,
    )
    link.reset_parameters(generator)
    parametrize.register_parametrization(module, "weight", link)
    if bias:
        attach_bias_delta(module, factor_dtype or weight.dtype, residual_dtype)
    if fused:
        install_forward(module, lora_conv1d_forward if conv1d else lora_linear_forward)
    return link


def attach_bias_delta(
    module: nn.Module, dtype: torch.dtype, residual_dtype: torch.dtype | None = None
) -> BiasDelta:
    """Register a :class:`~chainopt.lora.BiasDelta` on ``module.bias`` (which must exist)."""
    bias = cast(Tensor, module.bias)
    delta = BiasDelta(bias.shape[0], dtype=dtype, device=bias.device, residual_dtype=residual_dtype)
    parametrize.register_parametrization(module, "bias", delta)
    return delta


def detach(module: nn.Module) -> None:
    """Remove chainopt's parametrizations from ``module``, keeping the current originals.

    Whatever is pending in the link is *not* merged: merge first (see :mod:`chainopt.merge`).
    Other parametrizations stay. The module's parameters get back their registration order, so
    ``state_dict()`` keys come in the order they had before :func:`attach`.
    """
    if quantized_weight(module) is not None:
        detach_quantized(module)
    forward = lora_conv1d_forward if is_conv1d(module) else lora_linear_forward
    if parametrize.is_parametrized(module):
        remove_parametrizations(
            module, lambda p: isinstance(p, (LoRAParametrization, BiasDelta)), forward
        )
    order = module.__dict__.pop(PARAMETER_ORDER, None)
    if order is not None:
        restore_parameter_order(module, order)
