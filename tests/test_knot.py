"""The knot as a transaction: a failure half-way keeps the function, a retry finishes it once;
links that must not merge (NaN/Inf, half-precision overflow) never reach a weight."""

from __future__ import annotations

import copy
import gc
import pickle
import warnings
import weakref
from typing import Any

import pytest
import torch
from models import mlp, snapshot
from torch import nn

import chainopt.knot as knot_mod
from chainopt import ChainLoRAOptimizer, NonFiniteUpdateError
from chainopt._attach import lora_parametrization
from chainopt._record import ModuleRecord


def _chain(**kw: Any) -> tuple[nn.Module, ChainLoRAOptimizer]:
    torch.manual_seed(0)
    model = mlp()
    kw = {"target_modules": ["0", "2", "4"], "rank": 2, "knot_every": 3, **kw}
    return model, ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), **kw)


def _steps(model: nn.Module, opt: ChainLoRAOptimizer, n: int) -> None:
    for _ in range(n):  # the batch depends on the step only
        gen = torch.Generator().manual_seed(1000 + opt.optimizer_steps)
        model(torch.randn(8, 12, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("retry", ["tie_knot", "zero_grad"])
def test_a_knot_that_fails_half_way_keeps_the_function_and_a_retry_finishes_it_once(
    retry: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight, straight_opt = _chain()
    _steps(straight, straight_opt, 5)

    model, opt = _chain()
    _steps(model, opt, 2)
    x = torch.randn(5, 12)
    real = knot_mod.merge_
    calls: list[str] = []
    before: list[torch.Tensor] = []

    def flaky(record: ModuleRecord) -> None:
        calls.append(record.name)
        if not before:
            before.append(model(x))  # the function the knot must keep
        if record.name == "2" and calls.count("2") == 1:
            raise MemoryError("out of memory in the second module's merge")
        real(record)

    monkeypatch.setattr(knot_mod, "merge_", flaky)
    with pytest.raises(MemoryError):
        _steps(model, opt, 1)  # step 3 ties the knot
    with torch.no_grad():
        torch.testing.assert_close(model(x), before[0], rtol=1e-5, atol=1e-6)  # function kept
    assert opt.knots_tied == 0 and len(opt.history) == 0
    if retry == "tie_knot":
        opt.tie_knot()
    opt.zero_grad()  # what the loop does next; it finishes a pending knot first
    _steps(model, opt, 2)
    assert calls == ["0", "2", "2", "4"]  # module "0" merged once
    assert opt.knots_tied == 1 and [k.step for k in opt.history.knots] == [3]
    a, b = snapshot(model), snapshot(straight)
    assert all(torch.equal(a[k], b[k]) for k in b), "a retried knot differs from a clean one"


def test_a_failed_restart_is_retried_with_the_same_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    straight, straight_opt = _chain()
    _steps(straight, straight_opt, 4)
    model, opt = _chain()
    _steps(model, opt, 2)
    real = knot_mod.restart_links
    failed = []

    def flaky(*args: Any) -> None:
        if not failed:
            failed.append(True)
            raise RuntimeError("device error while drawing")
        real(*args)

    monkeypatch.setattr(knot_mod, "restart_links", flaky)
    with pytest.raises(RuntimeError, match="device error"):
        _steps(model, opt, 1)
    opt.zero_grad()
    _steps(model, opt, 1)
    a, b = snapshot(model), snapshot(straight)
    assert all(torch.equal(a[k], b[k]) for k in b)


def _half_chain(**kw: Any) -> tuple[nn.Module, ChainLoRAOptimizer]:
    torch.manual_seed(0)
    model = mlp(dtype=torch.float16)
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             target_modules=["0", "2"], rank=2, knot_every=100, **kw)  # fmt: skip
    with torch.no_grad():  # finite factors whose update passes float16's 65504
        link = lora_parametrization(model[2])
        link.lora_A.fill_(200.0)  # type: ignore[union-attr]
        link.lora_B.fill_(200.0)  # type: ignore[union-attr]
        lora_parametrization(model[0]).lora_B.fill_(0.01)  # type: ignore[union-attr]
    return model, opt


def test_a_float16_overflow_at_a_knot_raises_and_changes_nothing() -> None:
    model, opt = _half_chain()
    before = snapshot(model)
    with pytest.raises(NonFiniteUpdateError, match=r"'2'.*float16 weight.*no weight was changed"):
        opt.tie_knot()
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert opt.knots_tied == 0


def test_a_float16_overflow_is_skipped_and_no_inf_reaches_a_weight() -> None:
    model, opt = _half_chain(non_finite="skip")
    w0 = model[0].parametrizations.weight.original.clone()
    with pytest.warns(RuntimeWarning, match=r"\['2'\].*dropped those links unmerged"):
        record = opt.tie_knot()
    assert record.skipped == ("2",)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert not torch.equal(model[0].parametrizations.weight.original, w0)  # "0" merged


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_nan_step_of_a_trained_head_is_refused_whatever_the_policy(policy: str) -> None:
    """A NaN loss at a knot's step under ``"skip"``: the links were dropped with a warning, but
    the head (``trainable_modules``) had taken the NaN step: the model computed NaN from then
    on and every later knot dropped every link. Refused now, no weight changed."""
    model, opt = _chain(target_modules=["0", "2"], trainable_modules=["4"], non_finite=policy)
    _steps(model, opt, 2)
    weights = [model[i].parametrizations.weight.original.clone() for i in (0, 2)]
    (model(torch.randn(8, 12)).square().mean() * float("nan")).backward()
    with pytest.raises(
        NonFiniteUpdateError, match=r"outside the links.*2 of them, shapes \[\(6, 12\), \(6,\)\]"
    ):
        opt.step()
    assert bool(model[4].weight.isnan().all()) and opt.knots_tied == 0
    after = [model[i].parametrizations.weight.original for i in (0, 2)]
    assert all(torch.equal(a, w) for a, w in zip(after, weights, strict=True))


@pytest.mark.parametrize("reset", ["none", "prune", "moments"])
def test_a_skipped_link_loses_its_state_so_later_links_merge(reset: str) -> None:
    model, opt = _chain(reset=reset, non_finite="skip", knot_every=2)
    _steps(model, opt, 1)
    lora_parametrization(model[2]).lora_B.grad = None  # type: ignore[union-attr]
    model(torch.randn(8, 12)).square().mean().backward()
    lora_parametrization(model[2]).lora_B.grad.fill_(float("nan"))  # type: ignore[union-attr]
    with pytest.warns(RuntimeWarning, match=r"\['2'\]"):
        opt.step()  # NaN reaches the factors and the knot after step 2 drops the link
    opt.zero_grad()
    _steps(model, opt, 4)  # two more knots: "2" merges again, its NaN state gone
    assert [k.skipped for k in opt.history.knots] == [("2",), (), ()]
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_tie_knot_after_merge_and_unload_raises() -> None:
    _model, opt = _chain()
    opt.merge_and_unload()
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        opt.tie_knot()
    assert opt.knots_tied == 0


def test_zero_grad_without_set_to_none_survives_a_rank_step_down() -> None:
    model, opt = _chain(rank=[2, 1], knot_every=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        model(torch.randn(8, 12, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    assert opt.knots_tied == 3 and lora_parametrization(model[0]).rank == 1  # type: ignore[union-attr]


def test_copies_of_the_optimizer_work_and_pickling_says_how_to_save() -> None:
    model, opt = _chain(init="gradient")
    _steps(model, opt, 2)
    clone = copy.deepcopy(opt)
    assert clone.model is not model and clone.optimizer is not opt.optimizer
    _steps(clone.model, clone, 4)
    _steps(model, opt, 4)
    a, b = snapshot(model), snapshot(clone.model)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the copy trains exactly like the original
    shallow = copy.copy(opt)
    assert shallow.optimizer is opt.optimizer and shallow.knots_tied == opt.knots_tied
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(opt)


def test_a_deep_copy_watches_its_own_links_and_lets_the_original_go() -> None:
    """The liveness watch read the links through a lambda over the optimizer it was built in,
    which a deep copy shares: the copy stepped to a knot while the original sat at a fresh link
    (B zero, no gradient) was refused ("no factor of the chain received a gradient"), and it
    kept the original optimizer and model alive."""
    model, opt = _chain()
    _steps(model, opt, 3)  # a knot: the original's new links are zero, without gradients
    clone = copy.deepcopy(opt)
    original = weakref.ref(opt)
    del model, opt
    gc.collect()
    assert original() is None
    _steps(clone.model, clone, 3)
    assert clone.knots_tied == 2


def test_a_knot_hook_must_be_callable() -> None:
    _model, opt = _chain()
    with pytest.raises(TypeError, match=r"hook must be callable .*42"):
        opt.register_knot_hook(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("scheduled", ["wrapper", "base"])
def test_a_deep_copy_of_a_scheduled_chain_trains_itself_after_the_original_is_gone(
    scheduled: str,
) -> None:
    """An LR scheduler patches ``step`` on the instance with a weakref to that optimizer."""
    model, opt = _chain()
    target = opt if scheduled == "wrapper" else opt.optimizer
    sched = torch.optim.lr_scheduler.StepLR(target, step_size=2, gamma=0.5)
    twin_model, twin = _chain()
    twin_sched = torch.optim.lr_scheduler.StepLR(
        twin if scheduled == "wrapper" else twin.optimizer, step_size=2, gamma=0.5
    )
    _steps(model, opt, 2)
    _steps(twin_model, twin, 2)
    clone, clone_sched = copy.deepcopy((opt, sched))
    _steps(clone.model, clone, 1)
    assert (clone.optimizer_steps, opt.optimizer_steps) == (3, 2)  # the copy stepped itself
    del opt, sched, model
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()"
        for _ in range(4):
            _steps(clone.model, clone, 1)
            clone_sched.step()
    for _ in range(5):
        _steps(twin_model, twin, 1)
        if twin.optimizer_steps > 3:
            twin_sched.step()
    a, b = snapshot(twin_model), snapshot(clone.model)
    assert clone.knots_tied == twin.knots_tied == 2
    assert all(torch.equal(a[k], b[k]) for k in a)  # trained exactly like an uncopied run


@pytest.mark.parametrize("trainable", [None, ["2"]], ids=["factors-only", "with-head"])
@pytest.mark.parametrize("reset", ["full", "none", "moments"])
def test_lbfgs_s_one_shared_state_follows_the_reset_policy(
    reset: str, trainable: list[str] | None
) -> None:
    """LBFGS keeps one history, flat over all its parameters, under its first. Before: with a
    ``trainable_modules`` head (first in its group) a full reset kept the last link's curvature
    pairs for the new link; without one, ``reset="none"`` dropped it (a state of another shape
    was taken for a rank change)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    base = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4, history_size=5)
    opt = ChainLoRAOptimizer(
        model, base, target_modules=["0"], trainable_modules=trainable, rank=2, knot_every=2,
        reset=reset,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    histories: list[list[int]] = []
    opt.register_knot_hook(
        lambda o, _r: histories.append([len(s["old_dirs"]) for s in o.state.values()])
    )
    for _ in range(4):
        opt.step(closure)
    kept = reset == "none"  # "moments": a flat history is no moment of one factor: it goes
    assert histories == ([[5], [5]] if kept else [[], []])
    assert opt.knots_tied == 2 and torch.isfinite(closure())


@pytest.mark.parametrize("reset", ["full", "none"])
def test_lbfgs_steps_on_after_a_rank_step_down(reset: str) -> None:
    """LBFGS sums its parameters' sizes once, at its first step, and checks every flat gradient
    against that: after a rank step-down (``rank=[4, 2]``) its next step raised
    ``AssertionError: Expected offset 56 to equal 112``. The knot makes it count again; a
    checkpoint taken after the step-down resumes into an LBFGS chain that stepped before."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 8), torch.randn(16, 4)

    def build() -> tuple[nn.Module, ChainLoRAOptimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
        base = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=3)
        opt = ChainLoRAOptimizer(
            model, base, target_modules=["0", "2"], rank=[4, 2], knot_every=2, reset=reset
        )
        return model, opt

    def run(model: nn.Module, opt: ChainLoRAOptimizer, steps: int) -> None:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        for _ in range(steps):
            opt.step(closure)

    model, opt = build()
    run(model, opt, 5)  # the step-down at step 2, then three steps at rank 2, a knot at 4
    assert opt.knots_tied == 2 and opt.factors()[0].shape[0] == 2
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    model2, opt2 = build()
    run(model2, opt2, 1)  # stepped at rank 4: its size is cached
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    run(model2, opt2, 2)
    run(model, opt, 2)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k
