"""ChainLoRAOptimizer: wrapping, regrouping, knots inside step(), state resets, bad input."""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import assert_same, fingerprint, mlp, requires_grad_map, snapshot, tiny_llama, tiny_opt
from strategies import schedules
from torch import nn

import chainopt
from chainopt import ChainLoRAOptimizer, NonFiniteUpdateError
from chainopt._attach import lora_parametrization

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
}


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 12, generator=gen)
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _wrap(model: nn.Module | None = None, name: str = "adamw", **kw: Any) -> ChainLoRAOptimizer:
    model = model if model is not None else mlp()
    kw.setdefault("target_modules", ["0", "2"])
    kw.setdefault("rank", 3)
    kw.setdefault("knot_every", 4)
    return ChainLoRAOptimizer(model, OPTIMIZERS[name](model.parameters()), **kw)


# --- wrapping ---


def test_the_optimizer_holds_the_chain_and_nothing_that_aliases_its_parts() -> None:
    """Every rebuild assigns ``chain.records`` (FSDP2's rebind, ``merge_and_unload``): nothing
    else may hold that list, or a knot would work on stale records."""
    opt = _wrap()
    records = opt.chain.records
    assert [name for name, value in vars(opt).items() if value is records] == []
    opt.chain.records = list(records)  # what a rebuild does: the optimizer follows
    assert opt.adapted_modules() == [(r.name, r.module) for r in records]
    _train(opt.model, opt, 4)
    assert opt.knots_tied == 1
    opt.merge_and_unload()
    assert opt.chain.records == [] and len(records) == 2  # assigned, the old list untouched
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        opt.tie_knot()


def test_is_an_optimizer_sharing_groups_state_and_defaults() -> None:
    model = mlp()
    base = torch.optim.AdamW(model.parameters(), lr=3e-3)
    opt = ChainLoRAOptimizer(model, base, target_modules=["0"], rank=2, knot_every=5)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    assert opt.defaults is base.defaults
    assert opt.optimizer is base


def test_regroup_moves_factors_into_their_weights_group_and_keeps_hyperparameters() -> None:
    model = mlp()
    base = torch.optim.AdamW(
        [
            {"params": [model[0].weight, model[0].bias], "lr": 1e-3, "weight_decay": 0.0},
            {"params": [model[2].weight, model[2].bias, model[4].weight, model[4].bias]},
        ],
        lr=5e-3,
        weight_decay=0.1,
    )
    opt = ChainLoRAOptimizer(
        model, base, target_modules=["0", "2"], rank=2, knot_every=5, trainable_modules=["4"]
    )
    link0, link2 = lora_parametrization(model[0]), lora_parametrization(model[2])
    g0, g1 = opt.param_groups
    assert (g0["lr"], g0["weight_decay"]) == (1e-3, 0.0)
    assert (g1["lr"], g1["weight_decay"]) == (5e-3, 0.1)
    assert g0["params"] == [link0.lora_A, link0.lora_B]
    assert g1["params"] == [model[4].weight, model[4].bias, link2.lora_A, link2.lora_B]


def test_everything_but_factors_and_trainable_modules_is_frozen() -> None:
    opt = _wrap(trainable_modules=["4"])
    grads = requires_grad_map(opt.model)
    trainable = {n for n, g in grads.items() if g}
    assert trainable == {
        "0.parametrizations.weight.0.lora_A",
        "0.parametrizations.weight.0.lora_B",
        "2.parametrizations.weight.0.lora_A",
        "2.parametrizations.weight.0.lora_B",
        "4.weight",
        "4.bias",
    }
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in opt.model.parameters() if p.requires_grad}


def test_trainable_parameter_count_matches_lora() -> None:
    model = tiny_llama()
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters()),
        target_modules=["q_proj", "v_proj"],
        rank=4,
        knot_every=10,
    )
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # q: 32 -> 32, v: 32 -> 16 (2 kv heads of 8), 2 layers, r = 4
    assert n == 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert len(opt.factors()) == 8


def test_callable_optimizer_gets_the_trainable_parameters() -> None:
    model = mlp()
    seen: list[list[nn.Parameter]] = []

    def factory(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        seen.append(params)
        return torch.optim.SGD(params, lr=0.1)

    opt = ChainLoRAOptimizer(
        model, factory, target_modules=["2"], rank=2, knot_every=3, trainable_modules=["4"]
    )
    assert seen[0] == [*opt.factors(), model[4].weight, model[4].bias]


def test_lora_bias_trains_a_delta_only_where_there_is_a_bias() -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6, bias=False))
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        target_modules=["0", "1"],
        rank=2,
        knot_every=3,
        lora_bias=True,
    )
    assert len(opt.factors()) == 5


# --- knots inside step() ---


