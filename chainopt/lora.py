"""The LoRA link: a weight parametrization and the factorised forward that goes with it.

A :class:`LoRAParametrization` registered on ``linear.weight`` makes every reader of
``linear.weight`` see ``W + s·B·A``. The adapted module's *forward*, however, never builds that
matrix: chainopt installs :func:`_lora_linear_forward` on the per-module class that
``torch.nn.utils.parametrize`` creates, which computes ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` (PEFT's cost: no
``(out, in)`` weight gradient, no extra copy of the weight saved for backward). Whenever that fast
path would not be exact (a ``parametrize.cached()`` context, another parametrization stacked on the
weight) the forward falls back to ``F.linear(x, self.weight, self.bias)``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt.lora import attach, detach, LoRAParametrization
    >>> lin = nn.Linear(8, 4)
    >>> p = attach(lin, rank=2, alpha=4.0)
    >>> isinstance(p, LoRAParametrization), tuple(p.lora_A.shape), tuple(p.lora_B.shape)
    (True, (2, 8), (4, 2))
    >>> w = detach(lin)  # plain nn.Linear again, same Parameter object
    >>> type(lin) is nn.Linear
    True
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "BiasDelta",
    "LoRAParametrization",
    "attach",
    "bias_delta",
    "detach",
    "lora_parametrization",
    "original",
    "parametrization_count",
]


class LoRAParametrization(nn.Module):
    """One link of the chain on a weight of shape ``(out, in)``: ``W ↦ W + s·B·A``.

    Attributes:
        lora_A: ``(rank, in)`` factor, Kaiming-uniform at the start of each link.
        lora_B: ``(out, rank)`` factor, zero at the start of each link.
        scale: ``s = alpha / rank``.
        merge_residual: optional buffer holding what rounding the frozen weight to its own dtype
            left out of the merged updates (kept for half-precision weights so that knots are
            exact; ``None`` otherwise).

    Args:
        out_features: rows of the adapted weight.
        in_features: columns of the adapted weight.
        rank: rank of the link.
        alpha: LoRA alpha; the scale is ``alpha / rank``.
        dtype: dtype of the factors.
        device: device of the factors.
        residual_dtype: dtype of the merge residual buffer, or ``None`` for no buffer.

    Example:
        >>> p = LoRAParametrization(4, 8, rank=2, alpha=4.0)
        >>> p.scale
        2.0
        >>> bool((p(torch.ones(4, 8)) == 1).all())  # B is zero: the identity at first
        True
    """

    merge_residual: Tensor | None

    def __init__(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        alpha: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        residual_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = float(alpha) / rank
        self.lora_A = nn.Parameter(torch.zeros(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        residual = (
            None
            if residual_dtype is None
            else torch.zeros(out_features, in_features, dtype=residual_dtype, device=device)
        )
        self.register_buffer("merge_residual", residual)

    def delta(self) -> Tensor:
        """Return ``s·B·A`` in float32, shape ``(out, in)``."""
        # (out, r) @ (r, in) -> (out, in)
        return (self.lora_B.float() @ self.lora_A.float()).mul_(self.scale)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Start a new link in place: A Kaiming-uniform (as ``nn.Linear``), B zero.

        A is drawn on the CPU in float32 from ``generator`` and copied, so the same generator
        state gives the same factors on every device and process.
        """
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])  # kaiming_uniform_(a=sqrt(5))
        fresh = torch.empty(self.lora_A.shape, dtype=torch.float32)
        fresh.uniform_(-bound, bound, generator=generator)
        with torch.no_grad():
            self.lora_A.copy_(fresh)
            self.lora_B.zero_()

    def forward(self, weight: Tensor) -> Tensor:
        """Generic path: the materialised ``W + s·B·A`` (used by readers of ``.weight``)."""
        # (out, r) @ (r, in) -> (out, in)
        update = (self.lora_B @ self.lora_A) * self.scale
        return weight + update.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


