"""Reset policies for the factors' optimizer state at a knot."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import mlp
from test_optimizer import _train

from chainopt import ChainLoRAOptimizer
from chainopt._attach import lora_parametrization
from chainopt._scratch import initial_state
from chainopt.reset import resolve_reset


@given(st.integers(1, 200), st.floats(0.0, 0.99))
def test_prune_zeroes_the_smallest_fraction(n: int, ratio: float) -> None:
    p = torch.nn.Parameter(torch.zeros(n))
    values = torch.randperm(n).float() + 1  # distinct magnitudes
    second = torch.rand(n) + 1
    state = {
        p: {"exp_avg": values.clone(), "exp_avg_sq": second.clone(), "step": torch.tensor(3.0)}
    }
    resolve_reset("prune", prune_ratio=ratio)(state, [p])
    k = int(ratio * n)
    kept = state[p]["exp_avg"]
    assert int((kept == 0).sum()) == k
    assert torch.equal(kept[kept != 0].sort().values, values.sort().values[k:])
    # One mask: the second moment is zeroed exactly where the first is (never √0 under a kept m).
    assert torch.equal(state[p]["exp_avg_sq"] == 0, kept == 0)
    assert float(state[p]["step"]) == 3.0


def test_prune_keeps_adam_finite_across_many_knots() -> None:
    torch.manual_seed(0)
    target = torch.randn(16, 16)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16, bias=False))
    opt = ChainLoRAOptimizer(
        model, torch.optim.Adam(model.parameters(), lr=5e-2), target_modules=["0"], rank=2,
        knot_every=5, reset="prune", prune_ratio=0.99,
    )  # fmt: skip
    for _ in range(60):
        x = torch.randn(32, 16)
        torch.nn.functional.mse_loss(model(x), x @ target.T).backward()
        opt.step()
        opt.zero_grad()
    w = model[0].parametrizations.weight.original
    assert torch.isfinite(w).all() and w.abs().max() < 100


def _chain(reset: str, name: str = "adamw", rank: object = 3) -> ChainLoRAOptimizer:
    model = mlp()
    base = (
        torch.optim.AdamW(model.parameters(), lr=1e-2)
        if name == "adamw"
        else torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    )
    return ChainLoRAOptimizer(
        model, base, target_modules=["0", "2"], rank=rank, knot_every=2, reset=reset
    )


def test_none_keeps_the_state_and_full_drops_it() -> None:
    kept, dropped = _chain("none"), _chain("full")
    for opt in (kept, dropped):
        _train(opt.model, opt, 1)
    a_kept = lora_parametrization(kept.model[0]).lora_A
    before = kept.state[a_kept]["exp_avg"].clone()
    _train(kept.model, kept, 1)  # step 2: knot
    _train(dropped.model, dropped, 1)
    after = kept.state[a_kept]["exp_avg"]
    assert int(kept.state[a_kept]["step"]) == 2
    assert after.shape == before.shape and not torch.equal(after, torch.zeros_like(after))
    assert lora_parametrization(dropped.model[0]).lora_A not in dropped.state


def test_prune_policy_prunes_moments_at_a_knot() -> None:
    opt = _chain("prune", name="sgd")
    _train(opt.model, opt, 2)
    buf = opt.state[lora_parametrization(opt.model[0]).lora_A]["momentum_buffer"]
    assert (buf == 0).float().mean() >= 0.9 - 1 / buf.numel()


def test_a_rank_change_always_drops_the_state() -> None:
    opt = _chain("none", rank=[3, 2])
    _train(opt.model, opt, 2)
    link = lora_parametrization(opt.model[0])
    assert link.lora_A.shape == (2, 12) and link.lora_A not in opt.state
    _train(opt.model, opt, 1)
    assert opt.state[link.lora_A]["exp_avg"].shape == (2, 12)


def _adafactor_states(reset: str, knot_every: int, rank: object = 3) -> dict[str, dict]:
    """Every factor's Adafactor state after two steps, by parameter name."""
    torch.manual_seed(0)
    model = mlp()
    opt = ChainLoRAOptimizer(
        model, torch.optim.Adafactor(model.parameters(), lr=1e-2), target_modules=["0", "2"],
        rank=rank, knot_every=knot_every, reset=reset, lora_bias=True,
    )  # fmt: skip
    _train(model, opt, 2)
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: dict(opt.state[p]) for p in opt.factors() if p in opt.state}


