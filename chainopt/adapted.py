"""An adapted module: registering and removing a link, and the record the knot works on.

:func:`attach` registers a :class:`~chainopt.lora.LoRAParametrization` on a module's weight (and
optionally a :class:`~chainopt.lora.BiasDelta` on its bias) through
``torch.nn.utils.parametrize`` and installs the factorised forward; :func:`detach` removes them.
An :class:`AdaptedModule` holds what a knot, a merge or an export needs of one module — its name,
the module, its link, bias delta and frozen originals — looked up once.

Example:
    >>> import torch
    >>> from torch import nn
    >>> lin = nn.Linear(8, 4)
    >>> link = attach(lin, rank=2, alpha=4.0)
    >>> record = AdaptedModule.of("fc", lin)
    >>> record.link is link, record.weight is lin.parametrizations.weight.original
    (True, True)
    >>> detach(lin)
    >>> type(lin) is nn.Linear
    True
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ._surgery import (
    install_forward,
    lora_conv1d_forward,
    lora_linear_forward,
    parameter_order,
    remove_parametrizations,
    restore_parameter_order,
)
from .lora import BiasDelta, LoRAParametrization
from .quantized import (
    LINK_NAME,
    QuantizedWeight,
    detach_quantized,
    quantized_backend,
    quantized_weight,
)

__all__ = [
    "AdaptedModule",
    "accept_plain_keys",
    "attach",
    "attach_bias_delta",
    "bias_delta",
    "check_incoming_state",
    "detach",
    "find_adapted",
    "guard_loads",
    "is_conv1d",
    "loaded_plain_weights",
    "lora_parametrization",
    "original",
    "parametrization_count",
]

_ORDER = "_chainopt_parameter_order"  # instance attribute: the module's parameter order before


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's weight-transposed Linear)."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def _plist(module: nn.Module, name: str) -> parametrize.ParametrizationList | None:
    if not parametrize.is_parametrized(module, name):
        return None
    return cast(parametrize.ParametrizationList, cast(Any, module).parametrizations[name])


def lora_parametrization(module: nn.Module) -> LoRAParametrization | None:
    """Return chainopt's link on ``module`` (``None`` if there is none).

    On ``module.weight``'s parametrizations, or the ``chainopt_link`` child of a quantized layer.
    """
    plist = _plist(module, "weight")
    if plist is not None and isinstance(plist[0], LoRAParametrization):
        return plist[0]
    child = dict(module.named_children()).get(LINK_NAME)
    return child if isinstance(child, LoRAParametrization) else None


def bias_delta(module: nn.Module) -> BiasDelta | None:
    """Return chainopt's bias delta on ``module.bias`` (``None`` if there is none)."""
    plist = _plist(module, "bias")
    if plist is not None and isinstance(plist[0], BiasDelta):
        return plist[0]
    return None


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


@dataclass(frozen=True, eq=False)
class AdaptedModule:
    """One adapted module, as the knot, merges and exports see it.

    Attributes:
        name: qualified name in the model.
        module: the module.
        link: its :class:`~chainopt.lora.LoRAParametrization`.
        delta: its :class:`~chainopt.lora.BiasDelta`, or ``None``.
        weight: the frozen weight under the link (the Parameter object; 4-bit for a quantized
            layer).
        bias: the frozen bias under the delta, or the module's plain bias, or ``None``.
        quant: a quantized layer's weight and master (:mod:`chainopt.quantized`), or ``None``.
    """

    name: str
    module: nn.Module
    link: LoRAParametrization
    delta: BiasDelta | None
    weight: Tensor
    bias: Tensor | None
    quant: QuantizedWeight | None = None

    @classmethod
    def of(cls, name: str, module: nn.Module) -> AdaptedModule:
        """Look up the parts of an adapted ``module`` once.

        Raises:
            ValueError: ``module`` carries no chainopt link.
        """
        link = lora_parametrization(module)
        if link is None:
            raise ValueError(f"module {name!r} ({type(module).__name__}) carries no chainopt link")
        delta = bias_delta(module)
        bias = original(module, "bias") if delta is not None else getattr(module, "bias", None)
        quant = quantized_weight(module)
        weight = cast(Tensor, module.weight) if quant is not None else original(module)
        return cls(name, module, link, delta, weight, bias, quant)

    def refreshed(self) -> AdaptedModule:
        """The same module looked up again (after FSDP2 replaced its Parameters)."""
        return AdaptedModule.of(self.name, self.module)

    def factors(self) -> list[nn.Parameter]:
        """A, B and the bias delta: what the optimizer trains for this module."""
        parts = [self.link.lora_A, self.link.lora_B]
        return parts + ([self.delta.delta] if self.delta is not None else [])

    @property
    def link_prefix(self) -> str:
        """Where the link's tensors sit under the module's state-dict prefix."""
        return f"{LINK_NAME}." if self.quant is not None else "parametrizations.weight.0."

    def parts(self) -> list[tuple[LoRAParametrization | BiasDelta, Tensor]]:
        """``(part, dense tensor it merges into)`` for the link and the bias delta.

        A quantized layer's link merges into its master (none with ``quantized_master="none"``).
        """
        out: list[tuple[LoRAParametrization | BiasDelta, Tensor]] = []
        if self.quant is None:
            out.append((self.link, self.weight))
        elif self.quant.master is not None:
            out.append((self.link, self.quant.master))
        if self.delta is not None and self.bias is not None:
            out.append((self.delta, self.bias))
        return out