@given(schedules, st.sampled_from(sorted(OPTIMIZERS)), st.integers(1, 14))
def test_knots_follow_the_schedule(schedule: dict[str, Any], name: str, steps: int) -> None:
    opt = _wrap(name=name, **{"knot_every": None, **schedule})
    frozen_keys = [k for k in opt.model.state_dict() if "original" in k]
    tied = []
    for t in range(1, steps + 1):
        before = snapshot(opt.model)
        _train(opt.model, opt, 1, seed=t)
        after = snapshot(opt.model)
        knot = opt.knots_tied > len(tied)
        tied.extend([t] if knot else [])
        changed = [k for k in frozen_keys if not torch.equal(before[k], after[k])]
        if knot:
            assert changed, "a knot merged nothing"
            for _n, m in opt.adapted_modules():  # B is zero and state empty right after a knot
                link = lora_parametrization(m)
                assert torch.count_nonzero(link.lora_B) == 0
                assert link.lora_A not in opt.state and link.lora_B not in opt.state
        else:
            assert changed == [], "frozen weights changed between knots"
    if "knot_every" in schedule:
        expected = list(range(schedule["knot_every"], steps + 1, schedule["knot_every"]))
    else:
        expected = [k for k in schedule["knots"] if k <= steps]
    assert tied == expected
    assert opt.optimizer_steps == steps


