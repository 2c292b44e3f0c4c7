"""torch.distributed.checkpoint's state probe: not a step of the chain, and leaves no trace."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
)

from chainopt import ChainLoRAOptimizer
from chainopt._state_probe import is_state_probe


def _chain(**kw: object) -> tuple[nn.Module, ChainLoRAOptimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules=["0", "2"],
        rank=2, knot_every=3, **kw,
    )  # fmt: skip
    return model, opt


def _train(model: nn.Module, opt: ChainLoRAOptimizer, steps: int, probe_after: set[int]) -> None:
    gen = torch.Generator().manual_seed(1)
    for i in range(1, steps + 1):
        x, y = torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if i in probe_after:
            before = [p.detach().clone() for p in model.parameters()]
            steps_before = opt.optimizer_steps
            osd = get_optimizer_state_dict(model, opt)
            assert opt.optimizer_steps == steps_before  # not counted
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
            assert osd["state"] == {}  # what the probe built is no state of the chain's
            assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("probe_after", [{0}, {3}, {3, 6}])
def test_the_probe_is_not_a_step_and_training_goes_on_as_unprobed(probe_after: set[int]) -> None:
    """DCP's ``get_optimizer_state_dict`` steps an optimizer that holds no state (before the
    first step; after a ``reset="full"`` knot when only factors train). Before, the chain counted
    that step (the knots came one real step early) and kept AdamW's state of step 1, so the
    next link's first updates were AdamW's second step's (about 0.74 of the size)."""
    model, opt = _chain()
    if 0 in probe_after:
        osd = get_optimizer_state_dict(model, opt)
        assert opt.optimizer_steps == 0 and osd["state"] == {}
    _train(model, opt, 8, probe_after - {0})
    ref_model, ref_opt = _chain()
    _train(ref_model, ref_opt, 8, set())
    assert opt.knots_tied == ref_opt.knots_tied == 2
    assert opt.optimizer_steps == ref_opt.optimizer_steps == 8
    for a, b in zip(model.state_dict().values(), ref_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_probed_chain_saves_no_state_and_a_dcp_state_is_refused_with_advice() -> None:
    """DCP's state dicts keep only ``state`` and ``param_groups``: the chain's entry is lost, so
    loading one is refused before anything loads, naming DCP and what to use instead."""
    model, opt = _chain()
    _train(model, opt, 3, set())  # a knot: the factors' state is gone, nothing else trains
    assert not opt.state
    _, osd = get_state_dict(model, opt)
    assert "chainopt" not in osd
    assert opt.state_dict()["state"] == {} and "chainopt" in opt.state_dict()
    _train(model, opt, 1, set())
    _, osd = get_state_dict(model, opt)  # mid-link: the real state, without the chain's entry
    assert osd["state"] and "chainopt" not in osd
    fresh, fresh_opt = _chain()
    with pytest.raises(ValueError, match=r"torch\.distributed\.checkpoint.*save_checkpoint"):
        set_optimizer_state_dict(fresh, fresh_opt, osd)
    assert fresh_opt.optimizer_steps == 0 and fresh_opt.knots_tied == 0
    _train(fresh, fresh_opt, 1, set())  # the probe's state (the load's) went: a first step
    assert all(float(s["step"]) == 1 for s in fresh_opt.state.values())


def test_only_zero_gradients_at_rate_zero_without_state_are_the_probe() -> None:
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    adam = torch.optim.AdamW([{"params": [p]}, {"params": [q], "lr": 0.0}], lr=0.0)
    p.grad, q.grad = torch.zeros(3), torch.zeros(3)
    assert is_state_probe(adam)
    q.grad = None  # a parameter without a gradient: DCP gives every one a gradient
    assert not is_state_probe(adam)
    q.grad = torch.tensor([0.0, 1e-30, 0.0])  # a real gradient, however small
    assert not is_state_probe(adam)
    q.grad = torch.zeros(3)
    adam.param_groups[0]["lr"] = torch.tensor(1e-3)  # a real rate
    assert not is_state_probe(adam)
    adam.param_groups[0]["lr"] = torch.tensor(0.0)
    assert is_state_probe(adam)
    adam.step()
    assert not is_state_probe(adam)  # the state exists


def test_the_probe_moves_nothing_where_a_rate_of_zero_would() -> None:
    """transformers' ``Adafactor`` with ``relative_step=True`` takes its own rate, not the
    group's 0: stepped for the probe, it decayed A and the trained head (``weight_decay``)."""
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
    opt = ChainLoRAOptimizer(
        model, lambda ps: Adafactor(ps, lr=None, relative_step=True, weight_decay=0.1),
        target_modules=["0"], trainable_modules=["2"], rank=2, knot_every=3,
    )  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    osd = get_optimizer_state_dict(model, opt)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert osd["state"] == {} and not opt.state and opt.optimizer_steps == 0
