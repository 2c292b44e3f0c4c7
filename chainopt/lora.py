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
import sys
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

__all__ = [
    "BiasDelta",
    "LoRAParametrization",
    "attach",
    "bias_delta",
    "copy_full_",
    "detach",
    "full_tensor",
    "is_sharded",
    "lora_parametrization",
    "original",
    "parametrization_count",
    "reset_links",
    "shard_like",
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

    def reset_parameters(
        self, generator: torch.Generator | None = None, init_A: Tensor | None = None
    ) -> None:
        """Start a new link in place: A Kaiming-uniform (as ``nn.Linear``) or ``init_A``, B zero.

        A is drawn on the CPU in float32 from ``generator`` and copied, so the same generator
        state gives the same factors on every device and process (see :func:`reset_links`).
        """
        reset_links([self], generator, [init_A])

    def resize_(self, rank: int) -> None:
        """Change the link's rank in place (same Parameter objects, new shapes; B·A becomes 0).

        The scale becomes ``alpha / rank``. References held by optimizers and schedulers stay
        valid, but any optimizer state for the factors must be dropped by the caller.
        """
        if rank == self.rank:
            return
        for p, shape in (
            (self.lora_A, (rank, self.lora_A.shape[1])),
            (self.lora_B, (self.lora_B.shape[0], rank)),
        ):
            _set_shape_(p, shape)
        self.rank = rank
        self.scale = self.alpha / rank

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A checkpoint taken in a later link of a rank step-down holds factors of another rank.
        incoming = state_dict.get(prefix + "lora_A")
        if isinstance(incoming, Tensor) and incoming.dim() == 2:
            self.resize_(incoming.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args)

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


@torch.no_grad()
def reset_links(
    links: Sequence[LoRAParametrization],
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
            bound = 1.0 / math.sqrt(links[i].lora_A.shape[1])  # kaiming_uniform_(a=sqrt(5))
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
        torch._foreach_copy_(
            [links[i].lora_A for i in plain], [cast(Tensor, sources[i]) for i in plain]
        )
        torch._foreach_zero_([links[i].lora_B for i in plain])
    for i in sharded:
        copy_full_(links[i].lora_A, cast(Tensor, sources[i]))
        links[i].lora_B.zero_()


def _set_shape_(param: nn.Parameter, shape: tuple[int, int]) -> None:
    """Give ``param`` new zero data of ``shape``, keeping the Parameter object.

    A graph the caller still holds (a ``loss`` variable) keeps the parameter's gradient
    accumulator alive, and autograd reuses it with the old shape: assigning ``.data`` of another
    dtype first makes autograd drop it (it only does so on a dtype or device change).
    """
    fresh = torch.zeros(shape, dtype=param.dtype, device=param.device)
    other = torch.float64 if param.dtype != torch.float64 else torch.float32
    param.data = fresh.new_zeros((), dtype=other)
    param.data = fresh


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


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor``, e.g. a parameter sharded by FSDP2's ``fully_shard``."""
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor can exist: skip the import
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensor(tensor: Tensor) -> Tensor:
    """The whole of ``tensor``: a ``DTensor`` is all-gathered, anything else returned as it is.

    Gathering is a collective: under FSDP2 every rank must call this, in the same order.

    Example:
        >>> t = torch.ones(2, 3)
        >>> full_tensor(t) is t
        True
    """
    if is_sharded(tensor):
        whole: Tensor = tensor.full_tensor()  # type: ignore[attr-defined]
        return whole
    return tensor


def copy_full_(dst: Tensor, src: Tensor) -> Tensor:
    """``dst.copy_(src)`` from a whole ``src``; into a ``DTensor`` only the local part is copied.

    Every rank holds the same ``src`` (drawn from the same generator, merged from the same
    gathered tensors), so each takes its own shard of it without communicating.

    Example:
        >>> dst = torch.zeros(2)
        >>> copy_full_(dst, torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return dst.copy_(shard_like(src, dst) if is_sharded(dst) else src)


def shard_like(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of ``whole``, as a ``DTensor`` laid out like ``like`` (no communication).

    Every rank must hold the same ``whole``; each keeps its own part. ``like`` must be a DTensor.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        raise TypeError(f"like must be a DTensor, got {type(like).__name__}")
    shard: Tensor = distribute_tensor(
        whole.to(like.device), like.device_mesh, like.placements, src_data_rank=None
    )
    return shard


def _lora_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """Forward of an adapted Linear: ``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` without building ``W + s·B·A``."""
    plists = cast(nn.ModuleDict, self.parametrizations)
    plist = cast(parametrize.ParametrizationList, plists["weight"])
    if len(plist) != 1 or parametrize._cache_enabled:
        return F.linear(x, self.weight, self.bias)
    link = cast(LoRAParametrization, plist[0])
    a, b = link.lora_A, link.lora_B
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast or not (x.dtype == a.dtype == b.dtype):
        out = F.linear(x, plist.original, self.bias)
        h = x if x.dtype == a.dtype or autocast else x.to(a.dtype)
        # (..., in) @ (in, r) -> (..., r) @ (r, out) -> (..., out)
        lora = F.linear(F.linear(h, a), b) * link.scale
        result: Tensor = out + lora.to(out.dtype)
        return result
    # One dtype, no autocast: accumulate s·(x·Aᵀ)·Bᵀ into the base output inside one GEMM, with
    # no (rows, out) temporary for the product, the scale or the sum (bench/ab_forward.py: 4%
    # faster than the three-op form on all-linear Llama, identical losses).
    x2 = x.reshape(-1, x.shape[-1])
    z = F.linear(x2, a)  # (rows, in) @ (in, r) -> (rows, r)
    out = F.linear(x2, plist.original, self.bias)  # (rows, out), fresh; linear saves no output
    out.addmm_(z, b.t(), alpha=link.scale)  # (rows, r) @ (r, out)
    return out.view(*x.shape[:-1], out.shape[-1])


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
