"""KnotWarmup: LR re-warmup after each knot around any torch scheduler."""

from __future__ import annotations

import pytest
import torch
from models import mlp
from test_optimizer import _train

from chainopt import ChainLoRAOptimizer, KnotWarmup


def _opt() -> ChainLoRAOptimizer:
    model = mlp()
    return ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=1.0), target_modules=["0"], rank=2,
        knot_every=5,
    )  # fmt: skip


def test_warmup_restarts_after_each_knot_over_a_chainable_scheduler() -> None:
    opt = _opt()
    inner = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    sched = KnotWarmup(inner, opt, warmup_steps=3)
    seen = []
    for step in range(1, 12):
        _train(opt.model, opt, 1)
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
        since = step - 5 * (step // 5)
        factor = 1.0 if step < 5 else min(1.0, (since + 1) / 3)
        assert seen[-1] == pytest.approx(0.9**step * factor)


def test_state_dict_round_trip() -> None:
    opt = _opt()
    sched = KnotWarmup(torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=20), opt, 2)
    for _ in range(6):
        _train(opt.model, opt, 1)
        sched.step()
    other_opt = _opt()
    other_opt.load_state_dict(opt.state_dict())
    other = KnotWarmup(
        torch.optim.lr_scheduler.LinearLR(other_opt, 1.0, 0.0, total_iters=20), other_opt, 2
    )
    other.load_state_dict(sched.state_dict())
    for o, s in ((opt, sched), (other_opt, other)):
        _train(o.model, o, 1)
        s.step()
    assert other.get_last_lr() == sched.get_last_lr()


def test_bad_arguments() -> None:
    opt = _opt()
    inner = torch.optim.lr_scheduler.ConstantLR(opt, 1.0)
    with pytest.raises(ValueError, match="warmup_steps must be a positive int, got 0"):
        KnotWarmup(inner, opt, 0)
    with pytest.raises(TypeError, match="optimizer must be a ChainLoRAOptimizer"):
        KnotWarmup(inner, opt.optimizer, 2)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"scheduler must be an LR .*\(an optimizer\)"):
        KnotWarmup(opt, opt, 2)  # type: ignore[arg-type]  # the optimizer, not its scheduler
    with pytest.raises(TypeError, match=r"got NoneType \(without \['step', 'state_dict'"):
        KnotWarmup(None, opt, 2)  # type: ignore[arg-type]


def test_reduce_lr_on_plateau_gets_its_metric_and_reduces_the_unscaled_rate() -> None:
    """``ReduceLROnPlateau.step(metrics)``: ``KnotWarmup.step(metric)`` passes it on, and the
    plateau halves the rate the schedule holds, never the warmed-up one (before, it was refused,
    and the message said to multiply the rates by ``factor()`` by hand each step, which compounds:
    after a knot the rate fell by 1/3 * 2/3 * ... instead of warming up). Without the metric,
    the scheduler's TypeError leaves every rate as it was."""
    opt = _opt()
    sched = KnotWarmup(
        torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0), opt, 3
    )
    metrics = [1.0, 0.5, 0.6, 0.4, 0.3, 0.7, 0.2, 0.2]  # plateaus after steps 3, 6 and 8
    unscaled = 1.0
    for step, metric in enumerate(metrics, start=1):
        _train(opt.model, opt, 1)
        sched.step(metric)
        unscaled *= 0.5 if step in (3, 6, 8) else 1.0
        since = step - 5  # one knot, after step 5
        factor = 1.0 if step < 5 else min(1.0, (since + 1) / 3)
        assert opt.param_groups[0]["lr"] == pytest.approx(unscaled * factor), step
        assert sched.scheduler.get_last_lr() == [pytest.approx(unscaled)]
    lrs = [g["lr"] for g in opt.param_groups]
    with pytest.raises(TypeError, match="metrics"):
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == lrs


def test_a_param_group_added_later_is_warmed_up_from_its_own_rate() -> None:
    """Before: ``zip(strict=True)`` raised after the old groups' rates were already unscaled."""
    opt = _opt()
    sched = KnotWarmup(torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5), opt, 2)
    _train(opt.model, opt, 1)
    sched.step()
    head = torch.nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [head], "lr": 0.1})
    for _ in range(4):  # the knot after step 5: the factor is then 1/2
        _train(opt.model, opt, 1)
        sched.step()
    assert opt.knots_tied == 1
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5**5 * 0.5, 0.1 * 0.5**4 * 0.5])
