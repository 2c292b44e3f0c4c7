"""The link: a LoRA parametrization ``W ↦ W + s·B·A``, a bias delta, and restarting links.

A :class:`LoRAParametrization` registered on a module's ``weight`` through
``torch.nn.utils.parametrize`` makes every reader of ``module.weight`` see ``W + s·B·A``. The
adapted modules' forwards here (:func:`lora_linear_forward`, :func:`lora_conv1d_forward`,
:func:`lora_quantized_forward`) compute ``x·Wᵀ + s·(x·Aᵀ)·Bᵀ`` and never build that matrix. A knot
merges the link into ``W`` and restarts it in place with :func:`restart_links`: A Kaiming-uniform
(or given), B zero, so the function is unchanged and the Parameter objects stay the same.

Example:
    >>> import torch
    >>> p = LoRAParametrization(4, 8, rank=2, alpha=4.0)
    >>> restart_links([p], torch.Generator().manual_seed(0))
    >>> p.scale, tuple(p.lora_A.shape), tuple(p.lora_B.shape), bool((p.lora_B == 0).all())
    (2.0, (2, 8), (4, 2), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._dtensor import copy_full_, is_sharded
from ._surgery import foreach_copy_, foreach_zero_, in_parametrize_cache, set_shape_
from ._validate import is_int

__all__ = [
    "BiasDelta",
    "LoRAParametrization",
]  # the public names (chainopt re-exports them); the rest is internal


class Factors(Protocol):
    """A link's trainable factors and scale: ``s·B·A`` with ``A`` ``(r, in)``, ``B`` ``(out, r)``.

    What restarting a link reads and writes; any link class has them (see
    :class:`chainopt._record.Link`).
    """

    @property
    def lora_A(self) -> nn.Parameter:
        """``(r, in)``, drawn at the start of each link."""
        ...

    @property
    def lora_B(self) -> nn.Parameter:
        """``(out, r)``, zero at the start of each link."""
        ...

    @property
    def scale(self) -> float:
        """``s = alpha / r``."""
        ...


class LinkModule(nn.Module):
    """What every link module shares: its factors' shapes, rank step-down and loading.

    A link holds ``E`` stacked matrices in one pair of factors (PEFT's fused-experts layout:
    ``lora_A`` ``(r·E, in)``, ``lora_B`` ``(out, r·E)``); ``E`` is 1 for a layer's link
    (:class:`LoRAParametrization`) and the number of experts for a fused 3-D parameter
    (:class:`chainopt._experts.ParameterLink`). Subclasses set the attributes below in their
    ``__init__`` and define ``delta()`` and ``forward``.

    Attributes:
        lora_A: ``(rank·E, in)``.
        lora_B: ``(out, rank·E)``.
        experts: ``E``.
        rank: the current rank (of each expert's link).
        alpha: LoRA alpha; ``scale = alpha / rank``.
        ranks: the ranks this link may take (a rank step-down resizes it at knots and on load).
        in_features: columns of each ``B·A``.
        out_features: rows of each ``B·A``.
    """

    experts: int = 1
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    rank: int
    alpha: float
    scale: float
    ranks: frozenset[int]
    in_features: int
    out_features: int

    def _setup(
        self,
        out_features: int,
        in_features: int,
        rank: int,
        alpha: float,
        *,
        experts: int,
        fan_in_fan_out: bool,
        ranks: Sequence[int] | None,
        dtype: torch.dtype,
        device: torch.device | str | None,
        residual: tuple[tuple[int, ...], torch.dtype | None],
    ) -> None:
        """Set the attributes above, zero factors, and the merge residual buffer (``residual``:
        its shape and dtype; dtype ``None``: no buffer).

        Raises:
            TypeError: a size, rank or alpha that is not a Python number, or a non-floating
                ``dtype``.
            ValueError: a non-positive size, rank or alpha, or NaN/Inf alpha.
        """
        for name, size in (("out_features", out_features), ("in_features", in_features)):
            if not is_int(size) or size <= 0:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        for r in (rank, *(ranks or ())):  # (a rank above min(out, in) is only redundant)
            if not is_int(r) or r <= 0:
                what = "rank" if r is rank else f"each of ranks={list(ranks or ())!r}"
                raise ValueError(f"{what} must be a positive int, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a positive number, got {alpha!r}")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.unloaded = False
        self.experts = experts
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = float(alpha) / rank
        self.fan_in_fan_out = fan_in_fan_out
        self.ranks = frozenset(ranks or (rank,)) | {rank}
        self.in_features = in_features
        self.out_features = out_features
        rows = rank * experts
        self.lora_A = nn.Parameter(torch.zeros(rows, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rows, dtype=dtype, device=device))
        shape, residual_dtype = residual
        buffer = None
        if residual_dtype is not None:
            buffer = torch.zeros(shape, dtype=residual_dtype, device=device)
        self.register_buffer("merge_residual", buffer)

    def resize_(self, rank: int) -> None:
        """Change the link's rank in place (same Parameter objects, new shapes; B·A becomes 0).

        The scale becomes ``alpha / rank``. References held by optimizers and schedulers stay
        valid, but any optimizer state and gradient of the factors must be dropped by the caller.

        Raises:
            ValueError: ``rank`` is not one of :attr:`ranks`.
        """
        if rank == self.rank:
            return
        if rank not in self.ranks:
            raise ValueError(
                f"rank must be one of this link's ranks {sorted(self.ranks)}, got {rank}"
            )
        set_shape_(self.lora_A, (rank * self.experts, self.in_features))
        set_shape_(self.lora_B, (self.out_features, rank * self.experts))
        self.rank = rank
        self.scale = self.alpha / rank

    def check_factors(self, a: object, b: object) -> str | None:
        """Why factors ``a``, ``b`` (e.g. from a state dict) cannot be loaded, or ``None``.

        They must be floating 2-D tensors, not on the meta device, of shapes ``(r·E, in)`` and
        ``(out, r·E)`` with ``r`` one of :attr:`ranks`.
        """
        for name, t in (("lora_A", a), ("lora_B", b)):
            if not isinstance(t, Tensor):
                return f"{name} is a {type(t).__name__}, not a tensor"
            if t.is_meta or not t.is_floating_point() or t.dim() != 2:
                what = f"{t.dtype} {tuple(t.shape)}{' on meta' if t.is_meta else ''}"
                return f"{name} must be a floating 2-D tensor with data, got {what}"
        a, b = cast(Tensor, a), cast(Tensor, b)
        e = self.experts
        rank = a.shape[0] // e
        expected = ((rank * e, self.in_features), (self.out_features, rank * e))
        if (tuple(a.shape), tuple(b.shape)) != expected or rank not in self.ranks:
            over = f"{e} expert(s) of " if e > 1 else ""
            layout = f" (A (r·{e}, in), B (out, r·{e}))" if e > 1 else ""
            return (
                f"factors of shapes {tuple(a.shape)} and {tuple(b.shape)} do not fit a link over "
                f"{over}({self.out_features}, {self.in_features}) of rank in "
                f"{sorted(self.ranks)}{layout}"
            )
        return None

    def merge_problem(self) -> str | None:
        """``None``: the parametrized tensor always adds the link (see
        :class:`chainopt._record.Link`)."""
        return None

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A checkpoint taken in a later link of a rank step-down holds factors of another rank:
        # resize first, but only to a rank this link may take and to shapes that fit.
        a, b = state_dict.get(prefix + "lora_A"), state_dict.get(prefix + "lora_B")
        if a is not None or b is not None:
            why = self.check_factors(a, b)
            if why is not None:
                error_msgs.append(f"{prefix[:-1] or 'link'}: {why}")
                return
            self.resize_(cast(Tensor, a).shape[0] // self.experts)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


class LoRAParametrization(LinkModule):
    """One link of the chain on a weight of shape ``(out, in)``: ``W ↦ W + s·B·A``.

    With ``fan_in_fan_out`` the weight is stored ``(in, out)`` (transformers' ``Conv1D``, as
    PEFT's option of that name) and the link adds ``(s·B·A)ᵀ``; the factors keep their shapes.

    Attributes:
        lora_A: ``(rank, in)`` factor, Kaiming-uniform at the start of each link.
        lora_B: ``(out, rank)`` factor, zero at the start of each link.
        scale: ``s = alpha / rank``.
        ranks: the ranks this link may take (a rank step-down resizes it at knots and on load).
        merge_residual: optional buffer holding what rounding the frozen weight to its own dtype
            left out of the merged updates (kept for half-precision weights so that knots are
            exact; ``None`` otherwise), shaped like the weight.
        unloaded: the link was removed from its module (:func:`~chainopt.merge_and_unload`):
            an optimizer that still holds it must not merge it again.

    Args:
        out_features: rows of ``B·A``.
        in_features: columns of ``B·A``.
        rank: rank of the link.
        alpha: LoRA alpha; the scale is ``alpha / rank``.
        dtype: dtype of the factors.
        device: device of the factors.
        residual_dtype: dtype of the merge residual buffer, or ``None`` for no buffer.
        fan_in_fan_out: the weight is stored transposed, ``(in, out)``.
        ranks: every rank the link may take (default: ``rank`` only).

    Example:
        >>> p = LoRAParametrization(4, 8, rank=2, alpha=4.0)
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
        fan_in_fan_out: bool = False,
        ranks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        shape = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        self._setup(
            out_features, in_features, rank, alpha, experts=1, fan_in_fan_out=fan_in_fan_out,
            ranks=ranks, dtype=dtype, device=device, residual=(shape, residual_dtype),
        )  # fmt: skip

    def delta(self) -> Tensor:
        """Return ``s·B·A`` in float32, shape ``(out, in)`` (transposed with ``fan_in_fan_out``)."""
        # (out, r) @ (r, in) -> (out, in)
        update = (self.lora_B.float() @ self.lora_A.float()).mul_(self.scale)
        return update.T if self.fan_in_fan_out else update

    def reset_parameters(
        self, generator: torch.Generator | None = None, init_A: Tensor | None = None
    ) -> None:
        """Start a new link in place: A Kaiming-uniform (as ``nn.Linear``) or ``init_A``, B zero.

        A is drawn on the CPU in float32 from ``generator`` and copied, so the same generator
        state gives the same factors on every device and process (see :func:`restart_links`).
        """
        restart_links([self], generator, [init_A])

    def forward(self, weight: Tensor) -> Tensor:
        """Generic path: the materialised ``W + s·B·A`` (used by readers of ``.weight``)."""
        # (out, r) @ (r, in) -> (out, in)
        update = (self.lora_B @ self.lora_A) * self.scale
        if self.fan_in_fan_out:
            update = update.T
        return weight + update.to(weight.dtype)

    def extra_repr(self) -> str:
        fifo = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return f"rank={self.rank}, alpha={self.alpha:g}{fifo}"


class BiasDelta(nn.Module):
    """A trainable delta on a module's bias, ``b ↦ b + δ``; merged and zeroed with the factors.

    Args:
        out_features: length of the bias.
        dtype: dtype of the delta.
        device: device of the delta.
        residual_dtype: dtype of the merge residual buffer, or ``None`` for no buffer.

    Example:
        >>> d = BiasDelta(3)
        >>> d(torch.ones(3)).tolist()
        [1.0, 1.0, 1.0]
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
        if not is_int(out_features) or out_features < 0:
            raise ValueError(f"out_features must be a non-negative int, got {out_features!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
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


# --- the factorised forwards of an adapted module ----------------------------------------------


def _autocast(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device. torch raises for a device autocast does not
    know (``"meta"``: a shape-only forward of a model moved there); no autocast runs there."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:
        return False


def _single_link(self: nn.Module) -> Any:
    """The module's weight ParametrizationList if chainopt's link is alone on it, else None."""
    plist = cast(Any, self).parametrizations["weight"]
    if len(plist) != 1 or in_parametrize_cache():
        return None
    return plist


def lora_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """Forward of an adapted Linear: ``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` without building ``W + s·B·A``.

    Falls back to ``F.linear(x, self.weight, self.bias)`` (the materialised weight) inside
    ``parametrize.cached()`` or with another parametrization stacked on the weight.
    """
    plist = _single_link(self)
    if plist is None:
        return F.linear(x, self.weight, self.bias)
    link = plist[0]
    a, b = link.lora_A, link.lora_B
    autocast = _autocast(x)
    if autocast or not (x.dtype == a.dtype == b.dtype):
        out = F.linear(x, plist.original, self.bias)
        h = x if x.dtype == a.dtype or autocast else x.to(a.dtype)
        # (..., in) @ (in, r) -> (..., r) @ (r, out) -> (..., out)
        lora = F.linear(F.linear(h, a), b) * link.scale
        result: Tensor = out + lora.to(out.dtype)
        return result
    # One dtype, no autocast: accumulate s·(x·Aᵀ)·Bᵀ into the base output inside one GEMM, with
    # no (rows, out) temporary for the product, the scale or the sum (4% faster than the
    # three-op form on all-linear Llama on CPU, identical losses).
    x2 = x.reshape(-1, x.shape[-1])
    z = F.linear(x2, a)  # (rows, in) @ (in, r) -> (rows, r)
    out = F.linear(x2, plist.original, self.bias)  # (rows, out), fresh; linear saves no output
    out.addmm_(z, b.t(), alpha=link.scale)  # (rows, r) @ (r, out)
    return out.view(*x.shape[:-1], out.shape[-1])


def lora_conv1d_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of an adapted transformers ``Conv1D`` (weight ``(in, out)``): ``x·W + b + LoRA``."""
    plist = _single_link(self)
    module = cast(Any, self)
    if plist is None:
        base = cast(Any, parametrize.type_before_parametrizations(self))
        generic: Tensor = base.forward(self, x)
        return generic
    link = plist[0]
    a, b = link.lora_A, link.lora_B
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.addmm(module.bias, x2, plist.original)  # (rows, in) @ (in, out)
    autocast = _autocast(x)
    if autocast or not (x.dtype == a.dtype == b.dtype):
        h = x2 if x2.dtype == a.dtype or autocast else x2.to(a.dtype)
        lora = F.linear(F.linear(h, a), b) * link.scale
        out = out + lora.to(out.dtype)
    else:
        out.addmm_(F.linear(x2, a), b.t(), alpha=link.scale)
    return out.view(*x.shape[:-1], out.shape[-1])


def lora_quantized_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of an adapted quantized layer: its own forward, plus ``s·(x·Aᵀ)·Bᵀ``.

    Nothing is dequantized here beyond what the quantized layer's forward does itself.
    """
    link = cast(Any, self).chainopt_link
    out = cast(Tensor, type(self).forward(self, x))  # the quantized layer's own forward
    a, b = link.lora_A, link.lora_B
    h = x if x.dtype == a.dtype or _autocast(x) else x.to(a.dtype)
    lora: Tensor = F.linear(F.linear(h, a), b) * link.scale  # (..., in) -> (..., r) -> (..., out)
    return out + lora.to(out.dtype)


# --- restarting links ---------------------------------------------------------------------------


@torch.no_grad()
def restart_links(
    links: Sequence[Factors],
    generator: torch.Generator | None = None,
    init_A: Sequence[Tensor | None] | None = None,
) -> None:
    """Start a new link on each of ``links`` in place: A Kaiming-uniform or given, B zero.

    The Kaiming-uniform A's (``U(-1/√in, 1/√in)``, as ``nn.Linear``) are drawn in one call on the
    CPU in float32 from ``generator``, in link order, so the same generator state gives the same
    factors on every device and process; they reach each device in one copy. A knot restarts
    every link at once through this, in a handful of batched operations.

    Args:
        links: the links to restart.
        generator: the generator to draw A from.
        init_A: per link, an A to copy instead of drawing one (``None`` entries draw).
    """
    given = list(init_A) if init_A is not None else [None] * len(links)
    drawn = [i for i, a in enumerate(given) if a is None]
    sources: list[Tensor | None] = list(given)
    if drawn:
        sizes = [links[i].lora_A.numel() for i in drawn]
        flat = torch.empty(sum(sizes), dtype=torch.float32)
        parts = torch.split(flat, sizes)
        by_device: dict[torch.device, list[int]] = {}
        for k, i in enumerate(drawn):
            # kaiming_uniform_(a=sqrt(5)); fan-in: a row of A (a convolution's in·∏kernel)
            bound = 1.0 / math.sqrt(links[i].lora_A[0].numel())
            parts[k].uniform_(-bound, bound, generator=generator)
            by_device.setdefault(links[i].lora_A.device, []).append(k)
        for device, ks in by_device.items():
            whole = flat if len(by_device) == 1 else torch.cat([parts[k] for k in ks])
            offsets = torch.split(whole.to(device), [sizes[k] for k in ks])
            for k, part in zip(ks, offsets, strict=True):
                sources[drawn[k]] = part.view(links[drawn[k]].lora_A.shape)
    sharded = [i for i, link in enumerate(links) if is_sharded(link.lora_A)]
    plain = [i for i, link in enumerate(links) if not is_sharded(link.lora_A)]
    if plain:
        foreach_copy_([links[i].lora_A for i in plain], [cast(Tensor, sources[i]) for i in plain])
        foreach_zero_([links[i].lora_B for i in plain])
    for i in sharded:
        copy_full_(links[i].lora_A, cast(Tensor, sources[i]))
        links[i].lora_B.zero_()
