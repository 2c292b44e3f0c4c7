"""The per-module record a chain works on, and the builders that make one per layer kind.

A chain sees each adapted module through one :class:`ModuleRecord`: its name, the module, its
**link** (the trainable ``s·B·A``), an optional bias delta, the frozen weight and bias under them
and, for a 4-bit layer, its master. The knot (:mod:`chainopt.knot`), the guard, the merges,
the history, the summary and the exports reach a module only through a record, never by looking
inside the module. Everything a layer kind does differently is in its :class:`RecordBuilder`.

The protocol:

- a **link** (:class:`Link`; :class:`~chainopt.lora.LoRAParametrization` is one) has Parameters
  ``lora_A`` ``(r, in)`` and ``lora_B`` ``(out, r)`` (``(r·E, in)`` and ``(out, r·E)`` for
  ``experts`` ``E`` > 1, fused experts in PEFT's layout: :mod:`chainopt._experts`), a float
  ``scale`` (``s``), ``in_features``, ``out_features``, ``fan_in_fan_out`` (the weight is
  stored ``(in, out)``), a ``merge_residual`` (``None``, or a buffer shaped like the weight;
  assignable), ``delta()`` (``s·B·A`` as a dense float32 tensor in the weight's layout),
  ``resize_(rank)`` (same Parameters, new shapes), ``check_factors(a, b)`` (why saved factors
  do not fit, or ``None``) and ``merge_problem()`` (why a merge now would change the function, or
  ``None``). A knot restarts links through ``lora_A``/``lora_B`` alone
  (:func:`chainopt.lora.restart_links`): A drawn or given, B zero.
- a **record** (:class:`ModuleRecord`) gives ``name`` (the module's qualified name, or
  ``"<module>.<param>"`` for a link on a bare parameter, whose module is then ``owner``;
  ``module_name`` is the module's either way), ``param`` (the tensor the link adapts:
  ``"weight"``, or the parameter's name), ``module``, ``link``, ``delta`` (a
  :class:`~chainopt.lora.BiasDelta` or ``None``), ``weight`` and ``bias`` (the frozen tensors,
  the Parameter objects), ``quant`` (a 4-bit layer's :class:`~chainopt.quantized.QuantizedWeight`
  or ``None``), ``link_prefix`` (where the link's tensors sit under the module's state-dict
  prefix), ``parts()`` (each ``(link or bias delta, dense tensor it merges into)``),
  ``factors()`` (what the optimizer steps), ``refreshed()`` (looked up again after FSDP2 replaced
  Parameters) and ``unload()`` (remove every mark, merging nothing).
- a **builder** (:class:`RecordBuilder`) knows one layer kind: ``claims(module)``,
  ``attach(name, module, spec, generator, master)`` (register a link, return the record),
  ``find(name, module)`` (the record of a module it adapted, or ``None``) and ``detach(module)``.
  A builder may be bound to one tensor of the module
  (:class:`~chainopt._experts.ParameterBuilder`: a module holds several adapted parameters,
  one record each; ``detach`` removes that parameter's link only).

The record names are what ``config.modules``, ``adapted_modules()``, the history, the summary
and the saved chain state are keyed by: a module's qualified name, or ``"<module>.<param>"``
for a parameter link (``target_parameters``).

To support a new layer kind, write a link class that has the attributes above (or reuse
:class:`~chainopt.lora.LoRAParametrization`) and a builder, and add the builder to
:data:`chainopt._layers.BUILDERS`. Nothing in the knot, the guard, the merges or the exports
changes.

The builders live in :mod:`chainopt._layers` and :mod:`chainopt._experts`;
:func:`~chainopt._layers.find_adapted` finds the records of a model (each module's record,
then its parameters' records).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt._layers import attach, record_of
    >>> lin = nn.Linear(8, 4)
    >>> link = attach(lin, rank=2, alpha=4.0)
    >>> record = record_of("fc", lin)
    >>> record.link is link, record.weight is lin.parametrizations.weight.original
    (True, True)
    >>> record.unload()
    >>> type(lin) is nn.Linear
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from .lora import BiasDelta, Factors
from .quantized import QuantizedMaster, QuantizedWeight

__all__ = ["Link", "LinkSpec", "ModuleRecord", "RecordBuilder"]


class Link(Factors, Protocol):
    """What a knot, a merge or an export reads and changes of a link (see the module docstring).

    ``lora_A``, ``lora_B`` and ``scale`` come from :class:`~chainopt.lora.Factors`.
    """

    merge_residual: Tensor | None
    unloaded: bool

    @property
    def experts(self) -> int:
        """``E``: matrices stacked in the factors (fused experts; 1 for a layer)."""
        ...

    @property
    def in_features(self) -> int:
        """Columns of ``B·A``."""
        ...

    @property
    def out_features(self) -> int:
        """Rows of ``B·A``."""
        ...

    @property
    def fan_in_fan_out(self) -> bool:
        """The weight is stored ``(in, out)``: the link adds ``(s·B·A)ᵀ``."""
        ...

    def delta(self) -> Tensor:
        """``s·B·A`` as a dense float32 tensor in the weight's layout."""
        ...

    def resize_(self, rank: int) -> None:
        """Change the rank in place (same Parameters, new shapes)."""
        ...

    def check_factors(self, a: object, b: object) -> str | None:
        """Why factors ``a``, ``b`` cannot be loaded into this link, or ``None``."""
        ...

    def merge_problem(self) -> str | None:
        """Why merging ``s·B·A`` into the weight now would change the model's function (the
        module's forward does not add it at the moment), or ``None``."""
        ...


