"""Links on bare parameters: fused mixture-of-experts weights and routers (``target_parameters``).

transformers 5 stores the experts of Mixtral, Qwen3-MoE, OLMoE, GPT-OSS as fused 3-D
``nn.Parameter``\\ s of an experts module (Mixtral: ``gate_up_proj`` ``(E, 2F, H)`` and
``down_proj`` ``(E, H, F)``), whose forward reads them whole (transformers' default
``grouped_mm``) or one expert at a time (``"eager"``: ``self.gate_up_proj[e]``); the router
keeps a bare 2-D ``weight``. No ``nn.Linear`` holds them,
so ``target_modules`` cannot name them; ``target_parameters`` (as PEFT's option of that name)
does. A :class:`ParameterLink` is registered on the parameter through
``torch.nn.utils.parametrize``, so every reader of ``module.<param>`` sees ``W + Δ``:

- a 3-D parameter of ``E`` experts, stored ``(E, out, in)`` (or ``(E, in, out)`` when the
  module says ``is_transposed = True``, PEFT's rule), has one pair of factors in PEFT's
  ``ParamWrapper`` layout: ``lora_A`` ``(r·E, in)`` expert by expert, ``lora_B`` ``(out, r·E)``
  interleaved (column ``j·E + e``), ``s = alpha / r``; expert ``e``'s slice gets
  ``s·Bₑ·Aₑ`` (:func:`split_experts`), so a knot merges each expert exactly and the factors
  export to a PEFT adapter as they are;
- a 2-D parameter ``(out, in)`` is a plain link (``E = 1``).

The link implements the record protocol of :mod:`chainopt._record`: the knot, the guard, the
merges, restarts (A Kaiming-uniform on the ``(r·E, in)`` matrix, B zero), rank step-down,
history, state dicts, unloading and exports see it like any other link. One record per adapted
parameter, named ``"<module name>.<parameter name>"`` (a module may hold two);
:func:`parameter_records` finds them.

An eager experts forward indexes the parameter once per expert: without a cache,
``parametrize`` would compute the whole ``W + Δ`` each time (once per expert hit,
``tests/test_experts.py`` counts it). The module's forward therefore runs
inside ``torch.nn.utils.parametrize.cached()`` (as PEFT's ``ParamWrapper`` does), so ``W + Δ``
is computed once per forward and gradients reach the factors through it. The cached forward
sits on the module's own class that ``parametrize`` made (as the dense layers' factorised
forward does), so a ``copy.deepcopy`` of the module shares it and unloading drops it with the
class; it calls the class after that one in the module's MRO (FSDP2's ``fully_shard`` of the
experts module puts a class of its own first), and ``torch.compile(fullgraph=True)`` traces it.

Marks (listed in :mod:`chainopt._marks`, removed by :meth:`ParameterBuilder.detach`): the
``parametrize`` class swap with ``parametrizations.<param>``, the cached forward on that class,
and ``module.__dict__[PARAMETER_ORDER]``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> experts = nn.Module()
    >>> experts.w = nn.Parameter(torch.randn(3, 4, 5))  # 3 experts of (out=4, in=5)
    >>> spec = LinkSpec(ranks=(2,), alpha=4.0)
    >>> record = ParameterBuilder("w").attach("w", experts, spec, torch.Generator())
    >>> tuple(record.link.lora_A.shape), tuple(record.link.lora_B.shape), record.link.scale
    ((6, 5), (4, 6), 2.0)
    >>> with torch.no_grad():
    ...     _ = record.link.lora_B.fill_(0.1)
    >>> torch.allclose(experts.w, record.weight + record.link.delta())
    True
    >>> record.unload()
    >>> type(experts) is nn.Module, isinstance(experts.w, nn.Parameter)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._attach import plist_of, residual_dtype
from ._marks import PARAMETER_ORDER
from ._record import LinkSpec, ModuleRecord
from ._surgery import (
    install_forward,
    parameter_order,
    remove_parametrizations,
    restore_parameter_order,
)
from .lora import LinkModule, restart_links

__all__ = [
    "ParameterBuilder",
    "ParameterLink",
    "cached_forward",
    "expert_delta",
    "parameter_features",
    "parameter_records",
    "split_experts",
]

_HALF = (torch.float16, torch.bfloat16)


def split_experts(lora_A: Tensor, lora_B: Tensor, experts: int) -> tuple[Tensor, Tensor]:
    """PEFT's fused-experts factors as per-expert stacks (views; differentiable).

    Args:
        lora_A: ``(r·E, in)``, expert by expert.
        lora_B: ``(out, r·E)``, interleaved (column ``j·E + e``).
        experts: ``E``.

    Returns:
        ``(Bₑ)`` ``(E, out, r)`` and ``(Aₑ)`` ``(E, r, in)``.
    """
    a = lora_A.reshape(experts, -1, lora_A.shape[-1])  # (E, r, in)
    b = lora_B.reshape(lora_B.shape[0], -1, experts)  # (out, r, E)
    return b.permute(2, 0, 1), a


def expert_delta(
    lora_A: Tensor, lora_B: Tensor, experts: int, scale: float, transposed: bool
) -> Tensor:
    """``s·Bₑ·Aₑ`` of every expert in float32, stacked ``(E, out, in)`` (``(E, in, out)``,
    each transposed, with ``transposed``)."""
    b_e, a_e = split_experts(lora_A.detach().float(), lora_B.detach().float(), experts)
    update = torch.bmm(b_e, a_e).mul_(scale)  # (E, out, r) @ (E, r, in) -> (E, out, in)
    return update.mT if transposed else update


def parameter_features(module: nn.Module, param: Tensor) -> tuple[int, int, int, bool]:
    """``(experts, in, out, transposed)`` of a 2-D or 3-D parameter of ``module``, as PEFT's
    ``ParamWrapper`` reads them: ``(out, in)``; ``(E, out, in)``; ``(E, in, out)`` when
    ``module.is_transposed`` is true."""
    if param.dim() == 2:
        return 1, int(param.shape[1]), int(param.shape[0]), False
    transposed = bool(getattr(module, "is_transposed", False))
    e, first, second = (int(s) for s in param.shape)
    return (e, first, second, True) if transposed else (e, second, first, False)


class ParameterLink(LinkModule):
    """One link of the chain on a bare 2-D or 3-D parameter: ``W ↦ W + Δ``.

    For ``E`` experts (a 3-D parameter), ``Δ`` holds ``s·Bₑ·Aₑ`` in expert ``e``'s slice,
    transposed when the parameter is stored ``(E, in, out)`` (``fan_in_fan_out``); the factors
    are PEFT's ``ParamWrapper``'s, ``lora_A`` ``(r·E, in)`` and ``lora_B`` ``(out, r·E)``. A
    2-D parameter ``(out, in)`` has ``E = 1``: ``Δ = s·B·A``.

    Attributes:
        lora_A: ``(rank·E, in)``, Kaiming-uniform at the start of each link.
        lora_B: ``(out, rank·E)``, zero at the start of each link.
        experts: ``E`` (1 for a 2-D parameter).
        scale: ``s = alpha / rank``.
        ranks: the ranks this link may take (rank step-down).
        merge_residual: what rounding a half-precision parameter left out of the merged
            updates (shaped like the parameter), or ``None``.
        unloaded: the link was removed from its module.
        read_in_owner: the parametrized tensor was read while its module's own forward ran
            (where PEFT's ``ParamWrapper`` applies its LoRA).
        read_elsewhere: it was read outside that forward (DBRX's experts module reads its
            child's ``mlp.w1`` itself; or a user looked at it).

    Args:
        shape: the parameter's shape.
        rank: rank of each expert's link.
        alpha: LoRA alpha; the scale is ``alpha / rank``.
        transposed: a 3-D parameter is stored ``(E, in, out)``.
        dtype: dtype of the factors.
        device: device of the factors.
        residual_dtype: dtype of the merge residual buffer, or ``None`` for no buffer.
        ranks: every rank the link may take (default: ``rank`` only).

    Example:
        >>> link = ParameterLink((3, 4, 5), rank=2, alpha=4.0)
        >>> link.experts, link.out_features, link.in_features, tuple(link.lora_B.shape)
        (3, 4, 5, (4, 6))
    """

    merge_residual: Tensor | None

    def __init__(
        self,
        shape: Sequence[int],
        rank: int,
        alpha: float,
        *,
        transposed: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        residual_dtype: torch.dtype | None = None,
        ranks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) == 3:
            e, first, second = shape
            out_features, in_features = (second, first) if transposed else (first, second)
        else:
            e, (out_features, in_features), transposed = 1, shape, False
        self.shape = shape
        self.in_owner = False  # set by cached_forward while the module's forward runs
        self.read_in_owner = False
        self.read_elsewhere = False
        self._setup(
            out_features, in_features, rank, alpha, experts=e, fan_in_fan_out=transposed,
            ranks=ranks, dtype=dtype, device=device, residual=(shape, residual_dtype),
        )  # fmt: skip

    def delta(self) -> Tensor:
        """``Δ`` in float32, shaped like the parameter."""
        if len(self.shape) == 3:
            return expert_delta(
                self.lora_A, self.lora_B, self.experts, self.scale, self.fan_in_fan_out
            )
        # (out, r) @ (r, in) -> (out, in)
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()).mul_(self.scale)

    def forward(self, weight: Tensor) -> Tensor:
        """``W + Δ`` in the parameter's dtype (differentiable in the factors)."""
        # where it is read decides whether PEFT can serve it (the export); written without
        # reading the flag first: torch.compile would guard on the value read and recompile the
        # whole model once it changed
        if self.in_owner:
            self.read_in_owner = True
        else:
            self.read_elsewhere = True
        a, b = self.lora_A.to(weight.dtype), self.lora_B.to(weight.dtype)
        if len(self.shape) == 2:
            return torch.addmm(weight, b, a, alpha=self.scale)  # (out, r) @ (r, in)
        b_e, a_e = split_experts(a, b, self.experts)
        if self.fan_in_fan_out:  # (E, in, r) @ (E, r, out)
            return torch.baddbmm(weight, a_e.mT, b_e.mT, alpha=self.scale)
        return torch.baddbmm(weight, b_e, a_e, alpha=self.scale)  # (E, out, r) @ (E, r, in)

    def extra_repr(self) -> str:
        layout = ", transposed=True" if self.fan_in_fan_out else ""
        return f"experts={self.experts}, rank={self.rank}, alpha={self.alpha:g}{layout}"


def cached_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Forward of a module with parameter links: its own, inside ``parametrize.cached()``, so
    each ``W + Δ`` is computed once per forward however often the forward reads it; its links
    note that they are read here (``in_owner``) rather than by another module."""
    # The module's own class comes after the class parametrize made (the one holding this
    # forward), wherever that is: FSDP2's fully_shard puts a class of its own first. No
    # typing.cast: under torch.compile a class returned by a call has no source, and
    # transformers' experts forward breaks the graph.
    mro = type(self).__mro__
    i = max(i for i, cls in enumerate(mro) if getattr(cls, "forward", None) is cached_forward)
    base: Any = mro[i + 1]
    plists = cast(nn.ModuleDict, cast(Any, self).parametrizations)
    firsts = [cast(Any, plist)[0] for plist in plists.values()]
    links = [link for link in firsts if isinstance(link, ParameterLink)]
    for link in links:
        link.in_owner = True
    try:
        with parametrize.cached():
            return base.forward(self, *args, **kwargs)
    finally:
        for link in links:
            link.in_owner = False


def _links(module: nn.Module) -> list[str]:
    """Names of ``module``'s tensors whose first parametrization is a :class:`ParameterLink`."""
    if not parametrize.is_parametrized(module):
        return []
    plists = cast(nn.ModuleDict, cast(Any, module).parametrizations)
    return [n for n, plist in plists.items() if isinstance(cast(Any, plist)[0], ParameterLink)]


def _owner(name: str, param: str) -> str:
    """The module's qualified name in a record named ``"<module>.<param>"``."""
    return name[: len(name) - len(param)].rstrip(".")


class ParameterBuilder:
    """The record builder of one named parameter (see :mod:`chainopt._record`).

    Bound to a parameter name: a module may hold several adapted parameters, each its own
    record (named ``"<module name>.<param>"``), attached, found and detached alone.

    Args:
        param: the parameter's name on its module (``"gate_up_proj"``).
    """

    def __init__(self, param: str) -> None:
        self.param = param

    def claims(self, module: nn.Module) -> bool:
        """``module`` holds a plain floating 2-D or 3-D Parameter of this name."""
        p = dict(module.named_parameters(recurse=False)).get(self.param)
        return isinstance(p, Tensor) and p.is_floating_point() and p.dim() in (2, 3)

    def attach(
        self,
        name: str,
        module: nn.Module,
        spec: LinkSpec,
        generator: torch.Generator,
        master: Tensor | None = None,
    ) -> ModuleRecord:
        """Register the first link on ``module.<param>`` (the config checked it); factors
        float32 for a half-precision parameter (else its dtype) unless ``spec.factor_dtype``."""
        weight = cast(Tensor, getattr(module, self.param))
        _e, _in, _out, transposed = parameter_features(module, weight)
        half = weight.dtype in _HALF
        link = ParameterLink(
            weight.shape,
            spec.ranks[0],
            spec.alpha,
            transposed=transposed,
            dtype=spec.factor_dtype or (torch.float32 if half else weight.dtype),
            device=weight.device,
            residual_dtype=residual_dtype(weight.dtype, spec.exact_merge),
            ranks=spec.ranks,
        )
        restart_links([link], generator)
        module.__dict__.setdefault(PARAMETER_ORDER, parameter_order(module))
        parametrize.register_parametrization(module, self.param, link)
        link.read_elsewhere = False  # (parametrize read it once to check it)
        install_forward(module, cached_forward)
        return cast(ModuleRecord, self.find(name, module))

    def find(self, name: str, module: nn.Module) -> ModuleRecord | None:
        """The record if ``module.<param>`` carries a :class:`ParameterLink` first."""
        plist = plist_of(module, self.param)
        if plist is None or not isinstance(plist[0], ParameterLink):
            return None
        link, prefix = plist[0], f"parametrizations.{self.param}.0."
        owner = _owner(name, self.param)
        return ModuleRecord(
            name, module, link, None, plist.original, None, None, prefix, self, self.param, owner
        )

    def detach(self, module: nn.Module) -> None:
        """Remove this parameter's link (merging nothing); the module's other parameter links
        stay. With the last one the cached forward and the parameter order mark go too."""
        plist = plist_of(module, self.param)
        if plist is None or not isinstance(plist[0], ParameterLink):
            return
        link = plist[0]
        link.unloaded = True
        remove_parametrizations(module, lambda p: p is link, cached_forward)
        if _links(module):  # another parameter's link: its forward stays cached
            install_forward(module, cached_forward)
            return
        order = module.__dict__.pop(PARAMETER_ORDER, None)
        if order is not None:
            restore_parameter_order(module, order)


def parameter_records(name: str, module: nn.Module) -> list[ModuleRecord]:
    """The records of ``module``'s adapted parameters (``name``: the module's qualified name),
    in registration order."""
    out = []
    for param in _links(module):
        record = ParameterBuilder(param).find(f"{name}.{param}" if name else param, module)
        if record is not None:
            out.append(record)
    return out
