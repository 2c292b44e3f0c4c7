"""The 4-bit formats chainopt can chain over: bitsandbytes ``Linear4bit`` and torchao ``NF4Tensor``.

Each backend dequantizes a module's weight to float32 and requantizes a dense weight into it in
place (the same Parameter object). Neither package is imported unless a module of its kind
exists (so it is already imported). The one private bitsandbytes function used —
``_convert_weight_packed_for_cpu_inverse``, to read a weight that ``Linear4bit`` repacked for
AVX512-BF16 CPUs — is used here only and tested by ``tests/test_quantized.py``.

Example:
    >>> import torch
    >>> backend_for(torch.nn.Linear(4, 4)) is None
    True
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ._validate import FLOAT_DTYPES

__all__ = ["Backend", "backend_for", "unsupported_quantization"]


class Backend(Protocol):
    """How to read and write one kind of quantized weight."""

    name: str

    def dequantize(self, module: nn.Module) -> Tensor:
        """The weight as float32 ``(out, in)`` on the weight's device."""

    def requantize_(self, module: nn.Module, dense: Tensor) -> None:
        """Quantize ``dense`` ``(out, in)`` into the module's weight, in place."""

    def rounded(self, module: nn.Module, dense: Tensor) -> Tensor:
        """``dense`` quantized like the module's weight and dequantized: float32 ``(out, in)``,
        what :meth:`dequantize` would give after :meth:`requantize_` of ``dense``."""

    def serialize(self, module: nn.Module, dense: Tensor) -> dict[str, Tensor]:
        """``dense`` quantized like the module's weight, as the state-dict entries (relative to
        the module's prefix: ``"weight"`` and its quantization state) the module would save."""

    def load_(self, module: nn.Module, state_dict: dict[str, Any], key: str) -> None:
        """Take the quantization state saved beside ``key`` out of ``state_dict`` (entries
        ``load_state_dict`` cannot load) and into the module; the weight itself stays."""


class _BitsAndBytes4bit:
    name = "bitsandbytes Linear4bit"

    def dequantize(self, module: nn.Module) -> Tensor:
        import bitsandbytes.functional as bnbf

        weight: Any = module.weight
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked for AVX512-BF16 CPUs
            import copy

            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        dense: Tensor = bnbf.dequantize_4bit(data, state)
        return dense.float()

    def requantize_(self, module: nn.Module, dense: Tensor) -> None:
        weight: Any = module.weight
        old = weight.quant_state
        q, state = self._quantize(module, dense)
        if weight.data.shape == q.shape and not getattr(old, "packing_format_for_cpu", False):
            weight.data.copy_(q)  # the same storage
        else:
            weight.data = q
        _set_state(weight, state)

    def _quantize(self, module: nn.Module, dense: Tensor) -> tuple[Tensor, Any]:
        import bitsandbytes.functional as bnbf

        weight: Any = module.weight
        old = weight.quant_state
        nested = bool(getattr(old, "original_nested", False) or old.nested)
        dtype = getattr(old, "original_dtype", None) or old.dtype
        q, state = bnbf.quantize_4bit(
            dense.to(device=weight.device, dtype=torch.float32),  # quantize(M), not of bf16(M)
            blocksize=old.blocksize,
            compress_statistics=nested,
            quant_type=old.quant_type,
            quant_storage=weight.quant_storage,
        )
        state.dtype = dtype  # dequantize to the dtype the layer had (its compute side)
        return q, state

    def rounded(self, module: nn.Module, dense: Tensor) -> Tensor:
        import bitsandbytes.functional as bnbf

        q, state = self._quantize(module, dense)
        out: Tensor = bnbf.dequantize_4bit(q, state)
        return out.float()

    def serialize(self, module: nn.Module, dense: Tensor) -> dict[str, Tensor]:
        q, state = self._quantize(module, dense)
        entries = {"weight": q}
        entries.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
        return entries

    def load_(self, module: nn.Module, state_dict: dict[str, Any], key: str) -> None:
        import bitsandbytes.functional as bnbf

        if key not in state_dict:
            return
        weight: Any = module.weight
        data = state_dict[key]  # load_state_dict copies the packed weight itself
        extra = {
            k[len(key) + 1 :]: state_dict.pop(k)
            for k in list(state_dict)
            if k.startswith(f"{key}.")
        }
        if not extra:
            return
        _set_state(weight, bnbf.QuantState.from_dict(extra, device=weight.device))
        if weight.data.shape != data.shape or weight.data.dtype != data.dtype:
            weight.data = data.to(weight.device)  # another packing: take it as it is


def _set_state(weight: Any, state: Any) -> None:
    weight.quant_state = state
    if getattr(weight, "module", None) is not None:
        weight.module.quant_state = state


class _TorchaoNF4:
    name = "torchao NF4Tensor"

    def dequantize(self, module: nn.Module) -> Tensor:
        dense: Tensor = module.weight.get_original_weight()  # type: ignore[operator, union-attr]
        return dense.float()

    def requantize_(self, module: nn.Module, dense: Tensor) -> None:
        weight: Any = module.weight
        with torch.no_grad():
            weight.copy_(dense.to(device=weight.device, dtype=weight.dtype))  # quantizes in place

    def rounded(self, module: nn.Module, dense: Tensor) -> Tensor:
        nf4: Any = self.serialize(module, dense)["weight"]
        out: Tensor = nf4.get_original_weight()
        return out.float()

    def serialize(self, module: nn.Module, dense: Tensor) -> dict[str, Tensor]:
        weight: Any = module.weight
        nf4 = type(weight).from_tensor(
            dense.to(device=weight.device, dtype=weight.dtype),
            weight.block_size,
            weight.scaler_block_size,
        )
        return {"weight": nf4}

    def load_(self, module: nn.Module, state_dict: dict[str, Any], key: str) -> None:
        """``load_state_dict`` copies an ``NF4Tensor`` into an ``NF4Tensor`` itself."""


def backend_for(module: nn.Module) -> Backend | None:
    """The backend for ``module``'s quantized weight, or ``None`` for a dense module."""
    bnb = sys.modules.get("bitsandbytes.nn")
    if bnb is not None and isinstance(module, bnb.Linear4bit):
        return _BitsAndBytes4bit()
    nf4 = sys.modules.get("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")
    weight = getattr(module, "weight", None)
    if nf4 is not None and isinstance(module, nn.Linear) and isinstance(weight, nf4.NF4Tensor):
        return _TorchaoNF4()
    return None


def unsupported_quantization(module: nn.Module) -> str | None:
    """Why ``module`` is a quantized layer chainopt cannot chain over, or ``None``."""
    bnb = sys.modules.get("bitsandbytes.nn")
    if bnb is not None and isinstance(module, getattr(bnb, "Linear8bitLt", ())):
        return "bitsandbytes Linear8bitLt (8-bit weights are not supported; use 4-bit)"
    weight = getattr(module, "weight", None)
    if (
        isinstance(weight, Tensor)
        and weight.dtype not in FLOAT_DTYPES
        and backend_for(module) is None
    ):
        return f"a module whose weight is {weight.dtype} ({type(weight).__name__})"
    return None
