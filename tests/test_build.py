"""Wrapping: modules keep their own forward, and the wrapped optimizer must step the factors."""

from __future__ import annotations

import pytest
import torch
from models import mlp, requires_grad_map, snapshot
from torch import nn

from chainopt import ChainLoRAOptimizer
from chainopt._attach import lora_parametrization


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass whose forward is its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x) + 1.0


def test_a_linear_subclass_keeps_its_own_forward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(4, 6)
    before = model(x)
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             target_modules=["0", "2"], rank=2, knot_every=2)  # fmt: skip
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    link = lora_parametrization(model[0])
    with torch.no_grad():
        link.lora_B.normal_()  # type: ignore[union-attr]
    w = model[0].parametrizations.weight.original
    expected = 2.0 * nn.functional.linear(x, w + link.delta(), model[0].bias) + 1.0  # type: ignore[union-attr]
    torch.testing.assert_close(model[0](x), expected)
    opt.tie_knot()
    torch.testing.assert_close(model[0](x), expected, rtol=1e-5, atol=1e-6)


def test_a_factory_over_other_parameters_is_refused() -> None:
    model, other = mlp(), mlp()
    before, grads = snapshot(model), requires_grad_map(model)
    with pytest.raises(ValueError, match=r"does not step .* factors"):
        ChainLoRAOptimizer(model, lambda params: torch.optim.SGD(other.parameters(), lr=0.1),
                           target_modules=["0"], rank=2, knot_every=2)  # fmt: skip
    with pytest.raises(ValueError, match="outside the chain"):
        ChainLoRAOptimizer(
            model, lambda params: torch.optim.SGD([*params, next(other.parameters())], lr=0.1),
            target_modules=["0"], rank=2, knot_every=2,
        )  # fmt: skip
    assert snapshot(model).keys() == before.keys() and requires_grad_map(model) == grads
    assert all(lora_parametrization(m) is None for m in model.modules())


class KeepsACopy(torch.optim.SGD):
    """An optimizer that steps a list of its own (a copy made at construction)."""

    def __init__(self, params: object, lr: float) -> None:
        super().__init__(params, lr=lr)  # type: ignore[arg-type]
        self.own_params = list(self.param_groups[0]["params"])


def test_an_optimizer_keeping_its_own_parameter_list_is_refused() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"keeps its own list of parameters .*'own_params'"):
        ChainLoRAOptimizer(model, KeepsACopy(model.parameters(), lr=0.1),
                           target_modules=["0"], rank=2, knot_every=2)  # fmt: skip


def test_an_lbfgs_instance_steps_the_factors_and_saves() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 1))
    opt = ChainLoRAOptimizer(model, torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4),
                             target_modules=["0"], rank=2, knot_every=2)  # fmt: skip
    x, y = torch.randn(16, 6), torch.randn(16, 1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = float(closure())
    w0 = model[0].parametrizations.weight.original.clone()
    for _ in range(4):
        opt.step(closure)
    assert float(closure()) < first  # it trained
    assert opt.knots_tied == 2 and not torch.equal(model[0].parametrizations.weight.original, w0)
    opt.load_state_dict(opt.state_dict())  # no KeyError for a stale parameter
