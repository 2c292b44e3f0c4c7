"""KnotWarmup: LR re-warmup after each knot around any torch scheduler."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import mlp
from strategies import schedules
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


def test_a_scheduler_over_another_optimizer_is_refused() -> None:
    """Before: accepted; the other optimizer's rates followed the schedule without the warm-up,
    the chain's never moved from 1.0 but for the warm-up (silently). The wrapped optimizer's own
    scheduler is the chain's (they share their param groups)."""
    opt, other = _opt(), _opt()
    inner = torch.optim.lr_scheduler.StepLR(other, step_size=1, gamma=0.5)
    state = inner.state_dict()
    with pytest.raises(ValueError, match=r"scheduler must schedule optimizer's rates.*StepLR"):
        KnotWarmup(inner, opt, 2)
    assert inner.state_dict() == state and opt.param_groups[0]["lr"] == 1.0
    sched = KnotWarmup(torch.optim.lr_scheduler.StepLR(opt.optimizer, 1, 0.5), opt, 2)
    _train(opt.model, opt, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


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


# --- KnotWarmup as a torch LRScheduler, and inside torch's compositions ---


def _hand(step: int, knot_every: int = 5, warmup: int = 3) -> float:
    """The warm-up factor after optimizer step ``step`` (knots after each ``knot_every``)."""
    if step < knot_every:
        return 1.0
    since = step - knot_every * (step // knot_every)
    return min(1.0, (since + 1) / warmup)


def test_is_an_lr_scheduler_and_building_it_changes_no_rate_and_steps_nothing() -> None:
    """``LRScheduler.__init__`` would step the wrapped scheduler once more, add ``initial_lr``
    to the groups and wrap the chain's ``step``: none of that happens."""
    opt = _opt()
    inner = torch.optim.lr_scheduler.LinearLR(opt, 0.5, 1.0, total_iters=4)
    groups, step, inner_state = copy.deepcopy(opt.param_groups), opt.step, inner.state_dict()
    sched = KnotWarmup(inner, opt, 3)
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    assert opt.step == step and inner.state_dict() == inner_state
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in groups
    ]
    assert (sched.last_epoch, sched.get_last_lr(), sched.base_lrs) == (0, [0.5], [1.0])
    for step in range(1, 8):
        _train(opt.model, opt, 1)
        sched.step()
        expected = min(1.0, 0.5 + step / 8) * _hand(step)
        assert sched.get_last_lr() == [pytest.approx(expected)] == [opt.param_groups[0]["lr"]]
        assert sched.last_epoch == inner.last_epoch == step


@pytest.mark.parametrize("warmup_first", [True, False])
def test_inside_a_chained_scheduler_the_other_schedulers_factor_is_kept(
    warmup_first: bool,
) -> None:
    """Before: each step put back the rate it had set itself, discarding what the other
    scheduler of the ``ChainedScheduler`` had done (``StepLR``'s x0.1 was lost)."""
    opt = _opt()
    warm = KnotWarmup(torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9), opt, 3)
    other = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    chained = torch.optim.lr_scheduler.ChainedScheduler(
        [warm, other] if warmup_first else [other, warm], opt
    )
    for step in range(1, 12):
        _train(opt.model, opt, 1)
        chained.step()
        expected = 0.9**step * 0.1 ** (step // 2) * _hand(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12), step
        assert chained.get_last_lr() == [opt.param_groups[0]["lr"]]


@pytest.mark.parametrize("chained", [False, True])
def test_a_tensor_rate_is_set_in_place_as_torch_schedulers_set_it(chained: bool) -> None:
    """A tensor ``lr`` is updated in place by torch's schedulers (``fill_``), so that a compiled
    or CUDA-graph-captured ``step`` reading it sees every new rate. Before: each ``step()``
    replaced the group's tensor with a new one (the captured step kept the first rate)."""
    model = mlp()
    lr = torch.tensor(1.0)
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=lr), target_modules=["0"], rank=2,
        knot_every=5,
    )  # fmt: skip
    held = opt.param_groups[0]["lr"]
    warm = KnotWarmup(torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9), opt, 3)
    other = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    sched: Any = torch.optim.lr_scheduler.ChainedScheduler([warm, other], opt) if chained else warm
    for step in range(1, 12):
        _train(opt.model, opt, 1)
        sched.step()
        expected = 0.9**step * (0.1 ** (step // 2) if chained else 1.0) * _hand(step)
        assert opt.param_groups[0]["lr"] is held, step
        assert float(held) == pytest.approx(expected, rel=1e-5), step
        assert float(warm.get_last_lr()[0]) == pytest.approx(
            expected / (0.1 if chained and step % 2 == 0 else 1.0), rel=1e-5
        )


def test_a_scheduler_setting_the_rate_outright_goes_inside_it_not_beside_it() -> None:
    """What the docs say of ``LambdaLR`` (transformers' schedules): wrapped, the rate is the
    schedule's times the warm-up; before it in a ``ChainedScheduler``, the second step after a
    knot (the first runs at the right 1/4) runs at 2x the schedule's rate where half was due
    (``warmup_steps=4``): the rate set after step 6, with a knot after step 5."""
    rates = {}
    for where in ("inside", "beside"):
        opt = _opt()
        linear = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / 100)
        if where == "inside":
            sched: Any = KnotWarmup(linear, opt, 4)
        else:
            warm = KnotWarmup(torch.optim.lr_scheduler.ConstantLR(opt, 1.0, total_iters=0), opt, 4)
            sched = torch.optim.lr_scheduler.ChainedScheduler([linear, warm], opt)
        rates[where] = []
        for _ in range(6):
            _train(opt.model, opt, 1)
            sched.step()
            rates[where].append(opt.param_groups[0]["lr"])
    hand = [(1 - t / 100) * _hand(t, warmup=4) for t in range(1, 7)]
    assert rates["inside"] == pytest.approx(hand, rel=1e-12)
    assert rates["beside"][:5] == pytest.approx(hand[:5], rel=1e-12)
    assert rates["beside"][5] == pytest.approx(2 * (1 - 6 / 100), rel=1e-12)  # hand: 0.5x


def test_around_sequential_and_chained_schedulers_and_refused_inside_sequential() -> None:
    """Outermost it wraps them as any scheduler; a SequentialLR holding one (which would
    restart it at a milestone) is refused as it is built (before: an AttributeError from
    ``_initial_step``, or a silently restarted inner scheduler once it was an LRScheduler)."""
    opt = _opt()
    lr = torch.optim.lr_scheduler
    sequential = lr.SequentialLR(
        opt, [lr.LinearLR(opt, 0.25, 1.0, total_iters=2), lr.ExponentialLR(opt, 0.9)], [2]
    )
    sched = KnotWarmup(sequential, opt, 3)
    for step in range(1, 9):
        _train(opt.model, opt, 1)
        sched.step()
        plain = (0.625 if step == 1 else 1.0) * (0.9 ** (step - 2) if step > 2 else 1.0)
        assert opt.param_groups[0]["lr"] == pytest.approx(plain * _hand(step)), step
    for make in (
        lambda w: [w, lr.ConstantLR(opt, 0.5)],
        lambda w: [lr.ConstantLR(opt, 0.5), w],
        lambda w: [lr.ChainedScheduler([w], opt), lr.ConstantLR(opt, 0.5)],
    ):
        warm = KnotWarmup(lr.ExponentialLR(opt, 0.5), opt, 2)
        with pytest.raises(TypeError, match=r"cannot go inside a SequentialLR.*outermost"):
            lr.SequentialLR(opt, make(warm), [3])


def test_state_dict_round_trips_through_torch_save_and_resumes_the_same_rates(
    tmp_path: Path,
) -> None:
    opt = _opt()
    lr = torch.optim.lr_scheduler
    sched = KnotWarmup(lr.ChainedScheduler([lr.ExponentialLR(opt, 0.9)], opt), opt, 3)
    for _ in range(6):
        _train(opt.model, opt, 1)
        sched.step()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "s.pt")
    saved = torch.load(tmp_path / "s.pt", weights_only=True)
    other_opt = _opt()
    other = KnotWarmup(
        lr.ChainedScheduler([lr.ExponentialLR(other_opt, 0.9)], other_opt), other_opt, 3
    )
    other.load_state_dict(saved["sched"])  # before the optimizer's state, or after: the same
    other_opt.load_state_dict(saved["opt"])
    assert (other.last_epoch, other.get_last_lr()) == (sched.last_epoch, sched.get_last_lr())
    for _ in range(6):
        for o, s in ((opt, sched), (other_opt, other)):
            _train(o.model, o, 1)
            s.step()
        assert other.get_last_lr() == sched.get_last_lr()
    assert other.state_dict() == sched.state_dict()
    with pytest.raises(TypeError, match="ChainLoRAOptimizer is not pickled"):
        torch.save(sched, tmp_path / "whole.pt")  # as for any scheduler over the chain


