"""The layer kinds chainopt adapts, one :class:`~chainopt._record.RecordBuilder` each.

- :class:`DenseBuilder`: ``nn.Linear`` and transformers ``Conv1D``: the link parametrizes the
  weight (:func:`chainopt._attach.attach`).
- :class:`QuantizedBuilder`: 4-bit layers (:mod:`chainopt.quantized`): a child link, a master.
- :class:`~chainopt._peft_layers.PeftBuilder`: PEFT's own LoRA layers (a ``PeftModel``): the
  link is a view of PEFT's factors (:mod:`chainopt._peft_layers`).
- :class:`~chainopt._experts.ParameterBuilder`: a bare 2-D or 3-D parameter (fused
  mixture-of-experts weights, routers; ``target_parameters``), one builder per parameter name,
  so not in :data:`BUILDERS`: :func:`find_adapted` walks each module's parametrized tensors.

:data:`BUILDERS` lists them; :func:`find_adapted` and :func:`record_of` find the records of a
model that carries links. A new layer kind is a new builder added to :data:`BUILDERS` (see
:mod:`chainopt._record` for the protocol it implements).

Marks left on a user's module here (each removed by :func:`~chainopt._attach.detach`): a
``torch.nn.utils.parametrize`` class swap with the factorised forward on that class (dense),
``module.__dict__["_chainopt_parameter_order"]`` (dense), a child ``chainopt_link`` with
``module.__dict__["_chainopt_quantized"]`` and an instance ``forward`` (4-bit); PEFT layers:
see :mod:`chainopt._peft_layers`.

Example:
    >>> from torch import nn
    >>> from chainopt._attach import attach, detach
    >>> lin = nn.Linear(8, 4)
    >>> link = attach(lin, rank=2, alpha=4.0)
    >>> record = record_of("fc", lin)
    >>> record.link is link, record.builder is BUILDERS[2]
    (True, True)
    >>> detach(lin)
    >>> type(lin) is nn.Linear
    True
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from ._attach import (
    attach,
    attach_bias_delta,
    bias_delta,
    detach,
    is_conv1d,
    original,
    plist_of,
    residual_dtype,
    stock_forward,
)
from ._experts import parameter_records
from ._marks import LINK_NAME
from ._peft_layers import PeftBuilder
from ._quant_backends import backend_for
from ._record import LinkSpec, ModuleRecord, RecordBuilder
from .lora import BiasDelta, LoRAParametrization
from .quantized import attach_quantized, quantized_weight

__all__ = [
    "BUILDERS",
    "DenseBuilder",
    "QuantizedBuilder",
    "builder_for",
    "find_adapted",
    "record_of",
]

_HALF = (torch.float16, torch.bfloat16)


def _bias_of(module: nn.Module) -> tuple[BiasDelta | None, Tensor | None]:
    delta = bias_delta(module)
    bias = original(module, "bias") if delta is not None else getattr(module, "bias", None)
    return delta, bias


class DenseBuilder:
    """``nn.Linear`` and transformers ``Conv1D``: the link parametrizes ``module.weight``."""

    def claims(self, module: nn.Module) -> bool:
        """A dense Linear or Conv1D (not a 4-bit layer)."""
        linear = isinstance(module, nn.Linear) or is_conv1d(module)
        return linear and backend_for(module) is None

    def attach(
        self,
        name: str,
        module: nn.Module,
        spec: LinkSpec,
        generator: torch.Generator,
        master: Tensor | None = None,
    ) -> ModuleRecord:
        """Factors float32 for half-precision weights (else the weight's dtype) unless
        ``spec.factor_dtype`` says otherwise; half-precision weights get a merge residual."""
        weight = module.weight
        if not isinstance(weight, Tensor):  # pragma: no cover - the config checked it
            raise TypeError(f"{name!r} has no weight tensor")
        half = weight.dtype in _HALF
        attach(
            module,
            spec.ranks[0],
            spec.alpha,
            bias=spec.lora_bias and getattr(module, "bias", None) is not None,
            factor_dtype=spec.factor_dtype or (torch.float32 if half else weight.dtype),
            residual_dtype=residual_dtype(weight.dtype, spec.exact_merge),
            generator=generator,
            ranks=spec.ranks,
            fused=stock_forward(module),
        )
        return cast(ModuleRecord, self.find(name, module))

    def find(self, name: str, module: nn.Module) -> ModuleRecord | None:
        """The record if ``module.weight`` carries chainopt's parametrization first."""
        plist = plist_of(module, "weight")
        if plist is None or not isinstance(plist[0], LoRAParametrization):
            return None
        delta, bias = _bias_of(module)
        prefix = "parametrizations.weight.0."
        return ModuleRecord(name, module, plist[0], delta, plist.original, bias, None, prefix, self)

    def detach(self, module: nn.Module) -> None:
        """See :func:`detach`."""
        detach(module)


class QuantizedBuilder:
    """4-bit layers (bitsandbytes ``Linear4bit``, torchao NF4): a child link and a master."""

    def claims(self, module: nn.Module) -> bool:
        """A layer with a supported 4-bit weight."""
        return backend_for(module) is not None

    def attach(
        self,
        name: str,
        module: nn.Module,
        spec: LinkSpec,
        generator: torch.Generator,
        master: Tensor | None = None,
    ) -> ModuleRecord:
        """A master from ``master`` (the original float weight) or the dequantized weight."""
        backend = backend_for(module)
        if backend is None:  # pragma: no cover - claims() checked it
            raise TypeError(f"{name!r} has no 4-bit weight")
        attach_quantized(
            module,
            backend,
            spec.ranks[0],
            spec.alpha,
            master=spec.quantized_master,
            master_weight=master,
            factor_dtype=spec.factor_dtype,
            generator=generator,
            ranks=spec.ranks,
        )
        if spec.lora_bias and getattr(module, "bias", None) is not None:
            attach_bias_delta(module, spec.factor_dtype or torch.float32)
        return cast(ModuleRecord, self.find(name, module))

    def find(self, name: str, module: nn.Module) -> ModuleRecord | None:
        """The record if ``module`` carries a ``chainopt_link`` child and a master."""
        quant = quantized_weight(module)
        link = getattr(module, LINK_NAME, None)
        if quant is None or not isinstance(link, LoRAParametrization):
            return None
        delta, bias = _bias_of(module)
        weight = cast(Tensor, module.weight)
        return ModuleRecord(name, module, link, delta, weight, bias, quant, f"{LINK_NAME}.", self)

    def detach(self, module: nn.Module) -> None:
        """See :func:`detach`."""
        detach(module)


BUILDERS: tuple[RecordBuilder, ...] = (PeftBuilder(), QuantizedBuilder(), DenseBuilder())
"""Every layer kind, the first that claims or finds a module wins (PEFT's own layers, then 4-bit,
then dense)."""


def builder_for(module: nn.Module) -> RecordBuilder | None:
    """The builder of ``module``'s kind (``None``: no kind chainopt adapts)."""
    return next((b for b in BUILDERS if b.claims(module)), None)


def find_adapted(model: nn.Module) -> list[ModuleRecord]:
    """Every record of ``model``, in ``named_modules`` order: a module's own (a layer's link),
    then one per adapted parameter of it (:mod:`chainopt._experts`)."""
    out = []
    for n, m in model.named_modules():
        record = next((r for b in BUILDERS if (r := b.find(n, m)) is not None), None)
        if record is not None:
            out.append(record)
        out.extend(parameter_records(n, m))  # links on bare parameters (target_parameters)
    return out


def record_of(name: str, module: nn.Module) -> ModuleRecord:
    """The record of an adapted ``module``, through its kind's builder.

    Raises:
        ValueError: ``module`` carries no chainopt link.
    """
    for builder in BUILDERS:
        record = builder.find(name, module)
        if record is not None:
            return record
    raise ValueError(f"module {name!r} ({type(module).__name__}) carries no chainopt link")