@pytest.mark.parametrize("reset", ["none", "moments", "prune"])
def test_adafactor_s_factored_state_is_kept_or_zeroed_as_the_policy_says(reset: str) -> None:
    """Adafactor keeps a matrix's second moment as a row and a column factor, never shaped like
    the parameter. Before, that was taken for a rank change: every policy dropped the whole state
    and its step counter, so ``"none"`` kept nothing and ``"moments"`` restarted the counters."""
    unknotted, knotted = _adafactor_states(reset, 100), _adafactor_states(reset, 2)
    assert sorted(knotted) == sorted(unknotted) and len(knotted) == 6  # A, B, bias delta x 2
    matrices = 0
    for name, state in knotted.items():
        assert sorted(state) == sorted(unknotted[name]), name
        assert torch.equal(state["step"], unknotted[name]["step"]) and float(state["step"]) == 2
        for key, value in state.items():
            if key == "step":
                continue
            if reset == "moments":
                assert value.shape == unknotted[name][key].shape and not value.any(), (name, key)
            elif reset == "none" or value.dim() == 2:  # prune: no mask fits a factored moment
                assert torch.equal(value, unknotted[name][key]), (name, key)
            else:  # a bias delta's full second moment, pruned
                assert (value == 0).float().mean() >= 0.9 - 1 / value.numel(), (name, key)
        matrices += "row_var" in state
    assert matrices == 4


@pytest.mark.parametrize("reset", ["none", "moments", "prune"])
def test_transformers_adafactor_s_factored_state_is_kept_or_restarted(reset: str) -> None:
    """transformers' ``Adafactor`` (the HF ``Trainer``'s ``optim="adafactor"``) keeps a
    matrix's factors as ``(rows,)`` and ``(cols,)``. Before, ``"prune"`` took them for state of
    another parameter and dropped the whole state with its step counter and RMS."""
    from transformers.optimization import Adafactor

    def states(knot_every: int) -> dict[str, dict[str, object]]:
        torch.manual_seed(0)
        model = mlp()
        opt = ChainLoRAOptimizer(
            model, lambda ps: Adafactor(ps, lr=1e-2, relative_step=False, scale_parameter=False),
            target_modules=["0", "2"], rank=2, knot_every=knot_every, reset=reset,
        )  # fmt: skip
        _train(model, opt, 2)
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: dict(opt.state[p]) for p in opt.factors() if p in opt.state}

    unknotted, knotted = states(100), states(2)
    assert sorted(knotted) == sorted(unknotted) and len(knotted) == 4
    for name, state in knotted.items():
        assert sorted(state) == sorted(unknotted[name]) and state["step"] == 2, name
        for key in ("exp_avg_sq_row", "exp_avg_sq_col"):
            value, was = state[key], unknotted[name][key]
            assert isinstance(value, torch.Tensor) and isinstance(was, torch.Tensor)
            assert value.dim() == 1 and value.shape == was.shape
            if reset == "moments":  # where a fresh Adafactor's first step leaves them
                assert float(value.abs().max()) < 1e-20, (name, key)
            else:  # kept: prune has no mask for a factor
                assert torch.equal(value, was), (name, key)


def test_a_rank_change_drops_adafactor_s_state_under_any_policy() -> None:
    states = _adafactor_states("none", 2, rank=[3, 2])
    assert not any(n.endswith(("lora_A", "lora_B")) for n in states)  # resized, dropped
    assert len(states) == 2  # the bias deltas keep theirs


@pytest.mark.parametrize("reset", ["moments", "prune"])
def test_rprop_s_step_sizes_restart_at_lr_not_zero(reset: str) -> None:
    """Rprop's ``step_size`` is shaped like the parameter but is no moment: zeroed at a knot
    (before), each new B (zero) could never move again, so every later knot merged nothing."""
    torch.manual_seed(0)
    model = mlp()
    opt = ChainLoRAOptimizer(
        model, torch.optim.Rprop(model.parameters(), lr=0.01), target_modules=["0"], rank=2,
        knot_every=2, reset=reset, prune_ratio=0.5,
    )  # fmt: skip
    _train(model, opt, 2)
    b = lora_parametrization(model[0]).lora_B
    state = opt.state[b]
    assert float(state["step"]) == 2  # the counter is kept
    if reset == "moments":
        assert torch.equal(state["step_size"], torch.full_like(b, 0.01))
        assert not state["prev"].any()
    else:  # where the mask restarts an entry, its step size is lr again, never 0
        assert (state["step_size"] > 0).all() and (state["step_size"] == 0.01).any()
    _train(model, opt, 2)  # the next link trains and its knot merges something
    assert opt.knots_tied == 2 and opt.history.knots[-1].norms["0"] > 0


