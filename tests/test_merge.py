"""Knots: the merge preserves the function, is exact in half precision, refuses NaN/Inf."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import LinearCase, linear_cases, tolerance
from torch import nn

from chainopt.lora import attach, bias_delta
from chainopt.merge import (
    find_non_finite,
    inspect_links,
    merge_into_weight,
    merged_bias,
    merged_weight,
    pending_links,
)


def _trained(case: LinearCase, residual: torch.dtype | None = None) -> nn.Linear:
    lin = nn.Linear(case.in_features, case.out_features, bias=case.bias).to(case.dtype)
    factor_dtype = torch.float32 if case.dtype == torch.bfloat16 else case.dtype
    link = attach(
        lin,
        case.rank,
        case.alpha,
        bias=case.bias,
        factor_dtype=factor_dtype,
        residual_dtype=residual,
    )
    with torch.no_grad():
        link.lora_B.normal_()
        delta = bias_delta(lin)
        if delta is not None:
            delta.delta.normal_()
    return lin


@given(linear_cases())
def test_merged_weight_equals_w_plus_sba(case: LinearCase) -> None:
    lin = _trained(case)
    link = lin.parametrizations.weight[0]
    w = lin.parametrizations.weight.original.detach().clone()
    expected = (w.double() + link.scale * link.lora_B.double() @ link.lora_A.double()).to(
        case.dtype
    )
    merge_into_weight(lin)
    torch.testing.assert_close(
        lin.parametrizations.weight.original, expected, **tolerance(case.dtype)
    )


@given(linear_cases())
def test_merge_then_zero_b_preserves_the_function(case: LinearCase) -> None:
    lin = _trained(case)
    x = torch.randn(4, case.in_features, dtype=case.dtype)
    with torch.no_grad():
        before = lin(x)
        merge_into_weight(lin)
        lin.parametrizations.weight[0].lora_B.zero_()
        delta = bias_delta(lin)
        if delta is not None:
            delta.delta.zero_()
        after = lin(x)
    # bf16 outputs differ by the rounding of W + s·B·A versus W and s·B·A rounded apart.
    torch.testing.assert_close(after, before, **tolerance(case.dtype))


@given(linear_cases())
def test_merged_views_match_what_a_merge_writes(case: LinearCase) -> None:
    lin = _trained(case)
    weight, bias = merged_weight(lin), merged_bias(lin)
    merge_into_weight(lin)
    torch.testing.assert_close(lin.parametrizations.weight.original, weight, rtol=0, atol=0)
    if case.bias:
        torch.testing.assert_close(lin.parametrizations.bias.original, bias, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factors_are_found_by_name(bad: float) -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    attach(a, 2, 2)
    link_b = attach(b, 2, 2)
    with torch.no_grad():
        link_b.lora_B[0, 0] = bad
    assert find_non_finite([("a", a), ("b", b)]) == ["b"]


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
def test_inspect_links_flags_exactly_the_bad_links_and_gives_every_norm(
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

    bad, norms = inspect_links(pending_links(modules))

    assert bad == expected_bad
    for name, lin in modules:
        if name not in bad:
            link = lin.parametrizations.weight[0]
            dense = (link.scale * link.lora_B.double() @ link.lora_A.double()).norm().item()
            assert norms[name] == pytest.approx(dense, rel=1e-4)


def _update_lost(
    dtype: torch.dtype, residual: torch.dtype | None, size: float
) -> tuple[float, float]:
    """Relative loss of 10 knots' accumulated update on a ``dtype`` weight, and its floor.

    Each knot adds an update of relative size ``size`` of std(W). The loss is
    ``|W_final - (W_start + Σ updates)| / |Σ updates|`` against a float64 reference; the floor is
    the same for ``W_start + Σ updates`` rounded once to ``dtype``.
    """
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).to(dtype)
    start = lin.weight.detach().double().clone()
    link = attach(lin, rank=8, alpha=8, factor_dtype=torch.float32, residual_dtype=residual)
    total = torch.zeros_like(start)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        with torch.no_grad():
            link.lora_A.normal_(generator=gen)
            link.lora_B.normal_(generator=gen)
            link.lora_B.mul_(size * start.std().item() / link.delta().std().item())
        total += link.delta().double()
        merge_into_weight(lin)
    exact = start + total
    final = lin.parametrizations.weight.original.double()
    lost = (final - exact).norm() / total.norm()
    floor = (exact.to(dtype).double() - exact).norm() / total.norm()
    return lost.item(), floor.item()


@pytest.mark.parametrize("size", [1e-3, 1e-4])
@pytest.mark.parametrize(
    ("dtype", "residual"), [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]
)
def test_half_precision_knots_are_exact(
    dtype: torch.dtype, residual: torch.dtype, size: float
) -> None:
    naive, floor = _update_lost(dtype, None, size)
    exact, floor2 = _update_lost(dtype, residual, size)
    assert floor == floor2
    # Rounding at every knot loses far more than rounding once; the residual keeps the floor.
    assert exact <= floor * (1 + 1e-4)
    assert naive > floor + 0.02