@dataclass(frozen=True)
class LinkSpec:
    """What a builder needs of the chain's config to register a module's first link.

    Attributes:
        ranks: rank of each link; the first is the first link's, the others it may resize to.
        alpha: LoRA alpha.
        lora_bias: also train a delta on the module's bias (if it has one).
        factor_dtype: the factors' dtype (``None``: the builder's default).
        exact_merge: merge residuals (``None``: for half-precision weights).
        quantized_master: how knots merge into a 4-bit weight.
    """

    ranks: tuple[int, ...]
    alpha: float
    lora_bias: bool = False
    factor_dtype: torch.dtype | None = None
    exact_merge: bool | None = None
    quantized_master: QuantizedMaster = "host"


class RecordBuilder(Protocol):
    """One layer kind: how to register a link on such a module, find it again and remove it."""

    def claims(self, module: nn.Module) -> bool:
        """Whether this builder adapts ``module``."""
        ...

    def attach(
        self,
        name: str,
        module: nn.Module,
        spec: LinkSpec,
        generator: torch.Generator,
        master: Tensor | None = None,
    ) -> ModuleRecord:
        """Register the first link on ``module`` and return its record."""
        ...

    def find(self, name: str, module: nn.Module) -> ModuleRecord | None:
        """The record of ``module`` if this builder adapted it, else ``None``."""
        ...

    def detach(self, module: nn.Module) -> None:
        """Remove every mark :meth:`attach` left on ``module``; merge nothing."""
        ...


@dataclass(frozen=True, eq=False)
class ModuleRecord:
    """One adapted module, as the knot, merges and exports see it.

    Attributes:
        name: qualified name in the model.
        module: the module.
        link: its :class:`Link`.
        delta: its :class:`~chainopt.lora.BiasDelta`, or ``None``.
        weight: the frozen weight under the link (the Parameter object; 4-bit for a quantized
            layer).
        bias: the frozen bias under the delta, or the module's plain bias, or ``None``.
        quant: a quantized layer's weight and master (:mod:`chainopt.quantized`), or ``None``.
        link_prefix: where the link's tensors sit under the module's state-dict prefix.
        builder: the :class:`RecordBuilder` of the module's kind.
        param: the module's tensor the link adapts (``"weight"`` for a layer).
        owner: the module's qualified name when the record is named after a parameter
            (``"<module>.<param>"``, :mod:`chainopt._experts`); ``None``: ``name`` is the module's.
    """

    name: str
    module: nn.Module
    link: Link
    delta: BiasDelta | None
    weight: Tensor
    bias: Tensor | None
    quant: QuantizedWeight | None
    link_prefix: str
    builder: RecordBuilder
    param: str = "weight"
    owner: str | None = None

    @property
    def module_name(self) -> str:
        """The module's qualified name: where its state-dict keys sit."""
        return self.name if self.owner is None else self.owner

    def refreshed(self) -> ModuleRecord:
        """The same module looked up again (after FSDP2 replaced its Parameters)."""
        record = self.builder.find(self.name, self.module)
        if record is None:  # pragma: no cover - a chained module keeps its link
            raise ValueError(f"module {self.name!r} lost its chainopt link")
        return record

    def attached(self) -> bool:
        """Whether the module still carries this record's link (no unload removed it since)."""
        if self.link.unloaded:
            return False
        found = self.builder.find(self.name, self.module)
        return found is not None and found.link is self.link

    def unload(self) -> None:
        """Remove the link and every other mark from the module (merge first: nothing is)."""
        self.builder.detach(self.module)

    def factors(self) -> list[nn.Parameter]:
        """A, B and the bias delta: what the optimizer trains for this module."""
        parts = [self.link.lora_A, self.link.lora_B]
        return parts + ([self.delta.delta] if self.delta is not None else [])

    def parts(self) -> list[tuple[Link | BiasDelta, Tensor]]:
        """``(part, dense tensor it merges into)`` for the link and the bias delta.

        A quantized layer's link merges into its master (none with ``quantized_master="none"``).
        """
        out: list[tuple[Link | BiasDelta, Tensor]] = []
        if self.quant is None:
            out.append((self.link, self.weight))
        elif self.quant.master is not None:
            out.append((self.link, self.quant.master))
        if self.delta is not None and self.bias is not None:
            out.append((self.delta, self.bias))
        return out
