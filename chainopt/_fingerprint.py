"""A fingerprint of the frozen tensors under a chain's links: do the model's weights match a state?

A chain's saved state (its history) describes the frozen weights it was saved with: ``W - W₀`` is
the links it merged. Loaded beside other weights (the optimizer state of one run and the model of
another, or the optimizer state alone into a fresh model), the history no longer describes the
model, and an adapter written from it would compute another model. The state carries this
fingerprint of the weights it was saved with, so that a load can tell (see
:mod:`chainopt._load_guard`): per adapted module, the float64 sum and sum of squares of each
tensor a link merges into (the weight, a 4-bit layer's master, a bias under a delta). Sharded
tensors (FSDP2) are left out: each rank holds another part.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=10)
    >>> saved = fingerprint(opt.chain.records)
    >>> same_weights(saved, fingerprint(opt.chain.records))
    True
    >>> with torch.no_grad():
    ...     _ = model[0].parametrizations.weight.original.add_(1e-3)
    >>> same_weights(saved, fingerprint(opt.chain.records))
    False
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ._dtensor import is_sharded
from ._record import ModuleRecord

__all__ = ["check_fingerprint", "fingerprint", "same_weights"]

Fingerprint = dict[str, list[float]]
"""Per adapted module: ``[sum, sum of squares]`` of each tensor a link merges into, in order."""

_RELATIVE = (
    1e-9  # float64 sums of the same float32 values, reduced in another order, agree to ~1e-15
)


def fingerprint(records: Sequence[ModuleRecord]) -> Fingerprint:
    """The fingerprint of the frozen tensors under ``records``' links (sharded ones left out)."""
    out: Fingerprint = {}
    for r in records:
        values: list[float] = []
        for _part, tensor in r.parts():
            if is_sharded(tensor) or tensor.is_meta:
                continue
            t = tensor.detach()
            values += [
                float(torch.sum(t, dtype=torch.float64)),
                float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2,
            ]
        if values:
            out[r.name] = values
    return out


def same_weights(saved: Fingerprint, now: Fingerprint) -> bool:
    """Whether ``now`` matches ``saved`` on every module both hold (to float64 rounding)."""
    for name, values in saved.items():
        current = now.get(name)
        if current is None or len(current) != len(values):
            continue  # sharded now, or a tensor that is not there: nothing to compare
        for a, b in zip(values, current, strict=True):
            if not math.isclose(a, b, rel_tol=_RELATIVE, abs_tol=_RELATIVE):
                return False
    return True


def check_fingerprint(saved: object, records: Sequence[ModuleRecord]) -> Fingerprint | None:
    """A saved fingerprint, checked: ``None`` when the state has none (saved before it existed).

    Raises:
        ValueError: not a dict of module names to lists of finite floats, or a name that is not
            one of ``records``.
    """
    if saved is None:
        return None
    names = {r.name for r in records}
    if not isinstance(saved, dict) or not all(
        isinstance(k, str)
        and k in names
        and isinstance(v, list)
        and all(isinstance(x, float) and math.isfinite(x) for x in v)
        for k, v in saved.items()
    ):
        raise ValueError(
            "state_dict['chainopt']['weights'] must map the chain's module names to lists of "
            f"finite floats (the frozen weights' fingerprint), got {saved!r:.200}"
        )
    return dict(saved)
