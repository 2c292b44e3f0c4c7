"""Choosing modules by name: PEFT-style suffixes, a regex, a predicate, or ``"all-linear"``.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential()
    >>> model.add_module("q_proj", nn.Linear(4, 4))
    >>> model.add_module("v_proj", nn.Linear(4, 4))
    >>> [name for name, _ in select_modules(model, ["q_proj"])]
    ['q_proj']
    >>> [name for name, _ in select_modules(model, "all-linear")]
    ['q_proj', 'v_proj']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import TypeAlias

from torch import nn

from .adapted import is_conv1d

__all__ = [
    "ALL_LINEAR",
    "ModuleSpec",
    "describe_spec",
    "is_linear_like",
    "linear_names",
    "matcher",
    "output_layers",
    "select_modules",
    "shared_parameters",
]

ModuleSpec: TypeAlias = str | Sequence[str] | re.Pattern[str] | Callable[[str, nn.Module], bool]
"""Names as PEFT takes them (suffixes), a compiled regex (``fullmatch`` on the name), a predicate
``(name, module) -> bool``, or ``"all-linear"``."""

ALL_LINEAR = "all-linear"
"""PEFT's shortcut: every ``nn.Linear`` / ``Conv1D`` except the output layer and any module whose
weight is shared with (tied to) another module."""


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) or a transformers ``Conv1D``: what a link can adapt."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def matcher(spec: ModuleSpec, argument: str) -> Callable[[str, nn.Module], bool]:
    """Turn ``spec`` into a predicate over ``(qualified_name, module)``.

    A string ``"q_proj"`` matches ``q_proj`` and any name ending in ``.q_proj``; a list matches
    any of its strings; a compiled regex must ``fullmatch`` the qualified name. ``"all-linear"``
    needs the model and is resolved by :func:`select_modules`.

    Args:
        spec: the user's specification.
        argument: the argument's name, for error messages.

    Raises:
        TypeError: ``spec`` is none of the accepted forms.
        ValueError: an empty list or an empty name.
    """
    if isinstance(spec, re.Pattern):
        pattern = spec
        return lambda name, _m: pattern.fullmatch(name) is not None
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Sequence) and all(isinstance(s, str) for s in spec):
        suffixes = tuple(spec)
        if not suffixes or any(not s for s in suffixes):
            raise ValueError(f"{argument} must name at least one module suffix, got {spec!r}")
        dotted = tuple("." + s for s in suffixes)
        return lambda name, _m: name in suffixes or name.endswith(dotted)
    if callable(spec):
        return spec
    raise TypeError(
        f"{argument} must be a str, a sequence of str, a compiled regex or a callable "
        f"(name, module) -> bool, got {type(spec).__name__}: {spec!r}"
    )


def describe_spec(spec: ModuleSpec) -> str | list[str]:
    """A serialisable description of ``spec`` (for configs and error messages)."""
    if isinstance(spec, re.Pattern):
        return f"re:{spec.pattern}"
    if isinstance(spec, str):
        return spec if spec == ALL_LINEAR else [spec]
    if isinstance(spec, Sequence):
        return list(spec)
    return f"callable:{getattr(spec, '__qualname__', type(spec).__name__)}"


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """Parameters reachable under more than one *module*, by ``id``: their qualified names.

    A module registered at two places is one module (adapting it once is fine); two modules
    holding one Parameter (tied embeddings and output layer) are listed here.
    """
    owners: dict[int, dict[int, str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            owners.setdefault(id(p), {}).setdefault(id(module), full)
    return {
        pid: list(by_module.values()) for pid, by_module in owners.items() if len(by_module) > 1
    }


def output_layers(model: nn.Module) -> set[int]:
    """``id`` of the model's output layer (Hugging Face ``get_output_embeddings()``), if any."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return set()
    try:
        out = get()
    except (NotImplementedError, AttributeError):
        return set()
    return {id(out)} if isinstance(out, nn.Module) else set()


def select_modules(
    model: nn.Module,
    spec: ModuleSpec,
    argument: str = "target_modules",
    exclude: Iterable[nn.Module] = (),
) -> list[tuple[str, nn.Module]]:
    """Return ``(qualified_name, module)`` for every module of ``model`` that ``spec`` matches.

    The root module (name ``""``) is never matched. Order is ``model.named_modules()`` order.
    ``"all-linear"`` takes every Linear/Conv1D but the output layer, modules whose weight is
    shared with another module, and ``exclude``.
    """
    if isinstance(spec, str) and spec == ALL_LINEAR:
        skip = output_layers(model) | {id(m) for m in exclude}
        shared = shared_parameters(model)
        return [
            (name, mod)
            for name, mod in _named(model.named_modules())
            if is_linear_like(mod)
            and id(mod) not in skip
            and id(getattr(mod, "weight", None)) not in shared
        ]
    match = matcher(spec, argument)
    return [(name, mod) for name, mod in _named(model.named_modules()) if match(name, mod)]


def linear_names(model: nn.Module, most: int = 5) -> list[str]:
    """A few names of modules a link can adapt, for error messages."""
    return [n for n, m in _named(model.named_modules()) if is_linear_like(m)][:most]


def _named(items: Iterable[tuple[str, nn.Module]]) -> Iterable[tuple[str, nn.Module]]:
    # Skip the root and parametrize's own bookkeeping modules.
    for name, mod in items:
        if name and ".parametrizations." not in f".{name}.":
            yield name, mod
