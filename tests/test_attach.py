"""Adapting a module: the parametrization it reads through, the factorised forward and its
fallbacks, removal."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import LinearCase, linear_cases, tolerance
from torch import nn
from torch.nn.utils import parametrize

from chainopt._attach import attach, bias_delta, detach, lora_parametrization
from chainopt.lora import BiasDelta, LoRAParametrization


def _adapted(case: LinearCase, seed: int = 0) -> tuple[nn.Linear, LoRAParametrization]:
    torch.manual_seed(seed)
    lin = nn.Linear(case.in_features, case.out_features, bias=case.bias).to(case.dtype)
    link = attach(lin, case.rank, case.alpha, bias=case.bias, factor_dtype=case.dtype)
    with torch.no_grad():  # a trained-looking link: B non-zero
        link.lora_B.normal_()
        delta = bias_delta(lin)
        if delta is not None:
            delta.delta.normal_()
    return lin, link


@given(linear_cases())
def test_weight_reads_w_plus_sba(case: LinearCase) -> None:
    lin, link = _adapted(case)
    w = lin.parametrizations.weight.original
    expected = w + (link.lora_B @ link.lora_A) * (case.alpha / case.rank)
    torch.testing.assert_close(lin.weight, expected, **tolerance(case.dtype))
    assert link.scale == case.alpha / case.rank


@given(linear_cases(), st.integers(1, 3))
def test_fast_forward_equals_materialised_weight(case: LinearCase, batch: int) -> None:
    lin, _ = _adapted(case)
    x = torch.randn(batch, 2, case.in_features, dtype=case.dtype)
    fast = lin(x)
    generic = F.linear(x, lin.weight, lin.bias)
    torch.testing.assert_close(fast, generic, **tolerance(case.dtype))


@given(linear_cases(dtypes=(torch.float64,)))
def test_fast_forward_gradients_equal_materialised(case: LinearCase) -> None:
    lin, link = _adapted(case)
    x = torch.randn(3, case.in_features, dtype=case.dtype)
    grads = []
    for forward in (lin, lambda t: F.linear(t, lin.weight, lin.bias)):
        link.lora_A.grad = link.lora_B.grad = None
        forward(x).square().sum().backward()
        grads.append((link.lora_A.grad.clone(), link.lora_B.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1])


def test_new_link_is_identity_and_a_is_kaiming_uniform() -> None:
    lin = nn.Linear(64, 16)
    x = torch.randn(4, 64)
    before = lin(x)
    link = attach(lin, rank=8, alpha=16)
    torch.testing.assert_close(lin(x), before, rtol=0, atol=0)
    assert torch.count_nonzero(link.lora_B) == 0
    bound = 1 / 64**0.5
    assert link.lora_A.abs().max() <= bound
    assert link.lora_A.std() > bound / 3  # not degenerate


def test_state_dict_keys_are_parametrize_keys() -> None:
    lin = nn.Linear(4, 3)
    attach(lin, rank=2, alpha=2, bias=True)
    assert set(lin.state_dict()) == {
        "parametrizations.weight.original",
        "parametrizations.weight.0.lora_A",
        "parametrizations.weight.0.lora_B",
        "parametrizations.bias.original",
        "parametrizations.bias.0.delta",
    }


def test_weight_parameter_identity_is_kept() -> None:
    lin = nn.Linear(4, 3)
    w = lin.weight
    attach(lin, rank=2, alpha=2)
    assert lin.parametrizations.weight.original is w
    detach(lin)
    assert lin.weight is w


def test_nn_linear_itself_is_never_touched() -> None:
    forward = nn.Linear.forward
    lin = nn.Linear(4, 3)
    attach(lin, rank=2, alpha=2)
    assert nn.Linear.forward is forward
    assert type(lin) is not nn.Linear and isinstance(lin, nn.Linear)
    other = nn.Linear(4, 3)
    assert type(other).forward is forward
    second = nn.Linear(4, 3)
    attach(second, rank=1, alpha=1)
    assert type(second) is not type(lin)  # each module gets a class of its own


def test_cached_context_falls_back_and_stays_correct() -> None:
    lin, _ = _adapted(LinearCase(6, 5, 2, 4.0, torch.float64, True))
    x = torch.randn(3, 6, dtype=torch.float64)
    with parametrize.cached():
        cached = lin(x)
    torch.testing.assert_close(cached, F.linear(x, lin.weight, lin.bias))


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_stacked_foreign_parametrization_falls_back_and_stays_correct() -> None:
    lin, link = _adapted(LinearCase(6, 5, 2, 4.0, torch.float64, False))
    parametrize.register_parametrization(lin, "weight", _Double())
    x = torch.randn(3, 6, dtype=torch.float64)
    w = lin.parametrizations.weight.original
    expected = F.linear(x, 2 * (w + link.scale * link.lora_B @ link.lora_A), lin.bias)
    torch.testing.assert_close(lin(x), expected)
    detach(lin)  # removes ours only; the foreign one stays, over the same original
    assert lora_parametrization(lin) is None
    assert isinstance(lin.parametrizations.weight[0], _Double)
    assert lin.parametrizations.weight.original is w


def test_adapted_forward_saves_no_materialised_weight() -> None:
    """Structural: nothing of the adapted weight's shape is saved for backward but W itself."""
    lin = nn.Linear(32, 24).requires_grad_(False)
    attach(lin, rank=4, alpha=8)
    w = lin.parametrizations.weight.original
    x = torch.randn(5, 32, requires_grad=True)  # as activations inside a network

    def materialised(forward: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        saved: list[torch.Tensor] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward(x).sum().backward()
        return [t for t in saved if t.numel() == w.numel() and t.data_ptr() != w.data_ptr()]

    assert materialised(lin) == [], "the adapted forward saved a materialised (out, in) weight"
    assert w.grad is None  # and computed no dense weight gradient
    # The check can fail: the generic path (a plain weight parametrization) does materialise.
    assert len(materialised(lambda t: F.linear(t, lin.weight, lin.bias))) >= 1


def test_detach_on_deepcopy_leaves_the_original_working() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    attach(model[0], rank=2, alpha=2)
    clone = copy.deepcopy(model)
    assert type(clone[0]) is type(model[0])  # deepcopy shares parametrize's class
    detach(clone[0])
    assert type(clone[0]) is nn.Linear
    x = torch.randn(3, 4)
    assert lora_parametrization(model[0]) is not None
    model(x)  # still parametrized and working
    assert isinstance(type(model[0]).__dict__["weight"], property)


def test_detach_keeps_foreign_parametrization_on_another_tensor() -> None:
    lin = nn.Linear(4, 3)
    attach(lin, rank=2, alpha=2)
    parametrize.register_parametrization(lin, "bias", _Double())
    shared_cls = type(lin)
    b = lin.parametrizations.bias.original
    detach(lin)
    assert type(lin) is not shared_cls and isinstance(lin, nn.Linear)
    assert isinstance(shared_cls.__dict__["weight"], property)  # the shared class is untouched
    torch.testing.assert_close(lin.bias, 2 * b)
    x = torch.randn(2, 4)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, 2 * b))


def test_bias_delta_shifts_the_bias() -> None:
    lin = nn.Linear(4, 3)
    attach(lin, rank=2, alpha=2, bias=True)
    delta = bias_delta(lin)
    assert isinstance(delta, BiasDelta)
    with torch.no_grad():
        delta.delta.fill_(0.5)
    b = lin.parametrizations.bias.original
    torch.testing.assert_close(lin.bias, b + 0.5)
    x = torch.randn(2, 4)
    torch.testing.assert_close(lin(x), F.linear(x, lin.parametrizations.weight.original, b + 0.5))


def test_float32_factors_on_bfloat16_weight() -> None:
    lin = nn.Linear(16, 8).to(torch.bfloat16)
    link = attach(lin, rank=4, alpha=8, factor_dtype=torch.float32)
    with torch.no_grad():
        link.lora_B.normal_()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    out = lin(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, lin.weight, lin.bias), rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16


@pytest.mark.parametrize("dynamic", [False])
def test_adapted_model_compiles_to_one_graph(dynamic: bool) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    attach(model[0], rank=2, alpha=4)
    attach(model[2], rank=2, alpha=4)
    x = torch.randn(3, 8)
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend="eager")
    torch.testing.assert_close(compiled(x), model(x))
