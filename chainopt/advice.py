"""Warnings for likely mistakes that are not errors: each says what happened and what to do.

- a task head (a classifier on a ``…ForSequenceClassification`` model) left frozen: it keeps its
  random initialisation unless it is in ``trainable_modules`` (PEFT's ``modules_to_save``);
- ``add_param_group`` with parameters that do not require gradients: they are never trained;
- and, raised instead of warned (:class:`DtypeWatch`): the weights, factors or merge residuals
  changed dtype after wrapping (``model.to(torch.bfloat16)``), which would make knots inexact.

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
    """A likely mistake in how a chain is set up or used (see :mod:`chainopt.advice`).

    A ``UserWarning``: filter it as any warning (``warnings.simplefilter("error",
    ChainLoRAWarning)`` makes it an error; a construction it stops leaves the model as it was).

    Example:
        >>> import warnings
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer, ChainLoRAWarning
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, knot_every=1)
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     opt.add_param_group({"params": [nn.Parameter(torch.zeros(2), requires_grad=False)]})
        >>> [w.category.__name__ for w in seen]
        ['ChainLoRAWarning']
    """


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
    """The weights', factors' and residuals' dtypes as the chain was built (or as
    :meth:`~chainopt.ChainLoRAOptimizer.accept_dtypes` took them); :meth:`check` raises if they
    changed.

    Args:
        records: the adapted modules.
    """

    def __init__(self, records: Sequence[ModuleRecord]) -> None:
        self._expected = {r.name: self._dtypes(r) for r in records}

    @staticmethod
    def _dtypes(r: ModuleRecord) -> tuple[torch.dtype, torch.dtype, torch.dtype | None]:
        residual = r.link.merge_residual
        return r.weight.dtype, r.link.lora_A.dtype, None if residual is None else residual.dtype

    def check(self, records: Sequence[ModuleRecord]) -> None:
        """Raise if a weight, factor or residual dtype is not what the chain was built with.

        ``model.to(dtype)`` after wrapping casts them: a float32 chain cast to bfloat16 then has
        no merge residual, and every knot rounds the weight (30 knots of a 64-wide layer lost
        5.7 times the cast-once floor, ``tests/test_advice.py``).

        Raises:
            RuntimeError: a dtype changed; nothing was changed.
        """
        for r in records:
            built, now = self._expected.get(r.name), self._dtypes(r)
            if built is not None and now != built:
                raise RuntimeError(
                    f"the weight / factors / merge residual of {r.name!r} are {now[0]} / "
                    f"{now[1]} / {now[2]}, built as {built[0]} / {built[1]} / {built[2]}: "
                    "model.to(dtype) (or .half(), .bfloat16(), ...) after wrapping cast them, "
                    "so knots would no longer be exact (a cast to half precision leaves no "
                    "merge residual: every knot rounds the weight); nothing was changed. Cast "
                    "the model before building the ChainLoRAOptimizer (factor_dtype= sets the "
                    "factors' dtype), or call opt.accept_dtypes() to train on in these dtypes"
                )
