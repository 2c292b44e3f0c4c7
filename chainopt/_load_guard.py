"""The load guard of a chained model: ``load_state_dict`` checks every key before loading any.

:func:`guard_loads` registers one ``load_state_dict`` pre-hook on the chained model (a mark
listed with the others in :mod:`chainopt._record`). Before torch loads anything the hook

1. takes a plain checkpoint's keys (``….weight``, as ``from_pretrained`` writes) as the frozen
   originals, the link restarting at zero (:func:`accept_plain_keys`), and
2. checks the whole state dict against the model (:func:`check_incoming_state`): factors of a
   rank the link may take, every other tensor of its exact shape, nothing on the meta device;
   a problem raises ``ValueError`` before any tensor is written.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=1)
    >>> check_incoming_state(model, {"0.bias": torch.zeros(3)})
    ["'0.bias' has shape (3,) there and (4,) in the model"]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._attach import plist_of
from ._layers import find_adapted
from ._marks import LOAD_GUARD
from ._quant_backends import backend_for
from ._record import Link
from .lora import BiasDelta

__all__ = ["accept_plain_keys", "check_incoming_state", "guard_loads"]


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


def accept_plain_keys(model: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> None:
    """Let a plain checkpoint (``….weight``, as ``from_pretrained`` writes) load into a chain.

    For each adapted module whose link (or bias delta) is a parametrization and whose plain weight
    (or bias) ``state_dict`` holds instead of the parametrized keys, the plain tensor becomes the
    frozen original and the link restarts at zero (A as it is, B, bias delta and residual zero):
    the model then computes exactly what the checkpoint's model computes. Edits ``state_dict`` in
    place.
    """
    for r in find_adapted(model):
        base = f"{prefix}{r.name}." if r.name else prefix
        parts: list[tuple[str, Link | BiasDelta]] = [("weight", r.link)]
        if r.delta is not None:
            parts.append(("bias", r.delta))
        for kind, part in parts:
            plist = plist_of(r.module, kind)  # only a parametrization moves the plain key (not a
            if plist is None or plist[0] is not part:  # 4-bit weight, nor another layer kind's)
                continue
            plain, stem = base + kind, f"{base}parametrizations.{kind}."
            if plain not in state_dict or stem + "original" in state_dict:
                continue
            state_dict[stem + "original"] = state_dict.pop(plain)
            tensors = (
                [("delta", part.delta)]
                if isinstance(part, BiasDelta)
                else [("lora_A", part.lora_A), ("lora_B", part.lora_B)]
            )
            for name, tensor in tensors:
                restart = tensor.detach().clone() if name == "lora_A" else torch.zeros_like(tensor)
                state_dict.setdefault(f"{stem}0.{name}", restart)
            if part.merge_residual is not None:
                state_dict.setdefault(
                    f"{stem}0.merge_residual", torch.zeros_like(part.merge_residual)
                )


def _prepare_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of a chained model: take plain keys, and check everything
    before anything is loaded."""
    accept_plain_keys(module, state_dict, prefix)
    problems = check_incoming_state(module, state_dict, prefix)
    if not problems:  # 4-bit weights their own modules cannot load (adapted or not)
        for name, layer in _quantized_layers(module):
            backend = backend_for(layer)
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
    return [(n, m) for n, m in model.named_modules() if backend_for(m) is not None]


def guard_loads(model: nn.Module) -> None:
    """Make ``model.load_state_dict`` check a chained model's keys whole before loading any."""
    if LOAD_GUARD not in model.__dict__:  # the handle: unloading removes the hook (_marks)
        handle = model.register_load_state_dict_pre_hook(_prepare_load)  # type: ignore[no-untyped-call]
        model.__dict__[LOAD_GUARD] = handle
