"""Small checks shared by the modules that validate user input and talk to ``torch.distributed``.

Example:
    >>> is_int(3), is_int(True), is_int(3.0)
    (True, False, False)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "PARALLEL_WRAPPERS",
    "is_distributed",
    "is_int",
    "not_python_number",
    "type_name",
    "unwrap_parallel",
]

PARALLEL_WRAPPERS: tuple[type[nn.Module], ...] = (
    nn.parallel.DistributedDataParallel,
    nn.DataParallel,
)
"""Wrappers whose ``module`` attribute is the model (and whose keys carry a ``module.`` prefix)."""


FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
"""The dtypes chainopt merges into and keeps factors in (float8 has no CPU arithmetic and too few
bits to merge into)."""


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def not_python_number(value: object) -> str:
    """A note for an error message when ``value`` is a number but no Python ``int``/``float``
    (a numpy scalar, a 0-d tensor; in a list, the first such entry) or an array where a list
    was expected, else ``""``.

    Example:
        >>> import numpy as np
        >>> not_python_number(np.int64(4)), not_python_number(4)
        (' (np.int64(4) is a numpy.int64, not a Python int: pass int(...))', '')
    """
    if getattr(value, "ndim", 0) and callable(getattr(value, "tolist", None)):
        kind = type(value)
        return f" (a {kind.__module__.split('.')[0]}.{kind.__name__}, not a list: pass .tolist())"
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        kind = type(item)
        if kind in (int, float, bool) or not hasattr(item, "__float__"):
            continue
        integral = hasattr(item, "__index__") and not getattr(item, "is_floating_point", bool)()
        python = "bool" if kind.__name__ in ("bool", "bool_") else "int" if integral else "float"
        where = f"{kind.__module__.split('.')[0]}.{kind.__name__}"
        return f" ({item!r} is a {where}, not a Python {python}: pass {python}(...))"
    return ""


def is_distributed() -> bool:
    """A default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """``model`` without its DDP/DataParallel wrappers."""
    while isinstance(model, PARALLEL_WRAPPERS):
        inner = model.module
        assert isinstance(inner, nn.Module)  # DDP and DataParallel hold a module
        model = inner
    return model


def type_name(value: object) -> str:
    """``type(value).__name__``, for error messages."""
    return type(value).__name__
