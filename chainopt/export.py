"""Leaving the chain: merge into plain ``nn.Linear`` modules, or read plain-key state dicts.

A parametrized model's ``state_dict()`` holds ``….parametrizations.weight.original`` and the
factors; a loader that expects ``….weight`` (``from_pretrained``, a serving stack) silently ignores
those keys. :func:`merged_state_dict` gives the plain keys with every link merged, without touching
the model; :func:`merge_and_unload` turns the model itself back into plain modules.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer, merged_state_dict
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=10)
    >>> sorted(merged_state_dict(model))
    ['0.bias', '0.weight', '2.bias', '2.weight']
"""

from __future__ import annotations

from torch import Tensor, nn

from .lora import detach, lora_parametrization, parametrization_count
from .merge import (
    NonFiniteUpdateError,
    find_non_finite,
    merge_into_weight,
    merged_bias,
    merged_weight,
)

__all__ = ["adapted_modules", "merge_and_unload", "merged_state_dict"]


def adapted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified_name, module)`` for every module of ``model`` that carries a chainopt link."""
    return [(n, m) for n, m in model.named_modules() if lora_parametrization(m) is not None]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every pending link into its weight and remove chainopt's parametrizations.

    Works on any model carrying chainopt links, a ``copy.deepcopy`` of a wrapped model included.
    The modules become plain ``nn.Linear`` again and keep their Parameter objects.

    Returns:
        ``model`` itself.

    Raises:
        NonFiniteUpdateError: a link holds NaN/Inf; nothing was changed.
    """
    modules = adapted_modules(model)
    bad = find_non_finite(modules)
    if bad:
        raise NonFiniteUpdateError(
            f"non-finite LoRA factors in {bad}; refusing to merge them (no weight was changed)"
        )
    for _name, module in modules:
        merge_into_weight(module)
        detach(module)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` under plain keys, with every pending link merged.

    The model is not changed. ``….parametrizations.weight.original`` becomes ``….weight`` holding
    ``W + s·B·A`` (and the bias its delta); factor and residual entries are dropped. Other entries
    are passed through unchanged, in order.
    """
    state = model.state_dict()
    plain: dict[str, Tensor] = {}
    owned: list[str] = []
    for name, module in adapted_modules(model):
        prefix = f"{name}." if name else ""
        owned.append(f"{prefix}parametrizations.")
        # With another parametrization stacked after ours, only the whole stack is the weight.
        stacked = parametrization_count(module) > 1
        weight = _current(module) if stacked else merged_weight(module)
        plain[f"{prefix}parametrizations.weight.original"] = weight
        bias = merged_bias(module)
        if bias is not None:
            plain[f"{prefix}parametrizations.bias.original"] = bias
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in plain:
            head, _, tail = key.partition("parametrizations.")
            out[head + tail.partition(".")[0]] = plain[key]
        elif not key.startswith(tuple(owned)):
            out[key] = value
    return out


def _current(module: nn.Module) -> Tensor:
    weight: Tensor = getattr(module, "weight")  # noqa: B009 - evaluates the parametrizations
    return weight.detach().clone()