@given(st.sampled_from(sorted(OPTIMIZERS)), st.integers(0, 2**16))
def test_a_knot_preserves_the_function(name: str, seed: int) -> None:
    torch.manual_seed(seed)
    opt = _wrap(name=name, knot_every=None, knots=[100])
    _train(opt.model, opt, 3, seed=seed)
    x = torch.randn(5, 12)
    with torch.no_grad():
        before = opt.model(x)
        opt.tie_knot()
        after = opt.model(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_adamw_restarts_at_step_one_after_a_knot() -> None:
    opt = _wrap(knot_every=3, trainable_modules=["4"])
    _train(opt.model, opt, 3)
    head = opt.model[4].weight
    assert opt.knots_tied == 1 and int(opt.state[head]["step"]) == 3  # other state untouched
    _train(opt.model, opt, 1)
    link = lora_parametrization(opt.model[0])
    assert int(opt.state[link.lora_A]["step"]) == 1
    assert int(opt.state[head]["step"]) == 4


def test_other_parameters_state_is_untouched_by_a_knot() -> None:
    opt = _wrap(knot_every=2, trainable_modules=["4"], name="sgd_momentum")
    _train(opt.model, opt, 1)
    head = opt.model[4].weight
    before = opt.state[head]["momentum_buffer"].clone()
    opt.tie_knot()
    assert torch.equal(opt.state[head]["momentum_buffer"], before)


def test_new_links_are_drawn_from_the_seeded_generator() -> None:
    a, b, c = (_wrap(seed=s, knot_every=2) for s in (7, 7, 8))
    for opt in (a, b, c):
        opt.model.load_state_dict(a.model.state_dict())
        _train(opt.model, opt, 2)
    link = [lora_parametrization(o.model[0]).lora_A for o in (a, b, c)]
    assert torch.equal(link[0], link[1])
    assert not torch.equal(link[0], link[2])


def test_works_with_an_lr_scheduler() -> None:
    opt = _wrap(knot_every=2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=4)
    for _ in range(4):
        _train(opt.model, opt, 1)
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0
    assert opt.knots_tied == 2


def test_closure_is_passed_through() -> None:
    opt = _wrap(name="sgd_momentum", knot_every=10)
    x = torch.randn(4, 12)

    def closure() -> float:
        opt.zero_grad()
        loss = opt.model(x).square().mean()
        loss.backward()
        return float(loss.detach())

    assert isinstance(opt.step(closure), float)
    assert opt.optimizer_steps == 1


def _scaled_run(base: Callable[[Any], torch.optim.Optimizer], inf_at: int) -> ChainLoRAOptimizer:
    """Seven iterations under a GradScaler; the loss of iteration ``inf_at`` is inf."""
    torch.manual_seed(0)
    model = mlp()
    opt = ChainLoRAOptimizer(
        model, base(model.parameters()), target_modules=["0", "2"], rank=2, knot_every=3
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    gen = torch.Generator().manual_seed(1)
    for i in range(7):
        loss = model(torch.randn(8, 12, generator=gen)).square().mean()
        scaler.scale(loss * (float("inf") if i == inf_at else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize(
    "make",
    [
        lambda fused: lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, fused=fused),
        lambda fused: lambda p: torch.optim.Adam(p, lr=1e-2, fused=fused),
    ],
    ids=["sgd", "adam"],
)
def test_a_grad_scaler_over_a_fused_optimizer_unscales_and_its_skipped_step_ties_no_knot(
    make: Callable[[bool], Callable[[Any], torch.optim.Optimizer]],
) -> None:
    """A fused step unscales and skips by itself, reading ``grad_scale``/``found_inf`` that the
    scaler sets on the optimizer it is given: they must reach the wrapped one. Before, a fused
    SGD stepped on gradients 256 times too large and on the inf ones (the model went inf), and
    the skipped step was counted, so the knot came a step early."""
    plain, fused = _scaled_run(make(False), inf_at=2), _scaled_run(make(True), inf_at=2)
    for opt in (plain, fused):  # the inf step (the 3rd, a knot step) is skipped: 6 counted
        assert (opt.optimizer_steps, [k.step for k in opt.history.knots]) == (6, [3, 6])
    assert len(plain.history.knots) == len(fused.history.knots)
    for (key, a), b in zip(
        plain.model.state_dict().items(), fused.model.state_dict().values(), strict=True
    ):
        assert torch.isfinite(b).all(), key
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=key)
    assert not hasattr(fused.optimizer, "found_inf")  # the scaler removed what it set


def test_a_step_without_gradients_is_counted_like_an_lr_scheduler_step() -> None:
    """What ``step()``'s docstring promises: counted, nothing changed (the knot's guard raises
    if a whole link gets no gradient: ``test_peft_layers.py``)."""
    opt = _wrap(knot_every=3)
    _train(opt.model, opt, 1)
    before = snapshot(opt.model)
    opt.step()
    assert opt.optimizer_steps == 2 and opt.knots_tied == 0
    assert all(torch.equal(v, before[k]) for k, v in snapshot(opt.model).items())
    _train(opt.model, opt, 1)
    assert [k.step for k in opt.history.knots] == [3]


def test_a_frozen_weight_made_trainable_again_is_refused_before_the_step() -> None:
    """``model.requires_grad_(True)`` after wrapping: the adapted weights are not in the
    optimizer, so they would not train, yet their gradients piled up (``zero_grad()`` does not
    clear them) and ``clip_grad_norm_(model.parameters())`` counted them: the factors' updates
    shrank a little more each step, silently. Refused; re-frozen, it trains on; a weight the user
    adds to the optimizer trains as in any optimizer."""
    opt = _wrap(name="sgd_momentum", knot_every=2)
    model = opt.model
    _train(model, opt, 1)
    model.requires_grad_(True)
    model(torch.randn(8, 12)).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    before, state = snapshot(model), {k: dict(v) for k, v in opt.state.items()}
    with pytest.raises(RuntimeError, match=r"'0'.*requires grad again.*4 such tensors"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    assert opt.optimizer_steps == 1 and len(opt.state) == len(state)
    model.requires_grad_(False)
    for group in opt.param_groups:
        for p in group["params"]:
            p.requires_grad_(True)
    opt.zero_grad()  # stale gradients under the links go too: clipping no longer sees them
    assert [n for n, p in model.named_parameters() if p.grad is not None] == ["4.weight", "4.bias"]
    _train(model, opt, 1)
    assert (opt.optimizer_steps, opt.knots_tied) == (2, 1)
    weight = model[2].parametrizations.weight.original
    weight.requires_grad_(True)
    opt.add_param_group({"params": [weight], "lr": 0.1})
    opt.zero_grad()
    w = weight.detach().clone()
    _train(model, opt, 1)
    assert not torch.equal(weight, w)


@pytest.mark.parametrize("move", ["meta", "overwrite"])
def test_a_model_whose_parameters_a_move_replaced_is_refused_before_the_step(move: str) -> None:
    """``model.to("meta")`` (and any ``.to`` under torch's overwrite-on-conversion flag) gives the
    model new Parameter objects: the optimizer trained the old ones, which the model no longer
    uses, silently until a knot, whose error blamed DeepSpeed."""
    opt = _wrap(knot_every=3)
    _train(opt.model, opt, 1)
    old = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    if move == "meta":
        opt.model.to("meta")
    else:
        flag = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            opt.model.float()  # already float32: nothing but new Parameter objects
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(flag)
    for p in opt.factors():
        p.grad = torch.ones_like(p)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(
        RuntimeError,
        match=r"steps '0\.parametrizations\.weight\.0\.lora_A' \(4 parameter\(s\) in all\) as the",
    ):
        opt.step()
    assert opt.optimizer_steps == 1
    assert all(torch.equal(p, o) for p, o in zip(opt.param_groups[0]["params"], old, strict=True))


class _Delegating(torch.optim.Optimizer):
    """An optimizer whose step is another optimizer's over the same parameters (as
    ``ZeroRedundancyOptimizer`` or a lookahead wrapper step an inner one)."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})
        self.inner = torch.optim.SGD(self.param_groups[0]["params"], lr=0.1)

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self.inner.step()


class _Wrapper(torch.optim.Optimizer):
    """A torch optimizer around another, holding it as ``_optimizer`` (as Lightning's
    ``LightningOptimizer`` does) and sharing its groups; its step is hooked as any optimizer's."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        super().__init__([torch.zeros(1, requires_grad=True)], {})
        self._optimizer = inner
        self.param_groups = inner.param_groups

    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        self._optimizer.step(closure)


def test_another_optimizer_stepping_the_factors_is_refused_before_it_steps() -> None:
    """A trainer handed the chained model but not the chain (``Trainer(model, args)`` with no
    ``optimizers=``) builds an AdamW of its own over ``model.parameters()``, the factors: it
    trained the first link and never tied a knot, silently."""
    opt = _wrap(knot_every=2)
    other = torch.optim.AdamW(opt.model.parameters(), lr=1e-2)
    _train(opt.model, opt, 1)  # the chain's own steps, before and after, are fine
    before = snapshot(opt.model)
    for p in opt.factors():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"this AdamW is not the chain's optimizer.*'0'"):
        other.step()
    assert_same(snapshot(opt.model), before)
    assert not other.state
    opt.zero_grad()
    _train(opt.model, opt, 3)
    assert opt.optimizer_steps == 4 and opt.knots_tied == 2

    # An optimizer the wrapped one steps inside the chain's step, the wrapped optimizer itself
    # (DeepSpeed steps it), a wrapper around the chain, a copy's own optimizer step; other
    # parameters are free.
    model = mlp()
    chain = ChainLoRAOptimizer(model, _Delegating, target_modules=["0", "2"], knot_every=2)
    _train(model, chain, 2)
    _train(model, _Wrapper(chain), 2)
    assert chain.knots_tied == 2
    copied = copy.deepcopy(opt)
    _train(copied.model, copied, 2)
    assert copied.knots_tied == 3 and opt.knots_tied == 2
    with pytest.raises(RuntimeError, match="not the chain's optimizer"):
        torch.optim.SGD(copied.model.parameters(), lr=0.1).step()
    torch.optim.SGD(mlp().parameters(), lr=0.1).step()

    # The wrapped optimizer stepped on its own: an engine's step, which it counts with
    # count_step(); a second one with no count_step() in between was handed over in place of
    # the chain (Trainer(optimizers=(base, ...))): nothing would count its steps.
    for p in opt.factors():
        p.grad = torch.full_like(p, 0.1)
    opt.optimizer.step()
    opt.count_step()
    assert opt.optimizer_steps == 5
    opt.optimizer.step()
    before = snapshot(opt.model)
    with pytest.raises(RuntimeError, match=r"AdamW the chain wraps was stepped again"):
        opt.optimizer.step()
    assert_same(snapshot(opt.model), before)
    opt.count_step()  # step 6: a knot
    assert opt.knots_tied == 3
    opt.optimizer.step()
    opt.merge_and_unload()  # no chain left: the plain model trains with any optimizer
    torch.optim.SGD(opt.model.parameters(), lr=0.1).step()


def test_a_training_loop_with_clipping_and_a_schedule_is_lora_with_merges_written_by_hand() -> None:
    """AdamW with weight decay, ``clip_grad_norm_(model.parameters())``, a cosine schedule on the
    chain and a knot every 3 steps, against the same loop written out in float64: plain LoRA
    factors, ``W += s·B·A`` at each knot, the new A taken from the chain, B zero and a fresh AdamW
    state for the factors (the paper's "new optimizer state")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 6))
    weight, bias = model[0].weight.detach().double(), model[0].bias.detach().double()
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1),
        target_modules=["0"], rank=2, alpha=4, knot_every=3,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    link = lora_parametrization(model[0])
    a = nn.Parameter(link.lora_A.detach().double().clone())
    b = nn.Parameter(link.lora_B.detach().double().clone())
    ref = torch.optim.AdamW([a, b], lr=3e-2, weight_decay=0.1)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, 10)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 11):
        x, t = torch.randn(8, 12, generator=gen), torch.randn(8, 6, generator=gen)
        nn.functional.mse_loss(model(x), t).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
        sched.step()
        opt.zero_grad()
        out = x.double() @ (weight + 2.0 * b @ a).T + bias  # s = alpha / rank = 2
        nn.functional.mse_loss(out, t.double()).backward()
        torch.nn.utils.clip_grad_norm_([a, b], 0.05)
        ref.step()
        ref_sched.step()
        ref.zero_grad()
        if step % 3 == 0:
            with torch.no_grad():
                weight += 2.0 * b @ a
                a.copy_(link.lora_A)
                b.zero_()
            ref.state.clear()
        chained = model[0].parametrizations.weight.original.double() + 2.0 * (
            link.lora_B.double() @ link.lora_A.double()
        )
        torch.testing.assert_close(chained, weight + 2.0 * b @ a, rtol=0, atol=1e-6)
    assert opt.knots_tied == 3 and float(opt.param_groups[0]["lr"]) == ref.param_groups[0]["lr"]


def test_step_hooks_fire_once_per_step_around_the_knot() -> None:
    """The chain's own step hooks wrap the whole step: the pre-hook before the wrapped
    optimizer's, the post-hook after the knot (it sees the new link); the wrapped optimizer's
    hooks fire inside, before the knot."""
    opt = _wrap(knot_every=2)
    seen: list[tuple[str, int, int]] = []

    def log(name: str) -> Callable[..., None]:
        return lambda o, *_: seen.append((name, opt.optimizer_steps, opt.knots_tied))

    handles = [opt.register_step_pre_hook(log("pre")), opt.register_step_post_hook(log("post"))]
    opt.optimizer.register_step_pre_hook(log("base pre"))
    opt.optimizer.register_step_post_hook(log("base post"))
    opt.register_knot_hook(log("knot"))
    _train(opt.model, opt, 2)
    assert seen == [
        ("pre", 0, 0), ("base pre", 0, 0), ("base post", 0, 0), ("post", 1, 0),
        ("pre", 1, 0), ("base pre", 1, 0), ("base post", 1, 0), ("knot", 2, 1), ("post", 2, 1),
    ]  # fmt: skip
    for handle in handles:
        handle.remove()
    seen.clear()
    _train(opt.model, opt, 1)
    assert [name for name, *_ in seen] == ["base pre", "base post"]


def test_training_reduces_the_loss_across_knots_on_hf_models() -> None:
    for model in (tiny_llama(), tiny_opt()):
        opt = ChainLoRAOptimizer(
            model,
            torch.optim.AdamW(model.parameters(), lr=5e-3),
            target_modules=["q_proj", "v_proj"],
            rank=4,
            alpha=8,
            knot_every=5,
        )
        ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
        model.train()
        losses = []
        for _ in range(15):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert opt.knots_tied == 3
        assert losses[-1] < losses[0] - 0.05


def test_non_finite_factor_at_knot_raises_and_changes_nothing() -> None:
    opt = _wrap(knot_every=2)
    _train(opt.model, opt, 1)
    link = lora_parametrization(opt.model[2])
    with torch.no_grad():
        link.lora_B[0, 0] = float("nan")
    before = snapshot(opt.model)
    state_before = {id(p): dict(s) for p, s in opt.state.items()}
    with pytest.raises(NonFiniteUpdateError, match=r"\['2'\].*no weight was changed"):
        opt.tie_knot()
    after = snapshot(opt.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().any() for k in before)
    assert {id(p) for p in opt.state} == set(state_before)
    assert opt.knots_tied == 0


def test_merge_and_unload_leaves_plain_linears_with_the_same_outputs() -> None:
    opt = _wrap(knot_every=3)
    _train(opt.model, opt, 5)
    weights = [opt.model[i].parametrizations.weight.original for i in (0, 2)]
    x = torch.randn(4, 12)
    with torch.no_grad():
        before = opt.model(x)
    model = opt.merge_and_unload()
    assert all(type(model[i]) is nn.Linear for i in (0, 2))
    assert [model[0].weight, model[2].weight] == weights  # same Parameter objects
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    held = [p for g in opt.param_groups for p in g["params"]]
    assert held == [] and len(opt.state) == 0
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        opt.step()


# --- bad input: a clear error, and nothing changed ---


def _assert_untouched(
    model: nn.Module, before: dict[str, torch.Tensor], grads: dict[str, bool]
) -> None:
    assert all(lora_parametrization(m) is None for m in model.modules())
    assert all(type(m) in (nn.Linear, nn.Tanh, nn.Sequential, nn.ReLU) for m in model.modules())
    assert requires_grad_map(model) == grads
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


BAD: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"target_modules": ["nope"]}, ValueError, r"target_modules=\['nope'\] matches no module"),
    ({"target_modules": ["1"]}, TypeError, r"matches '1', a Tanh; only torch.nn.Linear"),
    ({"target_modules": 5}, TypeError, "target_modules must be a str"),
    ({"rank": 0}, ValueError, "rank must be a positive int .*got 0"),
    ({"rank": -2}, ValueError, "rank must be a positive int .*got -2"),
    ({"rank": 2.0}, ValueError, "rank must be a positive int .*got 2.0"),
    ({"rank": 7}, ValueError, r"no larger than min\(in_features, out_features\)=6 of '4', got 7"),
    ({"alpha": 0}, ValueError, "alpha must be a positive number, got 0"),
    ({"alpha": -1.0}, ValueError, "alpha must be a positive number, got -1.0"),
    ({"alpha": float("inf")}, ValueError, "alpha must be finite, got inf"),
    ({"alpha": float("nan")}, ValueError, "alpha must be a positive number, got nan"),
    ({"knot_every": None}, ValueError, "exactly one of knot_every and knots"),
    ({"knots": [3]}, ValueError, "exactly one of knot_every and knots"),
    ({"knot_every": None, "knots": [4, 2]}, ValueError, r"strictly increasing .* got \[4, 2\]"),
    ({"knot_every": None, "knots": [0]}, ValueError, r"positive ints, got \[0\]"),
    ({"knot_every": -3}, ValueError, "knot_every must be a positive int, got -3"),
    ({"lora_bias": True, "target_modules": ["x"]}, ValueError, "matches no module"),
    ({"trainable_modules": ["zzz"]}, ValueError, r"trainable_modules=\['zzz'\] matches no module"),
    ({"trainable_modules": ["0"]}, ValueError, "'0' is in both target_modules and trainable"),
    ({"factor_dtype": "float32"}, TypeError, "factor_dtype must be a floating torch.dtype"),
    ({"factor_dtype": torch.int8}, TypeError, "factor_dtype must be a floating torch.dtype"),
    ({"seed": 1.5}, TypeError, "seed must be an int, got 1.5"),
    ({"exact_merge": "yes"}, TypeError, "exact_merge must be None or a bool"),
]


@pytest.mark.parametrize(("kwargs", "err", "match"), BAD)
def test_bad_arguments_raise_before_anything_changes(
    kwargs: dict[str, Any], err: type[Exception], match: str
) -> None:
    model = mlp(width=12, out=6)
    base = torch.optim.AdamW(model.parameters())
    groups = [list(g["params"]) for g in base.param_groups]
    before, grads = snapshot(model), requires_grad_map(model)
    args = {"target_modules": ["0", "4"], "rank": 2, "knot_every": 3, **kwargs}
    with pytest.raises(err, match=match):
        ChainLoRAOptimizer(model, base, **args)
    _assert_untouched(model, before, grads)
    assert [list(g["params"]) for g in base.param_groups] == groups


def test_foreign_parameters_in_the_optimizer_are_refused() -> None:
    model = mlp()
    stranger = nn.Parameter(torch.zeros(3, 5))
    base = torch.optim.SGD([*model.parameters(), stranger], lr=0.1)
    before, grads = snapshot(model), requires_grad_map(model)
    with pytest.raises(ValueError, match=r"shape \(3, 5\) .* not a parameter of model"):
        ChainLoRAOptimizer(model, base, target_modules=["0"], knot_every=2, rank=2)
    _assert_untouched(model, before, grads)


@pytest.mark.parametrize("bad", [None, 3, "adamw"])
def test_optimizer_of_the_wrong_type_is_refused(bad: object) -> None:
    model = mlp()
    before, grads = snapshot(model), requires_grad_map(model)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        ChainLoRAOptimizer(model, bad, target_modules=["0"], knot_every=2)  # type: ignore[arg-type]
    _assert_untouched(model, before, grads)


def test_a_failing_optimizer_factory_leaves_the_model_as_it_was() -> None:
    model = mlp()
    before, grads = snapshot(model), requires_grad_map(model)
    with pytest.raises(TypeError, match="optimizer factory must return"):
        ChainLoRAOptimizer(model, lambda p: "not an optimizer", target_modules=["0"], knot_every=2)  # type: ignore[arg-type, return-value]
    _assert_untouched(model, before, grads)


def test_a_model_is_wrapped_once() -> None:
    opt = _wrap()
    with pytest.raises(ValueError, match="already wrapped by a ChainLoRAOptimizer"):
        ChainLoRAOptimizer(
            opt.model, torch.optim.SGD(opt.factors(), lr=1), target_modules=["4"], knot_every=1
        )
    with pytest.raises(ValueError, match="already a ChainLoRAOptimizer"):
        ChainLoRAOptimizer(mlp(), opt, target_modules=["0"], knot_every=1)


def test_a_deep_copy_of_a_wrapped_model_is_refused_with_the_two_ways_to_chain_a_copy() -> None:
    """``copy.deepcopy(model)`` carries the links: a second chain on it is refused, and the
    message names the two ways that work, each checked here."""
    import copy

    import chainopt

    opt = _wrap()
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(0))
    opt.model(x).square().mean().backward()
    opt.step()
    copied = copy.deepcopy(opt.model)
    before = snapshot(copied)
    with pytest.raises(ValueError, match=r"deepcopy of a wrapped model.*copy\.deepcopy\(opt\)"):
        _wrap(copied)
    assert all(torch.equal(v, copied.state_dict()[k]) for k, v in before.items())
    twin = copy.deepcopy(opt)  # the first way: the copy's own chain
    twin.model(x).square().mean().backward()
    twin.step()
    with torch.no_grad():
        expected = opt.model(x)
    chainopt.merge_and_unload(copied)  # the second way: unload, then chain the plain model
    with torch.no_grad():
        torch.testing.assert_close(copied(x), expected, rtol=1e-6, atol=1e-6)
    _wrap(copied).step()


def test_a_model_already_in_ddp_is_refused_with_advice(tmp_path: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        before, grads = snapshot(model), requires_grad_map(model)
        with pytest.raises(
            ValueError, match=re.escape("wrap the bare model with ChainLoRAOptimizer first")
        ):
            ChainLoRAOptimizer(
                ddp, torch.optim.SGD(ddp.parameters(), lr=1), target_modules=["0"], knot_every=2
            )
        _assert_untouched(model, before, grads)
    finally:
        dist.destroy_process_group()


def test_an_already_parametrized_weight_is_refused() -> None:
    from torch.nn.utils import parametrize

    class Id(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w

    model = mlp()
    parametrize.register_parametrization(model[0], "weight", Id())
    with pytest.raises(ValueError, match="'0', whose weight or bias is already parametrized"):
        ChainLoRAOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=1), target_modules=["0"], knot_every=2
        )
    assert lora_parametrization(model[0]) is None and model[2].weight.requires_grad


# --- chain shapes: num_links schedules and rank step-down ---


def test_num_links_spreads_knots_evenly() -> None:
    opt = _wrap(knot_every=None, num_links=3, total_steps=9)
    _train(opt.model, opt, 9)
    assert [k.step for k in opt.history.knots] == [3, 6]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_links": 3}, "num_links and total_steps go together"),
        ({"num_links": 3, "total_steps": 9, "knot_every": 3}, "give one schedule"),
        ({"knot_every": None, "num_links": 4, "total_steps": 9, "steps_per_epoch": 3}, "epochs"),
        ({"steps_per_epoch": 3}, "steps_per_epoch goes with num_links"),
        ({"rank": [], "knot_every": 2}, r"got \[\]"),
        ({"rank": [2, 0], "knot_every": 2}, r"got \[2, 0\]"),
        ({"rank": [2, 13], "knot_every": 2}, "got 13"),
    ],
)
def test_bad_chain_shapes_are_refused(kwargs: dict[str, Any], match: str) -> None:
    model = mlp()
    before, grads = snapshot(model), requires_grad_map(model)
    kw = {"target_modules": ["0"], "rank": 2, "knot_every": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=1), **kw)
    _assert_untouched(model, before, grads)


def test_rank_step_down_resizes_factors_in_place() -> None:
    opt = _wrap(rank=[4, 2, 1], knot_every=2, alpha=8)
    a = lora_parametrization(opt.model[0]).lora_A
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.5, total_iters=8)
    shapes = []
    for _ in range(8):
        _train(opt.model, opt, 1)
        sched.step()
        link = lora_parametrization(opt.model[0])
        shapes.append((tuple(link.lora_A.shape), link.scale))
    assert lora_parametrization(opt.model[0]).lora_A is a  # same Parameter object
    assert a.dtype == torch.float32 and a.requires_grad
    assert shapes[0] == ((4, 12), 2.0) and shapes[1] == ((2, 12), 4.0)
    assert shapes[3] == ((1, 12), 8.0) and shapes[7] == ((1, 12), 8.0)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in opt.factors()} <= held
    assert opt.chain_summary().ranks == (4, 2, 1, 1, 1)


def test_rank_step_down_resumes_mid_second_link() -> None:
    def build() -> ChainLoRAOptimizer:
        torch.manual_seed(0)
        return _wrap(rank=[4, 2], knot_every=3, alpha=8)

    straight = build()
    _train(straight.model, straight, 7)
    first = build()
    _train(first.model, first, 4)
    resumed = build()  # built with rank 4, loads rank-2 factors
    resumed.model.load_state_dict(first.model.state_dict())
    resumed.load_state_dict(first.state_dict())
    gen_skip = torch.Generator().manual_seed(1)
    for _ in range(4):
        torch.randn(8, 12, generator=gen_skip)
    for _ in range(3):
        x = torch.randn(8, 12, generator=gen_skip)
        resumed.model(x).square().mean().backward()
        resumed.step()
        resumed.zero_grad()
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_rank_step_down_is_refused_under_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="DistributedDataParallel's buckets cannot follow"):
        _wrap(rank=[4, 2])


@pytest.mark.parametrize("keep_history", [True, False])
def test_chain_summary_reports_norms_and_effective_rank(keep_history: bool) -> None:
    opt = _wrap(rank=2, knot_every=3, keep_history=keep_history)
    _train(opt.model, opt, 7)
    s = opt.chain_summary()
    assert s.links == 3 and s.knot_steps == (3, 6) and s.steps == 7
    m = s.modules["0"]
    assert len(m.update_norms) == 2 and all(n is not None and n > 0 for n in m.update_norms)
    # three rank-2 links (two merged, one pending); unknown without the merged factors
    assert m.effective_rank == (6 if keep_history else None)
    assert s.to_dict()["modules"]["0"]["effective_rank"] == m.effective_rank


def test_a_knot_causes_no_recompile() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    opt = _wrap(knot_every=2)
    compiled = torch.compile(opt.model, backend="eager", fullgraph=True)
    x = torch.randn(4, 12)
    for _ in range(2):  # the second step ties a knot
        compiled(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    frames = counters["stats"]["unique_graphs"]
    for _ in range(3):
        compiled(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.knots_tied == 2
    assert counters["stats"]["unique_graphs"] == frames  # no new graph after knots


def test_count_step_counts_a_step_taken_outside_and_ties_the_knot() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             target_modules=["0"], rank=2, knot_every=2)  # fmt: skip
    for _ in range(2):
        model(torch.randn(2, 4)).sum().backward()
        opt.optimizer.step()  # an engine stepped the wrapped optimizer itself
        opt.count_step()
        opt.zero_grad()
    assert (opt.optimizer_steps, opt.knots_tied) == (2, 1)


def _unload_with_chainopt(model: nn.Module) -> None:
    import chainopt

    chainopt.merge_and_unload(model)


def _unload_with_torch(model: nn.Module) -> None:
    from torch.nn.utils import parametrize

    for module in model.modules():  # what a generic "remove every parametrization" does
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):  # type: ignore[union-attr]
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)


@pytest.mark.parametrize("unload", [_unload_with_chainopt, _unload_with_torch])
@pytest.mark.parametrize("entry", ["step", "tie_knot", "count_step"])
def test_an_optimizer_whose_model_was_unloaded_refuses_before_changing_anything(
    unload: Callable[[nn.Module], None], entry: str
) -> None:
    """Unloading the model behind the optimizer's back: the stale link never merges twice."""
    torch.manual_seed(0)
    model = mlp()
    opt = _wrap(model, knot_every=3, lora_bias=True)
    _train(model, opt, 2)  # the next step is a knot's; a link is pending
    x = torch.randn(5, 12)
    unload(model)
    model.zero_grad()
    before, out = snapshot(model), model(x)
    steps, knots = opt.optimizer_steps, opt.knots_tied
    with pytest.raises(RuntimeError, match="no longer carries this optimizer's links"):
        if entry == "step":
            opt.step()
        elif entry == "count_step":
            opt.count_step()
        else:
            opt.tie_knot()
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(x), out)
    assert (opt.optimizer_steps, opt.knots_tied) == (steps, knots)


# --- construction in odd but legal situations ---


def test_trainable_modules_the_optimizer_left_out_join_the_first_group_and_train() -> None:
    """A head frozen before and so left out of the optimizer, then named in
    ``trainable_modules``, was set to require gradients but never stepped: silently untrained."""
    model = mlp()
    model[4].requires_grad_(False)
    base = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt = ChainLoRAOptimizer(model, base, target_modules=["0"], trainable_modules=["4"],
                             rank=2, knot_every=2)  # fmt: skip
    [group] = opt.param_groups
    assert {id(p) for p in model[4].parameters()} <= {id(p) for p in group["params"]}
    head = model[4].weight.detach().clone()
    _train(opt.model, opt, 3)
    assert not torch.equal(model[4].weight, head)


def test_a_model_in_eval_mode_stays_in_eval_mode_links_included() -> None:
    """The link's own modules (parametrize's bookkeeping, the LoRA parametrization) were added
    in training mode to a model in eval mode."""
    model = mlp().eval()
    ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       target_modules=["0", "2"], rank=2, knot_every=2)  # fmt: skip
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_a_second_chain_on_a_model_is_refused_leaving_model_and_both_optimizers_alone() -> None:
    model = mlp()
    first = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()),
                               target_modules=["0"], rank=2, knot_every=2)  # fmt: skip
    _train(model, first, 1)
    second = torch.optim.AdamW(model.parameters())
    before = (fingerprint(model, first), fingerprint(model, second))
    with pytest.raises(ValueError, match="already wrapped by a ChainLoRAOptimizer"):
        ChainLoRAOptimizer(model, second, target_modules=["2"], rank=2, knot_every=2)
    with pytest.raises(ValueError, match="already a ChainLoRAOptimizer"):
        ChainLoRAOptimizer(mlp(), first, target_modules=["2"], rank=2, knot_every=2)
    assert_same(before, (fingerprint(model, first), fingerprint(model, second)))
    _train(model, first, 3)  # the first chain goes on as before
    assert first.knots_tied == 2


