"""Warnings for likely mistakes that are not errors: each says what happened and what to do.

- a task head (a classifier on a ``…ForSequenceClassification`` model) left frozen: it keeps its
  random initialisation unless it is in ``trainable_modules`` (PEFT's ``modules_to_save``);
- ``add_param_group`` with parameters that do not require gradients: they are never trained;
- the factors or merge residuals changed dtype after wrapping (``model.to(torch.bfloat16)``):
  the factors train in that dtype and knots lose the residual's exactness.

All are :class:`ChainLoRAWarning`, so one filter silences them.

Example:
    >>> import warnings, torch
    >>> with warnings.catch_warnings(record=True) as seen:
    ...     warnings.simplefilter("always")
    ...     warn_frozen_parameters([torch.nn.Parameter(torch.zeros(2), requires_grad=False)])
    >>> issubclass(seen[0].category, ChainLoRAWarning)
    True
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from ._record import ModuleRecord

__all__ = ["ChainLoRAWarning"]  # the public names (chainopt re-exports them); the rest is internal

_TASK_MODEL = re.compile(r"For\w*(Classification|QuestionAnswering|MultipleChoice)$")


class ChainLoRAWarning(UserWarning):
    """A likely mistake in how a chain is set up or used (see :mod:`chainopt.advice`)."""


def _warn(message: str) -> None:
    warnings.warn(message, ChainLoRAWarning, stacklevel=4)


def warn_frozen_head(model: nn.Module, modules: Sequence[str], trainable: Sequence[str]) -> None:
    """Warn if a Hugging Face task model's head is neither adapted nor trainable."""
    prefix = getattr(model, "base_model_prefix", None)
    if not _TASK_MODEL.search(type(model).__name__) or not isinstance(prefix, str):
        return
    for name, child in model.named_children():
        if name == prefix or not any(True for _ in child.parameters()):
            continue
        inside = [m for m in (*modules, *trainable) if m == name or m.startswith(f"{name}.")]
        if not inside:
            _warn(
                f"{type(model).__name__}'s head {name!r} is neither in target_modules nor in "
                f"trainable_modules: it stays frozen at its initialisation (a new head is "
                f"random); pass trainable_modules=[{name!r}] to train it (PEFT's modules_to_save)"
            )


def warn_rounding_knots() -> None:
    """Warn that ``quantized_master="none"`` requantizes at every knot."""
    _warn(
        'quantized_master="none": every knot dequantizes, adds the link and requantizes the '
        "4-bit weight, so quantization error compounds knot after knot and updates under half "
        'a quantization step are lost; quantized_master="host" keeps them (one float32 copy '
        "of each 4-bit weight in host memory)"
    )


def warn_frozen_parameters(params: Iterable[Tensor]) -> None:
    """Warn if parameters added to the optimizer do not require gradients."""
    frozen = [tuple(p.shape) for p in params if isinstance(p, Tensor) and not p.requires_grad]
    if frozen:
        _warn(
            f"add_param_group() got {len(frozen)} parameter(s) that do not require gradients "
            f"(shapes {frozen[:3]}): the chain froze them, so they are never trained; set "
            "requires_grad_(True) on them first (or pass their modules as trainable_modules)"
        )


class DtypeWatch:
    """The factors' and residuals' dtypes as the chain was built; warns once if they change.

    Args:
        records: the adapted modules.
    """

    def __init__(self, records: Sequence[ModuleRecord]) -> None:
        self._expected = {r.name: self._dtypes(r) for r in records}
        self._warned = False

    @staticmethod
    def _dtypes(r: ModuleRecord) -> tuple[torch.dtype, torch.dtype | None]:
        residual = r.link.merge_residual
        return r.link.lora_A.dtype, None if residual is None else residual.dtype

    def check(self, records: Sequence[ModuleRecord]) -> None:
        """Warn (once) if a factor or residual dtype is not what it was built with."""
        if self._warned:
            return
        for r in records:
            built, now = self._expected.get(r.name), self._dtypes(r)
            if built is not None and now != built:
                self._warned = True
                _warn(
                    f"the factors / merge residual of {r.name!r} are {now[0]} / {now[1]}, built "
                    f"as {built[0]} / {built[1]}: model.to(dtype) after wrapping casts them, so "
                    "the factors train in that dtype and knots are no longer exact; cast the "
                    "model before building the ChainLoRAOptimizer (factor_dtype= sets the "
                    "factors' dtype)"
                )
                return
