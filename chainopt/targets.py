"""Choosing modules by name: PEFT-style suffixes, a regex, or a predicate.

Example:
    >>> from torch import nn
    >>> from chainopt.targets import select_modules
    >>> model = nn.Sequential()
    >>> model.add_module("q_proj", nn.Linear(4, 4))
    >>> model.add_module("v_proj", nn.Linear(4, 4))
    >>> [name for name, _ in select_modules(model, ["q_proj"])]
    ['q_proj']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import TypeAlias

from torch import nn

__all__ = ["ModuleSpec", "describe_spec", "matcher", "select_modules"]

ModuleSpec: TypeAlias = str | Sequence[str] | re.Pattern[str] | Callable[[str, nn.Module], bool]
"""Names as PEFT takes them (suffixes), a compiled regex (``fullmatch`` on the name), or a
predicate ``(name, module) -> bool``."""


def matcher(spec: ModuleSpec, argument: str) -> Callable[[str, nn.Module], bool]:
    """Turn ``spec`` into a predicate over ``(qualified_name, module)``.

    A string ``"q_proj"`` matches ``q_proj`` and any name ending in ``.q_proj``; a list matches
    any of its strings; a compiled regex must ``fullmatch`` the qualified name.

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
        return [spec]
    if isinstance(spec, Sequence):
        return list(spec)
    return f"callable:{getattr(spec, '__qualname__', type(spec).__name__)}"


def select_modules(
    model: nn.Module, spec: ModuleSpec, argument: str = "target_modules"
) -> list[tuple[str, nn.Module]]:
    """Return ``(qualified_name, module)`` for every module of ``model`` that ``spec`` matches.

    The root module (name ``""``) is never matched. Order is ``model.named_modules()`` order.
    """
    match = matcher(spec, argument)
    return [(name, mod) for name, mod in _named(model.named_modules()) if match(name, mod)]


def _named(items: Iterable[tuple[str, nn.Module]]) -> Iterable[tuple[str, nn.Module]]:
    # Skip the root and parametrize's own bookkeeping modules.
    for name, mod in items:
        if name and ".parametrizations." not in f".{name}.":
            yield name, mod