def test_a_malformed_state_loads_nothing() -> None:
    """Before: the wrapped scheduler's state was loaded, then a ``KeyError`` for the rest."""
    opt = _opt()
    sched = KnotWarmup(torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9), opt, 3)
    for _ in range(2):
        _train(opt.model, opt, 1)
        sched.step()
    good = sched.state_dict()
    fresh_opt = _opt()
    fresh = KnotWarmup(torch.optim.lr_scheduler.ExponentialLR(fresh_opt, gamma=0.9), fresh_opt, 3)
    before = fresh.state_dict()
    bad_inner = {**good["scheduler"], "_step_count": None}
    bad_inner.pop("gamma")
    cases: list[tuple[Any, type[Exception], str]] = [
        ({"scheduler": good["scheduler"]}, ValueError, r"missing \['unscaled'\]"),
        ({**good, "extra": 1}, ValueError, r"unknown \['extra'\]"),
        ({**good, "unscaled": [0.5, 0.5]}, ValueError, "2 rates, but the optimizer has 1"),
        ({**good, "unscaled": ["0.5"]}, TypeError, "must be a list of rates"),
        ({**good, "factor": 0.0}, ValueError, r"factor'\] must be in \(0, 1\]"),
        ({**good, "last_epoch": "2"}, TypeError, r"last_epoch'\] must be an int"),
        ({**good, "scheduler": [1]}, TypeError, "the wrapped scheduler's state dict"),
        ([good], TypeError, "state_dict must be a dict, got list"),
    ]
    for state, error, match in cases:
        with pytest.raises(error, match=match):
            fresh.load_state_dict(state)
        assert fresh.state_dict() == before
    fresh.scheduler.load_state_dict = lambda s: (  # type: ignore[method-assign]
        torch.optim.lr_scheduler.LRScheduler.load_state_dict(fresh.scheduler, s),
        s["gamma"],
    )
    with pytest.raises(KeyError, match="gamma"):  # the wrapped scheduler's own load fails ...
        fresh.load_state_dict({**good, "scheduler": bad_inner})
    del fresh.scheduler.load_state_dict
    assert fresh.state_dict() == before  # ... and its state is put back


