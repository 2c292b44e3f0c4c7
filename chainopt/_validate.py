"""Small checks shared by the modules that validate user input and talk to ``torch.distributed``.

Example:
    >>> is_int(3), is_int(True), is_int(3.0)
    (True, False, False)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["PARALLEL_WRAPPERS", "is_distributed", "is_int", "type_name", "unwrap_parallel"]

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