@pytest.mark.parametrize("unload", ["method", "function"])
def test_a_model_whose_chain_was_unloaded_takes_a_new_chain(unload: str) -> None:
    model = mlp()
    first = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()),
                               target_modules=["0"], rank=2, knot_every=2)  # fmt: skip
    _train(model, first, 3)
    if unload == "method":
        first.merge_and_unload()
    else:
        chainopt.merge_and_unload(model)
    x = torch.randn(4, 12)
    with torch.no_grad():
        out = model(x)
    for p in model.parameters():  # unloading leaves everything frozen
        p.requires_grad_(True)
    second = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()),
                                target_modules=["0", "2"], rank=3, knot_every=2)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)  # a new link adds nothing
    _train(model, second, 4)
    assert second.knots_tied == 2 and [n for n, _ in second.adapted_modules()] == ["0", "2"]


def test_a_bias_delta_joins_the_group_of_its_bias_and_a_and_b_that_of_the_weight() -> None:
    """The ``Trainer``'s groups: weights with weight decay, biases without. The bias delta
    joined the weights' group and so was decayed, unlike the bias it adds to."""
    model = mlp()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    base = torch.optim.AdamW([{"params": weights, "weight_decay": 0.1},
                              {"params": biases, "weight_decay": 0.0}], lr=1e-3)  # fmt: skip
    opt = ChainLoRAOptimizer(model, base, target_modules=["0", "2"], lora_bias=True, rank=2,
                             knot_every=2)  # fmt: skip
    decayed, free = ({id(p) for p in g["params"]} for g in opt.param_groups)
    for name in ("0", "2"):
        record = next(r for r in opt.chain.records if r.name == name)
        assert {id(record.link.lora_A), id(record.link.lora_B)} <= decayed
        assert record.delta is not None and id(record.delta.delta) in free
    assert len(decayed) == 4 and len(free) == 2  # frozen weights and biases left