def test_an_old_state_without_the_counters_loads_and_resumes() -> None:
    opt = _opt()
    sched = KnotWarmup(torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9), opt, 3)
    for _ in range(6):
        _train(opt.model, opt, 1)
        sched.step()
    other_opt = _opt()
    other_opt.load_state_dict(opt.state_dict())
    other = KnotWarmup(torch.optim.lr_scheduler.ExponentialLR(other_opt, gamma=0.9), other_opt, 3)
    state = sched.state_dict()
    other.load_state_dict({"scheduler": state["scheduler"], "unscaled": state["unscaled"]})
    for o, s in ((opt, sched), (other_opt, other)):
        _train(o.model, o, 1)
        s.step()
    assert other.get_last_lr() == sched.get_last_lr()


def test_stepping_less_often_than_the_optimizer_is_refused() -> None:
    """Lightning's default ``"interval": "epoch"`` (or any loop stepping it less often than
    ``opt.step()``): before, the warm-up after a knot was silently skipped."""
    opt = _opt()
    sched = KnotWarmup(torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9), opt, 3)
    _train(opt.model, opt, 1)
    sched.step()
    _train(opt.model, opt, 2)
    state, lrs = sched.state_dict(), [g["lr"] for g in opt.param_groups]
    with pytest.raises(RuntimeError, match=r"2 optimizer steps passed.*\"interval\": \"step\""):
        sched.step()
    assert sched.state_dict() == state and [g["lr"] for g in opt.param_groups] == lrs


def test_reduce_lr_on_plateau_without_a_metric_says_how_to_give_one() -> None:
    opt = _opt()
    sched = KnotWarmup(torch.optim.lr_scheduler.ReduceLROnPlateau(opt), opt, 3)
    with pytest.raises(TypeError, match=r"needs the metrics.*\"reduce_on_plateau\": True"):
        sched.step()


# --- Accelerate ---