def test_adagrad_s_sums_restart_at_the_initial_accumulator_value() -> None:
    torch.manual_seed(0)
    model = mlp()
    opt = ChainLoRAOptimizer(
        model, torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.5),
        target_modules=["0"], rank=2, knot_every=2, reset="moments",
    )  # fmt: skip
    _train(model, opt, 2)
    a = lora_parametrization(model[0]).lora_A
    assert torch.equal(opt.state[a]["sum"], torch.full_like(a, 0.5))
    assert float(opt.state[a]["step"]) == 2


_BASES = {
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
    "adamw-for-loop-maximize": lambda p: torch.optim.AdamW(
        p, lr=0.01, foreach=False, maximize=True
    ),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.5),
    "rmsprop-centered": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True),
    "adafactor": lambda p: torch.optim.Adafactor(p, lr=0.01),
    "nadam": lambda p: torch.optim.NAdam(p, lr=0.01),
    "radam": lambda p: torch.optim.RAdam(p, lr=0.01),
    "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "asgd": lambda p: torch.optim.ASGD(p, lr=0.01),
    "rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
}


@pytest.mark.parametrize("name", sorted(_BASES))
def test_after_a_full_reset_the_factors_step_as_under_a_fresh_optimizer(name: str) -> None:
    """The step after a knot moves the factors, and leaves their state, exactly as the same
    optimizer built afresh over them would; the head's state is what the knot found."""
    torch.manual_seed(0)
    model = mlp()
    opt = ChainLoRAOptimizer(
        model, _BASES[name](model.parameters()), target_modules=["0"], trainable_modules=["2"],
        rank=2, knot_every=2,
    )  # fmt: skip
    head = model[2].weight
    before_knot: list[dict[str, torch.Tensor]] = []
    opt.optimizer.register_step_post_hook(  # after the wrapped step, before the knot
        lambda o, _a, _k: before_knot.append({k: v.clone() for k, v in o.state[head].items()})
    )
    _train(model, opt, 2)  # the knot
    assert opt.knots_tied == 1
    assert all(torch.equal(v, before_knot[-1][k]) for k, v in opt.state[head].items())
    link = lora_parametrization(model[0])
    factors = [link.lora_A, link.lora_B]
    model(torch.randn(8, 12)).square().mean().backward()
    fresh = [torch.nn.Parameter(f.detach().clone()) for f in factors]
    for f, g in zip(fresh, factors, strict=True):
        f.grad = g.grad.clone()
    reference = _BASES[name](fresh)
    reference.step()
    opt.step()
    for f, g in zip(fresh, factors, strict=True):
        assert torch.equal(g, f), name
        ours, theirs = opt.state[g], reference.state[f]
        assert sorted(ours) == sorted(theirs), name
        for key, value in theirs.items():
            mine = ours[key]
            if isinstance(value, torch.Tensor):
                assert mine.dtype == value.dtype and mine.device == value.device, (name, key)
                assert torch.equal(mine, value), (name, key)
            else:
                assert mine == value, (name, key)


