"""Wrapping: modules keep their own forward, and the wrapped optimizer must step the factors."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import assert_same, fingerprint, mlp, requires_grad_map, snapshot
from torch import nn

import chainopt.optimizer
from chainopt import ChainLoRAOptimizer, ChainLoRAWarning
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


def _stepped(model: nn.Module) -> torch.optim.Optimizer:
    """An Adam over ``model`` that has taken one step (so it holds state to lose)."""
    base = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(3, 12)).sum().backward()
    base.step()
    return base


def test_a_refused_optimizer_keeps_its_groups_and_state() -> None:
    """The check that refuses an optimizer with a list of its own runs after the groups were
    rewritten: the groups and the state the rewrite dropped come back (they did not)."""
    model = mlp()
    base = _stepped(model)
    base.own_params = list(model.parameters())  # type: ignore[attr-defined]
    before = fingerprint(model, base)
    with pytest.raises(ValueError, match="keeps its own list of parameters"):
        ChainLoRAOptimizer(model, base, target_modules=["0"], rank=2, knot_every=2)
    assert_same(before, fingerprint(model, base))
    assert len(base.state) == 6


class TinyForSequenceClassification(nn.Module):
    """What chainopt takes for a Hugging Face task model: a body and a fresh head."""

    base_model_prefix = "body"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 12), nn.Tanh())
        self.score = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(self.body(x))

    def save_pretrained(self, path: str) -> None:  # a Hugging Face model's save
        raise NotImplementedError


def test_a_warning_raised_as_an_error_leaves_model_and_optimizer_as_they_were() -> None:
    """With warnings as errors (pytest's ``filterwarnings = error``), the frozen-head warning,
    raised after the links were attached and the groups rewritten, left the links, the load
    guards and the rewritten optimizer behind."""
    model = TinyForSequenceClassification()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    before = fingerprint(model, base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ChainLoRAWarning, match="head 'score'"):
            ChainLoRAOptimizer(model, base, target_modules=["body.0"], rank=2, knot_every=2)
    assert_same(before, fingerprint(model, base))
    opt = ChainLoRAOptimizer(model, base, target_modules=["body.0"], rank=2, knot_every=2,
                             trainable_modules=["score"])  # fmt: skip
    assert [n for n, _ in opt.adapted_modules()] == ["body.0"]


def test_a_failure_after_the_chain_is_built_undoes_every_mark(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever raises in the optimizer's own construction after the chain was built (here its
    training watch) undoes the links, hooks, instance attributes (``save_pretrained``, the load
    guards), ``requires_grad`` and the optimizer's groups."""
    model = TinyForSequenceClassification()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    before = fingerprint(model, base)

    def broken(*args: object) -> None:
        raise RuntimeError("watch failed")

    monkeypatch.setattr(chainopt.optimizer, "TrainingWatch", broken)
    with pytest.raises(RuntimeError, match="watch failed"):
        ChainLoRAOptimizer(model, base, target_modules=["body.0"], rank=2, knot_every=2,
                           trainable_modules=["score"], init="gradient")  # fmt: skip
    assert_same(before, fingerprint(model, base))
    assert "save_pretrained" not in vars(model)


_CHANGES = {
    "forward hook": lambda m, o: m[0].register_forward_hook(lambda *a: None),
    "forward pre-hook": lambda m, o: m.register_forward_pre_hook(lambda *a: None),
    "backward hook": lambda m, o: m[2].register_full_backward_hook(lambda *a: None),
    "state_dict hook": lambda m, o: m._register_state_dict_hook(lambda *a: None),
    "load pre-hook": lambda m, o: m._register_load_state_dict_pre_hook(lambda *a: None),
    "load post-hook": lambda m, o: m.register_load_state_dict_post_hook(lambda *a: None),
    "model attribute": lambda m, o: setattr(m, "_chainopt_mark", 1),
    "module attribute": lambda m, o: setattr(m[0], "note", "x"),
    "requires_grad": lambda m, o: m[0].bias.requires_grad_(False),
    "value": lambda m, o: m[2].weight.data.add_(1),
    "identity": lambda m, o: setattr(m[0], "bias", nn.Parameter(m[0].bias.detach().clone())),
    "parametrization": lambda m, o: nn.utils.parametrize.register_parametrization(
        m[0], "weight", nn.Identity()
    ),
    "mode": lambda m, o: m[1].eval(),
    "tensor hook": lambda m, o: m[0].weight.register_hook(lambda g: g),
    "group params": lambda m, o: o.param_groups[0]["params"].pop(),
    "group lr": lambda m, o: o.param_groups[0].update(lr=9.0),
    "state": lambda m, o: o.state.pop(m[0].weight),
    "state value": lambda m, o: o.state[m[0].weight]["exp_avg"].add_(1),
}


@pytest.mark.parametrize("change", sorted(_CHANGES))
def test_the_fingerprint_sees_every_change_a_construction_might_leave(change: str) -> None:
    """The refusal tests compare fingerprints: each kind of change must show in one."""
    model = mlp()
    base = _stepped(model)
    before = fingerprint(model, base)
    assert_same(before, fingerprint(model, base))
    _CHANGES[change](model, base)
    with pytest.raises(AssertionError):
        assert_same(before, fingerprint(model, base))
