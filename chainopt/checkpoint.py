"""Checkpoints that survive a crash, portable between one process, DDP and FSDP2.

:func:`save_checkpoint` writes the model's state dict, the optimizer's state dict (for a
:class:`~chainopt.ChainLoRAOptimizer`: step and knot counters, generator, history, the wrapped
optimizer's state) and any extra entries to a temporary file next to ``path``, syncs it to
disk, renames it over ``path`` with ``os.replace`` (atomic on POSIX and Windows) and syncs the
directory. A process killed at any moment leaves the previous checkpoint or the new one, never a
torn file; at worst a stray ``.<name>.<random>.tmp`` next to it, which nothing reads and the next
successful save to ``path`` removes.
:func:`load_checkpoint` checks the file against the model and optimizer before it loads anything.

Under ``torch.distributed`` (a default process group with more than one rank) every rank calls
both. Saving is collective: sharded parameters and optimizer state (FSDP2 ``DTensor``) are
gathered whole, rank 0 writes, and no rank returns before the file is in place (or every rank
raises if rank 0 could not write it). Loading needs no communication: every rank reads the same
file (on a file system they share) and keeps its own shard. ``DistributedDataParallel`` and
``DataParallel`` wrappers are unwrapped, so the same checkpoint loads into one process, DDP or
FSDP2.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer
    >>> from chainopt.checkpoint import load_checkpoint, save_checkpoint
    >>> def build():
    ...     model = nn.Sequential(nn.Linear(4, 4))
    ...     opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                              target_modules=["0"], rank=2, knot_every=2)
    ...     return model, opt
    >>> model, opt = build()
    >>> model(torch.ones(1, 4)).sum().backward()
    >>> opt.step()
    >>> path = Path(tempfile.mkdtemp()) / "ckpt.pt"
    >>> _ = save_checkpoint(path, model, opt, epoch=3)
    >>> model2, opt2 = build()
    >>> load_checkpoint(path, model2, opt2)
    {'epoch': 3}
    >>> opt2.optimizer_steps
    1
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._atomic import write_atomically
from ._dtensor import full_tensor, gathered, is_sharded, shard_like
from ._load_guard import check_incoming_state
from ._rank_zero import on_rank_zero
from ._validate import type_name, unwrap_parallel

__all__ = ["load_checkpoint", "save_checkpoint"]

_FORMAT = "chainopt.checkpoint"
_VERSION = 1


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Optimizer | None = None,
    **extra: Any,
) -> Path:
    """Write ``model`` and ``optimizer`` state (and ``extra``) to ``path`` atomically.

    Under ``torch.distributed`` call it on every rank (it gathers shards; rank 0 writes).

    Args:
        path: the checkpoint file; its directory must exist. An existing file is replaced only
            once the new one is complete and on disk.
        model: the model (bare, or wrapped in ``DistributedDataParallel``/``DataParallel``, or
            sharded with FSDP2's ``fully_shard``).
        optimizer: its optimizer (a :class:`~chainopt.ChainLoRAOptimizer` or any other), or
            ``None`` for the model alone.
        **extra: more entries to save and get back from :func:`load_checkpoint` (an LR
            scheduler's or a ``GradScaler``'s state dict, the epoch, a data sampler's position).
            They are read back with ``weights_only=True`` by default: tensors, numbers, strings
            and containers of them.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: a wrong type for an argument, or an extra entry ``torch.save`` cannot write
            (nothing is written).
        ValueError: ``path`` is a directory.
        OSError: the file could not be written (``path`` is left as it was). Under
            ``torch.distributed`` every rank raises when rank 0 could not write.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> lin = torch.nn.Linear(2, 2)
        >>> path = save_checkpoint(Path(tempfile.mkdtemp()) / "lin.pt", lin, step=7)
        >>> sorted(torch.load(path, weights_only=True))
        ['extra', 'format', 'model', 'optimizer', 'version']
    """
    _check_arguments(path, model, optimizer)
    path = Path(path)
    bare = unwrap_parallel(model)
    model_state = bare.state_dict()
    for key, value in model_state.items():
        if is_sharded(value):  # in place: keeps the state dict's ``_metadata``
            model_state[key] = full_tensor(value).cpu()
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "model": model_state,
        "optimizer": None if optimizer is None else gathered(optimizer.state_dict()),
        "extra": gathered(dict(extra)),
    }
    on_rank_zero(
        lambda: write_atomically(path, lambda f: _save(payload, f)), f"the checkpoint {str(path)!r}"
    )
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: Optimizer | None = None,
    *,
    map_location: str | torch.device | None = "cpu",
    weights_only: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` and ``optimizer``.

    Build the model and optimizer exactly as for the run that saved it (same targets, rank,
    schedule, seed), wrap or shard them the same way or not at all, then load. Training
    continues as if it had never stopped (bitwise, on the same hardware and software).

    Args:
        path: the checkpoint file.
        model: the model to load into (bare, DDP/DataParallel-wrapped or FSDP2-sharded).
        optimizer: the optimizer to load into, or ``None`` to load the model alone.
        map_location: passed to ``torch.load``; sharded parameters take their shard wherever
            they live.
        weights_only: passed to ``torch.load``; set ``False`` only for files you trust that hold
            arbitrary Python objects in ``extra``.

    Returns:
        The ``extra`` entries given to :func:`save_checkpoint`.

    Raises:
        ValueError: the file is not a chainopt checkpoint, its keys or shapes do not fit the
            model, it holds no optimizer state but ``optimizer`` was given, or the optimizer
            refuses it (a different chain config, different param groups), or ``path`` is a
            directory. Nothing is loaded then.
        TypeError: a wrong type for an argument.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "lin.pt"
        >>> _ = save_checkpoint(path, torch.nn.Linear(2, 2), step=7)
        >>> load_checkpoint(path, torch.nn.Linear(2, 2))
        {'step': 7}
        >>> load_checkpoint(path, torch.nn.Linear(3, 2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: checkpoint ... 'weight' has shape (2, 2) there and (2, 3) in the model
    """
    _check_arguments(path, model, optimizer)
    if not isinstance(weights_only, bool):
        raise TypeError(f"weights_only must be a bool, got {weights_only!r}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:
        raise ValueError(
            f"{str(path)!r} cannot be read as a checkpoint (truncated or corrupt?): {err}"
        ) from err
    if (
        not isinstance(payload, dict)
        or payload.get("format") != _FORMAT
        or not isinstance(payload.get("model"), Mapping)
    ):
        raise ValueError(f"{str(path)!r} is not a checkpoint written by chainopt.save_checkpoint")
    if payload.get("version") != _VERSION:
        raise ValueError(
            f"{str(path)!r} is a chainopt checkpoint of version {payload.get('version')!r}; "
            f"this chainopt reads version {_VERSION}"
        )
    bare = unwrap_parallel(model)
    current = bare.state_dict()
    saved_model: dict[str, Any] = dict(payload["model"])
    _check_fits(bare, current, saved_model, path)
    saved_opt: dict[str, Any] | None = payload.get("optimizer")
    if optimizer is not None and saved_opt is None:
        raise ValueError(f"{str(path)!r} holds no optimizer state (saved with optimizer=None)")

    # The optimizer checks its own state (the chain config, the param groups) before loading
    # any of it; the model's keys and shapes were checked above, so its load cannot fail.
    if optimizer is not None and saved_opt is not None:
        optimizer.load_state_dict(_sharded_optimizer_state(saved_opt, optimizer))
    for key, value in current.items():
        if is_sharded(value):
            saved_model[key] = shard_like(saved_model[key], value)
    bare.load_state_dict(saved_model)
    extra: dict[str, Any] = dict(payload.get("extra") or {})
    return extra


def _check_arguments(path: object, model: object, optimizer: object) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type_name(path)}")
    if os.path.isdir(path):
        raise ValueError(
            f"path {os.fspath(path)!r} is a directory: give the checkpoint file's path"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type_name(model)}")
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer or None, got {type_name(optimizer)}"
        )


def _save(payload: dict[str, Any], f: Any) -> None:
    """``torch.save(payload, f)``; an entry pickle cannot write (an extra one: the model and
    optimizer states are tensors and plain containers) is a TypeError that names the extras."""
    try:
        torch.save(payload, f)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise TypeError(
            f"the checkpoint cannot be saved ({type(err).__name__}: {err}); check the extra "
            f"entries {sorted(payload['extra'])}: save state dicts, tensors, numbers, strings "
            "and containers of them"
        ) from err


def _sharded_optimizer_state(saved: dict[str, Any], optimizer: Optimizer) -> dict[str, Any]:
    """Saved (whole) optimizer state, with per-parameter tensors sharded like sharded params.

    Parameters are matched to saved state the way ``Optimizer.load_state_dict`` does: by
    position in the param groups. A state tensor shaped like its sharded parameter (momentum,
    Adam's moments) is sharded like it; anything else is left whole.
    """
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or not any(
        is_sharded(p) for g in optimizer.param_groups for p in g["params"]
    ):
        return saved
    by_index: dict[Any, Tensor] = {}
    for saved_group, group in zip(groups, optimizer.param_groups, strict=False):
        by_index.update(zip(saved_group["params"], group["params"], strict=False))
    state: dict[Any, Any] = {}
    for index, entry in saved.get("state", {}).items():
        param = by_index.get(index)
        if param is None or not is_sharded(param):
            state[index] = entry
            continue
        state[index] = {
            k: shard_like(v, param)
            if isinstance(v, Tensor) and tuple(v.shape) == tuple(param.shape)
            else v
            for k, v in entry.items()
        }
    return {**saved, "state": state}


def _check_fits(
    bare: nn.Module, current: Mapping[str, Tensor], saved: Mapping[str, Any], path: object
) -> None:
    """Raise ``ValueError`` unless ``saved`` has the model's keys and (factors aside) shapes."""
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit the model: missing keys {missing[:5]}"
            f"{' …' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{' …' if len(unexpected) > 5 else ''} (build the model and ChainLoRAOptimizer as "
            "for the run that saved it)"
        )
    # A link's factors may change rank from link to link: the link resizes itself on load,
    # to a rank it may take; everything else must have the model's shape.
    problems = check_incoming_state(bare, saved)
    if problems:
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model: {problems[0]}")
