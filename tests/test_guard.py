"""Inspecting pending links: norms, NaN/Inf factors, and merges that would overflow the weight."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from chainopt._attach import attach, bias_delta
from chainopt._layers import record_of
from chainopt._record import ModuleRecord
from chainopt.guard import check_links


def _records(modules: list[tuple[str, nn.Module]]) -> list[ModuleRecord]:
    return [record_of(n, m) for n, m in modules]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factors_are_found_by_name(bad: float) -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    attach(a, 2, 2)
    link_b = attach(b, 2, 2)
    with torch.no_grad():
        link_b.lora_B[0, 0] = bad
    assert list(check_links(_records([("a", a), ("b", b)])).bad) == ["b"]


@given(
    shapes=st.lists(st.sampled_from([(4, 4), (4, 6), (6, 4)]), min_size=1, max_size=6),
    rank=st.integers(1, 3),
    bias=st.booleans(),
    poison=st.none()
    | st.tuples(
        st.integers(0, 5),
        st.sampled_from(["A", "B", "bias"]),
        st.integers(0, 100),
        st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e20]),
    ),
)
def test_check_links_flags_exactly_the_bad_links_and_gives_every_norm(
    shapes: list[tuple[int, int]],
    rank: int,
    bias: bool,
    poison: tuple[int, str, int, float] | None,
) -> None:
    """Same-shaped links are batched together; the flags and norms must not mix them up."""
    torch.manual_seed(len(shapes) * 10 + rank)
    modules = []
    for i, (out, inp) in enumerate(shapes):
        lin = nn.Linear(inp, out)
        link = attach(lin, rank, 2.0, bias=bias)
        with torch.no_grad():
            link.lora_B.normal_()
            if bias:
                bias_delta(lin).delta.normal_()  # type: ignore[union-attr]
        modules.append((f"m{i}", lin))
    expected_bad: list[str] = []
    if poison is not None and poison[0] < len(modules) and (poison[1] != "bias" or bias):
        index, where, flat, value = poison
        name, lin = modules[index]
        link = lin.parametrizations.weight[0]
        delta = bias_delta(lin)
        target = {"A": link.lora_A, "B": link.lora_B, "bias": delta and delta.delta}[where]
        with torch.no_grad():
            target.view(-1)[flat % target.numel()] = value
        expected_bad = [name]

    check = check_links(_records(modules))
    bad, norms = list(check.bad), check.norms

    assert bad == expected_bad
    for name, lin in modules:
        if name not in bad:
            link = lin.parametrizations.weight[0]
            dense = (link.scale * link.lora_B.double() @ link.lora_A.double()).norm().item()
            assert norms[name] == pytest.approx(dense, rel=1e-4)