class BiasDelta(nn.Module):
    """A trainable delta on a Linear's bias, ``b ↦ b + δ``; merged and zeroed with the factors.

    Args:
        out_features: length of the bias.
        dtype: dtype of the delta.
        device: device of the delta.
        residual_dtype: dtype of the merge residual buffer, or ``None`` for no buffer.
    """

    merge_residual: Tensor | None

    def __init__(
        self,
        out_features: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        residual_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        residual = (
            None
            if residual_dtype is None
            else torch.zeros(out_features, dtype=residual_dtype, device=device)
        )
        self.register_buffer("merge_residual", residual)

    def reset_parameters(self) -> None:
        """Start a new link in place: the delta is zero."""
        with torch.no_grad():
            self.delta.zero_()

    def forward(self, bias: Tensor) -> Tensor:
        return bias + self.delta.to(bias.dtype)


def lora_parametrization(module: nn.Module) -> LoRAParametrization | None:
    """Return chainopt's link on ``module.weight`` (``None`` if there is none)."""
    plist = _plist(module, "weight")
    if plist is not None and isinstance(plist[0], LoRAParametrization):
        return plist[0]
    return None


def bias_delta(module: nn.Module) -> BiasDelta | None:
    """Return chainopt's bias delta on ``module.bias`` (``None`` if there is none)."""
    plist = _plist(module, "bias")
    if plist is not None and isinstance(plist[0], BiasDelta):
        return plist[0]
    return None


def _plist(module: nn.Module, name: str) -> parametrize.ParametrizationList | None:
    plists = module.__dict__.get("_modules", {}).get("parametrizations")
    if plists is None or name not in plists:
        return None
    plist: parametrize.ParametrizationList = plists[name]
    return plist


def original(module: nn.Module, name: str = "weight") -> Tensor:
    """The frozen tensor under ``module.<name>``'s parametrizations (its Parameter object)."""
    plist = _plist(module, name)
    if plist is None:
        raise ValueError(f"{type(module).__name__}.{name} is not parametrized")
    tensor: Tensor = plist.original
    return tensor


def parametrization_count(module: nn.Module, name: str = "weight") -> int:
    """How many parametrizations are stacked on ``module.<name>`` (0 if none)."""
    plist = _plist(module, name)
    return 0 if plist is None else len(plist)


def _lora_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """Forward of an adapted Linear: ``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` without building ``W + s·B·A``."""
    plists = cast(nn.ModuleDict, self.parametrizations)
    plist = cast(parametrize.ParametrizationList, plists["weight"])
    if len(plist) != 1 or parametrize._cache_enabled:
        return F.linear(x, self.weight, self.bias)
    link = cast(LoRAParametrization, plist[0])
    out = F.linear(x, plist.original, self.bias)
    a = link.lora_A
    h = x if x.dtype == a.dtype or torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
    # (..., in) @ (in, r) -> (..., r) @ (r, out) -> (..., out)
    lora = F.linear(F.linear(h, a), link.lora_B) * link.scale
    result: Tensor = out + lora.to(out.dtype)
    return result


def attach(
    linear: nn.Linear,
    rank: int,
    alpha: float,
    *,
    bias: bool = False,
    factor_dtype: torch.dtype | None = None,
    residual_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
) -> LoRAParametrization:
    """Register a link (and optionally a bias delta) on ``linear``; return the link.

    The weight's Parameter object is kept (``linear.parametrizations.weight.original``), so
    references to it held elsewhere stay valid. Callers validate the arguments; this function
    assumes ``linear`` is a plain (unparametrized) ``nn.Linear``.

    Args:
        linear: the module to adapt.
        rank: rank of the link.
        alpha: LoRA alpha.
        bias: also register a :class:`BiasDelta` on ``linear.bias`` (which must exist).
        factor_dtype: dtype of the factors (default: the weight's).
        residual_dtype: dtype of the merge residual buffer (``None``: no buffer).
        generator: generator for the initial A.

    Returns:
        The registered :class:`LoRAParametrization`.
    """
    weight = linear.weight
    link = LoRAParametrization(
        linear.out_features,
        linear.in_features,
        rank,
        alpha,
        dtype=factor_dtype or weight.dtype,
        device=weight.device,
        residual_dtype=residual_dtype,
    )
    link.reset_parameters(generator)
    parametrize.register_parametrization(linear, "weight", link)
    if bias:
        delta = BiasDelta(
            linear.out_features,
            dtype=factor_dtype or weight.dtype,
            device=weight.device,
            residual_dtype=residual_dtype,
        )
        parametrize.register_parametrization(linear, "bias", delta)
    # The class parametrize made is this module's own: override its forward, never nn.Linear's.
    type(linear).forward = _lora_linear_forward  # type: ignore[method-assign, assignment]
    return link


def detach(linear: nn.Module) -> None:
    """Remove chainopt's parametrizations from ``linear``, keeping the current originals.

    Whatever is pending in the link is *not* merged: merge first (see :mod:`chainopt.merge`).
    Other parametrizations stay. Unlike ``parametrize.remove_parametrizations`` this never edits a
    class that another module may share (a ``copy.deepcopy`` of a parametrized module shares its
    class with the original): the module gets a class of its own instead.
    """
    plists = linear.parametrizations
    assert isinstance(plists, nn.ModuleDict)
    removed = []
    for name, kind in (("weight", LoRAParametrization), ("bias", BiasDelta)):
        plist = _plist(linear, name)
        if plist is None or not isinstance(plist[0], kind):
            continue
        if len(plist) > 1:
            del plist[0]  # the rest of the chain stays, over the same original
            continue
        original = plist.original
        del plists[name]
        removed.append((name, original))
    cls = type(linear)
    base = cls.__mro__[1]
    if len(plists) == 0:
        del linear._modules["parametrizations"]
        linear.__class__ = base
    elif removed or cls.forward is _lora_linear_forward:
        drop = {name for name, _ in removed} | {"forward", "__dict__", "__weakref__"}
        body = {k: v for k, v in cls.__dict__.items() if k not in drop}
        linear.__class__ = type(cls.__name__, (base,), body)
    for name, original in removed:
        linear.register_parameter(name, cast(nn.Parameter, original))