@pytest.mark.parametrize("reset", ["none", "moments"])
def test_a_bitsandbytes_8bit_state_is_kept_or_restarted_with_its_counter(reset: str) -> None:
    """8-bit Adam keeps codes shaped like the factor and block maxima that are not: before, that
    was taken for a rank change and both policies dropped the state with its step counter."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    opt = ChainLoRAOptimizer(
        model, bnb.optim.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=16),
        target_modules=["0"], rank=8, knot_every=2, reset=reset,
    )  # fmt: skip
    x, y = torch.randn(16, 64), torch.randn(16, 4)
    for _ in range(2):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    a = lora_parametrization(model[0]).lora_A
    state = opt.state[a]
    assert state["step"] == 2 and state["state1"].dtype == torch.uint8
    start = initial_state(opt.optimizer, 0, a)
    assert start is not None
    restarted = {
        key: torch.equal(value, start[key])
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and value.dim() > 0
    }
    assert set(restarted) >= {"state1", "state2", "absmax1", "absmax2"}
    if reset == "moments":
        assert all(restarted.values()), restarted
    else:  # kept: the moments are the trained ones
        assert not restarted["absmax1"] and not restarted["absmax2"]


@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW4bit", "AdamWFp8"])
@pytest.mark.parametrize("reset", ["none", "moments", "prune"])
def test_a_torchao_low_bit_state_is_kept_restarted_or_pruned(name: str, reset: str) -> None:
    """torchao's low-bit AdamW keeps its moments as quantized tensor subclasses shaped like the
    factor, which have no ``abs``/``masked_fill_``/``zero_``: before, ``"prune"`` raised from
    inside the knot (after the merge) at every retry. They are read through ``dequantize()`` and
    written back through ``copy_``; the step counter is kept."""
    tao = pytest.importorskip("torchao.optim")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 4))
    opt = ChainLoRAOptimizer(
        model, getattr(tao, name)(model.parameters(), lr=1e-3, block_size=32),
        target_modules=["0"], rank=16, knot_every=2, reset=reset, prune_ratio=0.5,
    )  # fmt: skip
    x, y = torch.randn(16, 256), torch.randn(16, 4)
    a = lora_parametrization(model[0]).lora_A  # (16, 256): 4,096 elements, quantized
    before = {}

    def hook(optimizer: object, args: object, kwargs: object) -> None:
        if opt.optimizer_steps == 1:  # the state the knot after this step sees
            moments = {k: v for k, v in opt.state[a].items() if k != "step"}
            before.update({k: v.dequantize().clone() for k, v in moments.items()})

    handle = opt.optimizer.register_step_post_hook(hook)
    for _ in range(2):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    handle.remove()
    state = opt.state[a]
    assert opt.knots_tied == 1 and float(state["step"]) == 2
    assert type(state["exp_avg"]).__name__.startswith("OptimState")  # still quantized
    after = {k: state[k].dequantize() for k in before}
    assert set(after) == {"exp_avg", "exp_avg_sq"} and before["exp_avg"].abs().sum() > 0
    if reset == "none":
        assert all(torch.equal(after[k], before[k]) for k in after)
        return
    start = initial_state(opt.optimizer, 0, a)  # where it starts: zero, or its smallest code
    assert start is not None
    begin = {k: start[k].dequantize() for k in after}
    assert all(float(v.abs().max()) < 1e-12 for v in begin.values())
    if reset == "moments":
        assert all(torch.equal(after[k], begin[k]) for k in after)
    else:  # half the entries restarted in both moments (one mask: the first moment's smallest)
        drop = before["exp_avg"].abs() <= before["exp_avg"].abs().flatten().kthvalue(2048).values
        assert drop.sum() >= 2048
        for key in after:
            # restarted where the optimizer starts, or at the smallest value its block can hold
            # (the 4-bit unsigned map has no zero: 1/16 of the block's largest)
            low = float(after[key][drop].abs().max())
            bound = 0.0625 * float(before[key].abs().max()) if name == "AdamW4bit" else 0.0
            assert low <= max(bound, 1e-12), (key, low)
            kept, was = after[key][~drop], before[key][~drop]  # re-quantized: within its step
            assert torch.allclose(kept, was, rtol=0.15, atol=0.02 * float(was.abs().max())), key


def test_state_built_at_construction_is_restored_by_a_full_reset() -> None:
    model = mlp()
    opt = ChainLoRAOptimizer(
        model,
        lambda p: torch.optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.5),
        target_modules=["0"],
        rank=2,
        knot_every=2,
    )
    _train(model, opt, 5)  # Adagrad needs its state after every knot
    a = lora_parametrization(model[0]).lora_A
    assert opt.state[a]["sum"].min() >= 0.5


@pytest.mark.parametrize(("kw", "err", "match"), [
    ({"reset": "partial"}, ValueError, "reset must be one of"),
    ({"reset": "prune", "prune_ratio": 1.0}, ValueError, r"prune_ratio must be in \[0, 1\)"),
    ({"reset": "prune", "prune_ratio": "0.5"}, TypeError, "prune_ratio must be a number"),
])  # fmt: skip
def test_bad_reset_arguments(kw: dict[str, object], err: type[Exception], match: str) -> None:
    model = mlp()
    with pytest.raises(err, match=match):
        ChainLoRAOptimizer(
            model,
            torch.optim.SGD(model.parameters(), lr=1),
            target_modules=["0"],
            knot_every=2,
            **kw,  # type: ignore[arg-type]
        )
    assert lora_parametrization(model[0]) is None
