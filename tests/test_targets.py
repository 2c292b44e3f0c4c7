"""Choosing modules: suffixes, regexes, predicates."""

from __future__ import annotations

import re

import pytest
from models import tiny_llama
from torch import nn

from chainopt.targets import select_modules


def _names(spec: object) -> list[str]:
    return [n for n, _ in select_modules(tiny_llama(), spec)]  # type: ignore[arg-type]


def test_suffix_matches_whole_name_components() -> None:
    names = _names(["q_proj", "v_proj"])
    assert names == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert _names("proj") == []  # a suffix is a whole component, not a substring


def test_regex_fullmatches_the_qualified_name() -> None:
    assert _names(re.compile(r".*\.0\.self_attn\.[qk]_proj")) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]


def test_callable_sees_name_and_module() -> None:
    names = _names(lambda name, m: isinstance(m, nn.Linear) and "mlp" in name)
    assert len(names) == 6 and all(".mlp." in n for n in names)


def test_root_is_never_matched() -> None:
    assert select_modules(nn.Linear(2, 2), lambda n, m: True) == []


@pytest.mark.parametrize(("spec", "err"), [([], ValueError), ([""], ValueError), (3, TypeError)])
def test_bad_specs(spec: object, err: type[Exception]) -> None:
    with pytest.raises(err, match="target_modules"):
        _names(spec)
