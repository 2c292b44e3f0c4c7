"""Merging a link: the merged weight is W + s·B·A, merge then zero B preserves the function,
and half-precision merges keep the exact sum."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import LinearCase, linear_cases, tolerance
from torch import nn

from chainopt import ChainLoRAOptimizer
from chainopt._attach import attach, bias_delta
from chainopt._layers import record_of
from chainopt.merge import merge_, merged_bias, merged_weight


def merge_into_weight(lin: nn.Module) -> None:
    merge_(record_of("lin", lin))


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
    record = record_of("lin", lin)
    weight, bias = merged_weight(record), merged_bias(record)
    merge_into_weight(lin)
    torch.testing.assert_close(lin.parametrizations.weight.original, weight, rtol=0, atol=0)
    if case.bias:
        torch.testing.assert_close(lin.parametrizations.bias.original, bias, rtol=0, atol=0)


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


@given(
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    size=st.sampled_from([1e-1, 1e-2, 1e-3]),
    links=st.integers(1, 3),
)
@settings(max_examples=25, deadline=None)
def test_a_knot_of_a_zero_link_leaves_a_half_precision_weight_bitwise_as_it_is(
    seed: int, dtype: torch.dtype, size: float, links: int
) -> None:
    """``W + residual`` always rounds back to ``W``: the residual's own rounding never lands on a
    tie, so a knot that merges nothing changes neither the weight nor the residual."""
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, 64).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(64, 64, generator=gen).to(dtype))
    link = attach(
        lin,
        rank=4,
        alpha=4.0,
        factor_dtype=torch.float32,
        residual_dtype=(torch.bfloat16 if dtype == torch.bfloat16 else torch.float32),
    )
    record = record_of("fc", lin)
    for _ in range(links):  # real merges first: they leave residuals
        with torch.no_grad():
            link.lora_B.copy_(size * torch.randn(link.lora_B.shape, generator=gen))
        merge_(record)
        with torch.no_grad():
            link.lora_B.zero_()
    residual = link.merge_residual
    assert residual is not None
    weight, kept = record.weight.detach().clone(), residual.clone()
    for _ in range(3):
        merge_(record)  # B is zero: nothing to merge
        assert torch.equal(record.weight, weight)
        assert torch.equal(residual, kept)


def test_a_knot_refuses_a_module_that_left_the_model() -> None:
    """A chained module replaced in the model (``model[0] = new``): its link is no longer part of
    the model's function, so a knot must not merge it (nor anything else: all or nothing)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["0", "2"], rank=2,
        knot_every=100,
    )  # fmt: skip
    with torch.no_grad():
        for p in opt.factors():
            p.normal_()
    old = model[0]
    model[0] = nn.Linear(6, 6)
    kept = model[2].weight.detach().clone(), old.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"'0'\]: it is no longer part of the model"):
        opt.tie_knot()
    assert torch.equal(model[2].weight, kept[0]) and torch.equal(old.weight, kept[1])
    assert opt.knots_tied == 0
