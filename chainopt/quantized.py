"""Chains over 4-bit weights (QLoRA): exact knots from a full-precision master.

A 4-bit weight cannot take a small update: an update under half a quantization step (most of a
link's, with NF4 steps of about absmax/8 per block of 64) is rounded away, and requantizing at
every knot compounds the error. So each quantized module keeps a *master* ``M`` in host memory
(float32; pinned when the weight is on CUDA; never in accelerator memory), starting from the
dequantized weight (or the original float weights, ``master_weights=``). A knot adds ``s·B·A`` to
``M`` and writes ``quantize(M)`` into the 4-bit weight in place: after any number of knots the
stored weight is ``quantize(M₀ + Σ sᵢ·Bᵢ·Aᵢ)``, rounded once. ``quantized_master="none"`` opts
into dequantize-add-requantize instead (ReLoRA's behaviour: no host memory, compounding error).

The link is a child module ``chainopt_link`` of the quantized layer (its weight is not
parametrized), and the layer's forward becomes its own forward plus ``s·(x·Aᵀ)·Bᵀ``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> quantized_weight(nn.Linear(4, 4)) is None  # not an adapted 4-bit layer
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor, nn

from ._dtensor import full_tensor
from ._marks import LINK_NAME
from ._marks import QUANTIZED as _STATE
from ._quant_backends import Backend, backend_for
from ._surgery import install_instance_forward, remove_instance_forward
from .lora import Factors, LoRAParametrization, lora_quantized_forward

__all__: list[str] = []  # the public names (chainopt re-exports them); the rest is internal

QuantizedMaster: TypeAlias = Literal["host", "none"]
"""``"host"``: a float32 master copy in host memory makes knots exact; ``"none"``: dequantize,
add and requantize in place (no extra memory, quantization error compounds)."""


class QuantizedWeight:
    """One quantized module's weight as a chain sees it: the backend and the master.

    Args:
        module: the quantized layer.
        backend: how to read and write its weight.
        master: the float32 master ``(out, in)`` (host memory), or ``None`` (``"none"``).
    """

    def __init__(self, module: nn.Module, backend: Backend, master: Tensor | None) -> None:
        self.module = module
        self.backend = backend
        self.master = master
        # the master was just restored with the optimizer's state, and the weight saved beside it
        # may load after it (load_checkpoint): keep the master through that one load
        self.restored = False

    def dense(self) -> Tensor:
        """The weight now as float32 ``(out, in)``: the master, or the dequantized weight."""
        return self.master if self.master is not None else self.backend.dequantize(self.module)

    @torch.no_grad()
    def merged(self, link: Factors) -> Tensor:
        """``dense + s·B·A`` as a new float32 tensor (on the master's device)."""
        out = self.dense().clone()
        b, a = _whole_factors(link, out.device)
        out.addmm_(b, a, alpha=link.scale)
        return out

    @torch.no_grad()
    def merge_(self, link: Factors) -> None:
        """Fold ``s·B·A`` into the weight: into the master, then ``quantize(master)``."""
        if self.master is None:
            self.backend.requantize_(self.module, self.merged(link))
            return
        b, a = _whole_factors(link, self.master.device)
        self.master.addmm_(b, a, alpha=link.scale)
        self.backend.requantize_(self.module, self.master)
        self.restored = False

    @torch.no_grad()
    def follow_loaded_weight(self, dense: Tensor | None = None, plain: bool = False) -> bool:
        """After a load wrote this layer's 4-bit weight: ``dense`` (the float weight the load
        quantized into it) becomes the master; otherwise keep the master if the weight is what
        it rounds to (or it was just restored with the optimizer's state and the load is not
        ``plain``: its link was not restarted), else restart it from the loaded weight,
        dequantized (as at construction). Returns whether the master changed.

        Without this a knot would write ``quantize(old master + link)`` over the loaded weight.
        """
        restored, self.restored = self.restored, False
        if self.master is None:
            return False
        if dense is not None:
            self.master.copy_(dense)
            return True
        if restored and not plain:
            return False
        loaded = self.backend.dequantize(self.module)
        if torch.equal(loaded, self.backend.rounded(self.module, self.master).to(loaded.device)):
            return False
        self.master.copy_(loaded)
        return True


def _whole_factors(link: Factors, device: torch.device) -> tuple[Tensor, Tensor]:
    """``B`` and ``A`` as whole float32 tensors on ``device`` (gathered when FSDP2 shards them:
    the 4-bit weight itself stays whole, ``fully_shard(..., ignored_params=...)``)."""
    b, a = full_tensor(link.lora_B.detach()), full_tensor(link.lora_A.detach())
    return b.float().to(device), a.float().to(device)


def quantized_weight(module: nn.Module) -> QuantizedWeight | None:
    """The :class:`QuantizedWeight` of an adapted quantized ``module`` (``None`` otherwise)."""
    state = module.__dict__.get(_STATE)
    return state if isinstance(state, QuantizedWeight) else None


def attach_quantized(
    module: nn.Module,
    backend: Backend,
    rank: int,
    alpha: float,
    *,
    master: QuantizedMaster,
    master_weight: Tensor | None = None,
    factor_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    ranks: tuple[int, ...] | None = None,
) -> LoRAParametrization:
    """Register a link on a quantized layer: a child ``chainopt_link`` and the forward with it.

    Args:
        module: the quantized layer (``in_features``/``out_features`` as ``nn.Linear``).
        backend: its weight's backend.
        rank: rank of the first link.
        alpha: LoRA alpha.
        master: ``"host"`` or ``"none"``.
        master_weight: the original float weights to start the master from (default: the
            dequantized weight).
        factor_dtype: the factors' dtype (default float32, as QLoRA).
        generator: generator for the initial A.
        ranks: every rank the link may take.

    Returns:
        The link.
    """
    device = next(t.device for t in module.parameters())
    link = LoRAParametrization(
        module.out_features,  # type: ignore[arg-type]
        module.in_features,  # type: ignore[arg-type]
        rank,
        alpha,
        dtype=factor_dtype or torch.float32,
        device=device,
        ranks=ranks,
    )
    link.reset_parameters(generator)
    weight: Tensor | None = None
    if master == "host":
        start = master_weight if master_weight is not None else backend.dequantize(module)
        weight = start.detach().to("cpu", torch.float32, copy=True)
        if device.type == "cuda":
            weight = weight.pin_memory()
    module.add_module(LINK_NAME, link)
    module.__dict__[_STATE] = QuantizedWeight(module, backend, weight)
    install_instance_forward(module, lora_quantized_forward)
    return link


def detach_quantized(module: nn.Module) -> None:
    """Remove the link, the master and the forward :func:`attach_quantized` added."""
    if LINK_NAME in dict(module.named_children()):
        delattr(module, LINK_NAME)
    module.__dict__.pop(_STATE, None)
    remove_instance_forward(module)


def resolve_master_weights(
    source: nn.Module | Mapping[str, Tensor] | None, model: nn.Module, names: Sequence[str]
) -> dict[str, Tensor]:
    """The original float weight of each quantized target in ``names``, from ``source``.

    Args:
        source: the original (unquantized) model, or its state dict under plain keys
            (``"….q_proj.weight"``); ``None``: start every master from the dequantized weight.
        model: the model being chained.
        names: the target modules' qualified names.

    Raises:
        TypeError: ``source`` is neither a module nor a mapping.
        ValueError: it lacks a quantized target's weight, or holds one of another shape, one
            on the meta device (no data) or one with NaN/Inf; nothing is changed.
    """
    if source is None:
        return {}
    if isinstance(source, nn.Module):
        state: Mapping[str, Any] = source.state_dict()
    elif isinstance(source, Mapping):
        state = source
    else:
        raise TypeError(
            f"master_weights must be an nn.Module or a state dict, got {type(source).__name__}"
        )
    out: dict[str, Tensor] = {}
    for name in names:
        module = model.get_submodule(name)
        if backend_for(module) is None:
            continue
        key = f"{name}.weight"
        tensor = state.get(key)
        layer: Any = module
        shape = (int(layer.out_features), int(layer.in_features))
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise ValueError(f"master_weights has no floating tensor {key!r} (plain keys)")
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"master_weights[{key!r}] has shape {tuple(tensor.shape)}, the layer's is {shape}"
            )
        if tensor.device.type == "meta":
            raise ValueError(
                f"master_weights[{key!r}] (for module {name!r}) is on the meta device: it has no "
                "data to start the master from; load the original weights first"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(
                f"master_weights[{key!r}] (for module {name!r}) holds NaN or Inf: it cannot start "
                "a master the knots merge into"
            )
        out[name] = tensor
    return out