def find_adapted(model: nn.Module) -> list[AdaptedModule]:
    """Every module of ``model`` that carries a chainopt link, in ``named_modules`` order."""
    return [
        AdaptedModule.of(n, m)
        for n, m in model.named_modules()
        if lora_parametrization(m) is not None
    ]


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
    module.__dict__[_ORDER] = parameter_order(module)
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
    order = module.__dict__.pop(_ORDER, None)
    if order is not None:
        restore_parameter_order(module, order)


def check_incoming_state(
    model: nn.Module, state_dict: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """What keeps ``state_dict`` (keys under ``prefix``) from loading into ``model`` whole.

    Every tensor for a key the model has must fit it: a link's factors of a rank the link may
    take and the right other dimensions (:meth:`~chainopt.lora.LoRAParametrization.check_factors`),
    anything else its exact shape; none on the meta device. Returns the problems (empty: fits).
    """
    current = model.state_dict()
    problems: list[str] = []
    factor_keys: set[str] = set()
    own_format = tuple(  # a quantized layer's weight: its library's format, checked by it
        f"{prefix}{n}.weight" if n else f"{prefix}weight" for n, _ in _quantized_layers(model)
    )
    for r in find_adapted(model):
        base = f"{prefix}{r.name}." if r.name else prefix
        a_key, b_key = f"{base}{r.link_prefix}lora_A", f"{base}{r.link_prefix}lora_B"
        factor_keys |= {a_key, b_key}
        if a_key in state_dict or b_key in state_dict:
            why = r.link.check_factors(state_dict.get(a_key), state_dict.get(b_key))
            if why is not None:
                problems.append(f"{r.name}: {why}")
    for key, mine in current.items():
        theirs = state_dict.get(prefix + key)
        if prefix + key in factor_keys or not isinstance(theirs, Tensor):
            continue
        if (prefix + key).startswith(own_format) and own_format:
            continue
        if theirs.is_meta and not mine.is_meta:
            problems.append(f"{key!r} is a tensor on the meta device (no data)")
        elif tuple(theirs.shape) != tuple(mine.shape):
            problems.append(
                f"{key!r} has shape {tuple(theirs.shape)} there and {tuple(mine.shape)} in the "
                "model"
            )
    return problems


def accept_plain_keys(
    model: nn.Module, state_dict: dict[str, Any], prefix: str = ""
) -> bool | None:
    """Let a plain checkpoint (``….weight``, as ``from_pretrained`` writes) load into a chain.

    For each adapted module whose plain weight (or bias) ``state_dict`` holds instead of the
    parametrized keys, the plain tensor becomes the frozen original and the link restarts at
    zero (A as it is, B, bias delta and residual zero): the model then computes exactly what the
    checkpoint's model computes. A 4-bit layer's weight without its link's keys restarts the
    link the same way (its master follows the loaded weight after the load). Edits
    ``state_dict`` in place.

    Returns:
        ``True`` when a plain tensor replaced a module's chain state (the chain's history then no
        longer describes ``W - W₀``), ``False`` when ``state_dict`` holds every adapted module's
        own link keys, ``None`` otherwise (a partial load).
    """
    replaced, complete = False, True
    for r in find_adapted(model):
        base = f"{prefix}{r.name}." if r.name else prefix
        complete = complete and f"{base}{r.link_prefix}lora_B" in state_dict
        parts: list[tuple[str, LoRAParametrization | BiasDelta]] = []
        if r.quant is None:  # a quantized layer's weight keeps its own (plain) key
            parts.append(("weight", r.link))
        else:
            replaced = _restart_quantized_link(r, state_dict, base) or replaced
        if r.delta is not None:
            parts.append(("bias", r.delta))
        for kind, part in parts:
            plain, stem = base + kind, f"{base}parametrizations.{kind}."
            if plain not in state_dict or stem + "original" in state_dict:
                continue
            replaced = True
            state_dict[stem + "original"] = state_dict.pop(plain)
            for name, tensor in part.named_parameters():
                restart = tensor.detach().clone() if name == "lora_A" else torch.zeros_like(tensor)
                state_dict.setdefault(f"{stem}0.{name}", restart)
            if part.merge_residual is not None:
                state_dict.setdefault(
                    f"{stem}0.merge_residual", torch.zeros_like(part.merge_residual)
                )
    return True if replaced else (False if complete else None)


def _restart_quantized_link(r: AdaptedModule, state_dict: dict[str, Any], base: str) -> bool:
    """A quantized layer's weight without its link's keys: the link restarts at zero (A as it
    is, B zero), as for a plain weight; the master follows the weight after the load."""
    stem = f"{base}{LINK_NAME}."
    if f"{base}weight" not in state_dict or any(
        f"{stem}{name}" in state_dict for name, _ in r.link.named_parameters()
    ):
        return False
    for name, tensor in r.link.named_parameters():
        restart = tensor.detach().clone() if name == "lora_A" else torch.zeros_like(tensor)
        state_dict[f"{stem}{name}"] = restart
    for name, buffer in r.link.named_buffers():
        state_dict.setdefault(f"{stem}{name}", torch.zeros_like(buffer))
    return True


_PLAIN = "_chainopt_plain_load"  # instance attribute: a plain checkpoint replaced chain state


def loaded_plain_weights(model: nn.Module) -> bool:
    """Whether a plain (merged) checkpoint was loaded into the chained ``model`` since its chain
    state was last loaded whole: its frozen weights then hold that checkpoint's merged weights,
    so the chain's history (the links merged since ``W₀``) no longer describes ``W - W₀``."""
    return bool(model.__dict__.get(_PLAIN))


_LOADING = "_chainopt_loading_weights"  # instance attribute: masters to settle after the load


def _prepare_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of a chained model: take plain keys, and check everything
    before anything is loaded."""
    module.__dict__.pop(_LOADING, None)
    plain = accept_plain_keys(module, state_dict, prefix)
    problems = check_incoming_state(module, state_dict, prefix)
    if not problems:  # 4-bit weights this load writes: their masters follow after it
        module.__dict__[_LOADING] = (
            plain,
            [
                r.quant
                for r in find_adapted(module)
                if r.quant is not None and f"{prefix}{r.name}.weight" in state_dict
            ],
        )
    if not problems:  # 4-bit weights their own modules cannot load (adapted or not)
        for name, layer in _quantized_layers(module):
            backend = quantized_backend(layer)
            if backend is not None:
                backend.load_(
                    layer, state_dict, f"{prefix}{name}.weight" if name else f"{prefix}weight"
                )
    if problems:
        raise ValueError(
            "state_dict does not fit the chained model; nothing was loaded: "
            + "; ".join(problems[:5])
        )


def _quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if quantized_backend(m) is not None]


_GUARDED = "_chainopt_load_guard"


def _finish_load(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook of a chained model: each 4-bit weight the load wrote and
    its host master agree again (``QuantizedWeight.follow_loaded_weight``)."""
    plain, quants = module.__dict__.pop(_LOADING, (None, ()))
    for quant in quants:
        quant.follow_loaded_weight()
    if plain:
        module.__dict__[_PLAIN] = True
    elif plain is False:
        module.__dict__.pop(_PLAIN, None)


def guard_loads(model: nn.Module) -> None:
    """Make ``model.load_state_dict`` check a chained model's keys whole before loading any,
    and keep each 4-bit weight's host master on what a load wrote into the weight."""
    if not model.__dict__.get(_GUARDED):
        model.register_load_state_dict_pre_hook(_prepare_load)  # type: ignore[no-untyped-call]
        model.register_load_state_dict_post_hook(_finish_load)  # type: ignore[no-untyped-call]
        model.__dict__[_GUARDED] = True