@pytest.mark.parametrize(
    "factory",
    [functools.partial(torch.optim.AdamW, lr=1e-2), torch.optim.AdamW,
     lambda params: torch.optim.SGD(params, lr=0.1)],
)  # fmt: skip
def test_a_factory_of_any_callable_form_steps_exactly_the_factors(factory: Any) -> None:
    model = mlp()
    opt = ChainLoRAOptimizer(model, factory, target_modules=["0"], trainable_modules=["4"],
                             rank=2, knot_every=2)  # fmt: skip
    held = [p for g in opt.param_groups for p in g["params"]]
    assert held == [*opt.factors(), *model[4].parameters()]
    b = opt.factors()[1].detach().clone()
    _train(model, opt, 1)
    assert not torch.equal(opt.factors()[1], b)


def test_a_knot_that_would_merge_nothing_raises_before_the_step_changes_anything() -> None:
    """The error says "Nothing was changed": the step that raised is neither taken nor counted
    (a trained head does not move), so once the loss goes through the chain again the knot
    due is tied at its step, not skipped to the next one."""
    torch.manual_seed(0)
    model = mlp(width=8, depth=1, out=4)  # "0" chained, "2" a trained head
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules=["0"], rank=2,
        trainable_modules=["2"], knot_every=2,
    )  # fmt: skip
    x = torch.randn(4, 8)

    def head_only_step() -> None:  # a loss that never reaches the chained layer
        model[2](x).square().mean().backward()
        opt.step()

    head_only_step()
    opt.zero_grad()
    model[2](x).square().mean().backward()
    before, state = snapshot(model), copy.deepcopy(opt.state_dict()["state"])
    with pytest.raises(RuntimeError, match="no factor of the chain received a gradient"):
        opt.step()
    assert opt.optimizer_steps == 1 and opt.knots_tied == 0
    assert_same(snapshot(model), before)
    assert all(
        torch.equal(t, state[i][k]) for i, s in opt.state_dict()["state"].items()
        for k, t in s.items()
    )  # fmt: skip
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()
    assert (opt.optimizer_steps, opt.knots_tied) == (2, 1)
    assert opt.history.knots[0].step == 2