def _accelerated(micro_batches: int, state: Path | None = None, **kw: Any) -> Any:
    """``micro_batches`` of accumulation 2 under Accelerate; the chain, scheduler, accelerator."""
    from accelerate import Accelerator

    opt = _opt()
    sched = KnotWarmup(torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9), opt, 3)
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True, **kw)
    model, p_opt, p_sched = accelerator.prepare(opt.model, opt, sched)
    assert p_sched.scheduler is sched  # wrapped: before, returned as it was
    if state is not None:
        accelerator.load_state(str(state))
    gen = torch.Generator().manual_seed(3)
    lrs = []
    for _ in range(micro_batches):
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.randn(4, 12, generator=gen)).square().mean())
            p_opt.step()
            p_sched.step()
            p_opt.zero_grad()
        lrs.append(opt.param_groups[0]["lr"])
    return opt, sched, accelerator, lrs


@pytest.mark.usefixtures("accelerate_state")
@pytest.mark.parametrize("split_batches", [False, True])
def test_accelerate_steps_it_on_optimizer_steps_and_save_state_resumes_it(
    tmp_path: Path, split_batches: bool
) -> None:
    """Before: ``prepare`` returned it unwrapped, so it stepped on every micro-batch (the
    schedule ran twice as fast), and ``save_state`` did not save it (a resume restarted it)."""
    opt, _, _, lrs = _accelerated(14, split_batches=split_batches)
    assert opt.optimizer_steps == 7
    assert lrs[1::2] == [pytest.approx(0.9**s * _hand(s)) for s in range(1, 8)]
    _, _, accelerator, _ = _accelerated(8, split_batches=split_batches)
    accelerator.save_state(str(tmp_path))
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    resumed_opt, resumed, _, resumed_lrs = _accelerated(6, tmp_path, split_batches=split_batches)
    assert resumed_opt.optimizer_steps == 7 and resumed.last_epoch == 7
    assert resumed_lrs == lrs[8:]


# --- property: the hand-computed product, and save / load / continue ---


def _run(schedule: dict[str, Any], warmup: int, chained: bool) -> tuple[Any, Any, Any]:
    model = mlp()
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=1.0), target_modules=["0"], rank=2,
        **schedule,
    )  # fmt: skip
    lr = torch.optim.lr_scheduler
    warm = KnotWarmup(lr.ExponentialLR(opt, gamma=0.9), opt, warmup)
    if not chained:
        return opt, warm, warm
    return opt, warm, lr.ChainedScheduler([warm, lr.StepLR(opt, step_size=3, gamma=0.5)], opt)


@given(
    schedule=schedules,
    warmup=st.integers(1, 4),
    chained=st.booleans(),
    steps=st.integers(1, 12),
    data=st.data(),
)
def test_rates_are_the_hand_product_and_a_resume_at_any_step_continues_bitwise(
    schedule: dict[str, Any], warmup: int, chained: bool, steps: int, data: st.DataObject
) -> None:
    opt, warm, outer = _run(schedule, warmup, chained)
    lrs = []
    for step in range(1, steps + 1):
        _train(opt.model, opt, 1)
        outer.step()
        lrs.append(opt.param_groups[0]["lr"])
        last = max((k.step for k in opt.history.knots), default=None)
        f = 1.0 if last is None else min(1.0, (step - last + 1) / warmup)
        expected = 0.9**step * (0.5 ** (step // 3) if chained else 1.0) * f
        assert lrs[-1] == pytest.approx(expected, rel=1e-12), step
        assert warm.last_epoch == step
    cut = data.draw(st.integers(0, steps), label="resume after step")
    first_opt, _, first = _run(schedule, warmup, chained)
    for _ in range(cut):
        _train(first_opt.model, first_opt, 1)
        first.step()
    buf = io.BytesIO()
    torch.save({"opt": first_opt.state_dict(), "sched": first.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    opt2, _, outer2 = _run(schedule, warmup, chained)
    if data.draw(st.booleans(), label="scheduler first"):
        outer2.load_state_dict(saved["sched"])
        opt2.load_state_dict(saved["opt"])
    else:
        opt2.load_state_dict(saved["opt"])
        outer2.load_state_dict(saved["sched"])
    for step in range(cut + 1, steps + 1):
        _train(opt2.model, opt2, 1)
        outer2.step()
        assert opt2.param_groups[0]["lr"] == lrs[step - 1], step
