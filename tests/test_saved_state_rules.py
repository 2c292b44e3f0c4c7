"""A saved optimizer state is checked against what the optimizer itself keeps, before any of it
loads: every tensor a parameter's state needs, in the shape the optimizer keeps it, learned from
a scratch copy of the optimizer after one step (no hand list per optimizer). The chain's own
parts (masters, generator, history factors) are checked for content too. A refused state
changes nothing: not the wrapped optimizer's state, not the counters."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from models import mlp, snapshot
from torch import nn

from chainopt import ChainLoRAOptimizer

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "AdamW": lambda p: torch.optim.AdamW(p, lr=1e-2),
    "AdamW-amsgrad": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "Adam-foreach-off": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    "RMSprop-centered": lambda p: torch.optim.RMSprop(p, lr=1e-3, centered=True, momentum=0.5),
    "NAdam": lambda p: torch.optim.NAdam(p, lr=1e-2),
    "Adafactor": lambda p: torch.optim.Adafactor(p, lr=1e-2),
}


def _trained(make: Callable[[Any], torch.optim.Optimizer], steps: int = 4, width: int = 12,
             **kw: Any) -> tuple[nn.Module, ChainLoRAOptimizer]:  # fmt: skip
    torch.manual_seed(0)
    model = mlp(width)
    opt = ChainLoRAOptimizer(model, make, target_modules=["0", "2"], rank=2, knot_every=3,
                             keep_history=True, **kw)  # fmt: skip
    for i in range(steps):
        x = torch.randn(8, width, generator=torch.Generator().manual_seed(i))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _flat(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            out[key] = value
    return out


def _assert_refused_and_unchanged(
    opt: ChainLoRAOptimizer, model: nn.Module, saved: dict[str, Any], match: str
) -> None:
    before, state = snapshot(model), copy.deepcopy(opt.state_dict())
    masters = [r.quant.master.clone() for r in opt.chain.records if r.quant is not None]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    for key in ("optimizer_steps", "knots_tied"):
        assert after["chainopt"][key] == state["chainopt"][key]
    assert torch.equal(after["chainopt"]["generator"], state["chainopt"]["generator"])
    assert len(after["chainopt"]["history"]["knots"]) == len(state["chainopt"]["history"]["knots"])
    assert after["state"].keys() == state["state"].keys()
    for index, entry in state["state"].items():
        mine, theirs = _flat(after["state"][index]), _flat(entry)
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert torch.equal(torch.as_tensor(mine[key]), torch.as_tensor(value)), key
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    now = [r.quant.master for r in opt.chain.records if r.quant is not None]  # type: ignore[union-attr]
    assert all(torch.equal(a, b) for a, b in zip(masters, now, strict=True))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_optimizer_own_state_loads_and_every_misshapen_tensor_is_refused(name: str) -> None:
    make = OPTIMIZERS[name]
    _, source = _trained(make)
    good = copy.deepcopy(source.state_dict())
    model, opt = _trained(make, steps=2)
    rng = torch.get_rng_state()
    opt.load_state_dict(copy.deepcopy(good))  # the optimizer's own state always loads
    assert torch.equal(torch.get_rng_state(), rng)  # checking it draws nothing
    model, opt = _trained(make, steps=2)
    index, entry = next(iter(good["state"].items()))  # the first factor's state
    tensors = {k: v for k, v in entry.items() if isinstance(v, torch.Tensor)}
    assert tensors, entry
    for key, value in tensors.items():
        for bad in (torch.zeros(1), torch.zeros(()), torch.zeros(2, 3, 4), torch.zeros(2)):
            if tuple(bad.shape) == tuple(value.shape):
                continue
            saved = copy.deepcopy(good)
            saved["state"][index][key] = bad.to(value.dtype)
            _assert_refused_and_unchanged(opt, model, saved, f"'{key}'")
        saved = copy.deepcopy(good)
        del saved["state"][index][key]
        _assert_refused_and_unchanged(opt, model, saved, f"'{key}'")
        saved = copy.deepcopy(good)
        saved["state"][index][key] = torch.empty_like(value, device="meta")
        _assert_refused_and_unchanged(opt, model, saved, "meta")


def test_a_bitsandbytes_8bit_state_is_checked_by_its_own_rules() -> None:
    bnb = pytest.importorskip("bitsandbytes")

    def make(p: Any) -> torch.optim.Optimizer:
        return bnb.optim.AdamW8bit(p, lr=1e-2, min_8bit_size=16)  # 8-bit state for the factors

    _, source = _trained(make, width=64)
    good = copy.deepcopy(source.state_dict())
    model, opt = _trained(make, steps=2, width=64)
    opt.load_state_dict(copy.deepcopy(good))
    index, entry = next(iter(good["state"].items()))
    nested = "__bnb_optimizer_quant_state__"  # bitsandbytes saves its 8-bit state nested
    assert entry[nested]["state1"].dtype == torch.uint8
    for key in ("state1", "absmax1", "qmap1"):
        saved = copy.deepcopy(good)
        saved["state"][index][nested][key] = torch.zeros(3, 3, dtype=entry[nested][key].dtype)
        _assert_refused_and_unchanged(opt, model, saved, f"{key}'")
        saved = copy.deepcopy(good)
        del saved["state"][index][nested][key]
        _assert_refused_and_unchanged(opt, model, saved, f"{key}'")


def test_an_invalid_generator_state_of_the_right_size_is_refused_before_anything_loads() -> None:
    _, source = _trained(OPTIMIZERS["AdamW"])
    saved = copy.deepcopy(source.state_dict())
    saved["chainopt"]["generator"] = torch.zeros_like(saved["chainopt"]["generator"])
    model, opt = _trained(OPTIMIZERS["AdamW"], steps=2)
    _assert_refused_and_unchanged(opt, model, saved, "not a valid CPU generator state")


@pytest.mark.parametrize(
    "weights",
    [[1.0], {"nope": [1.0, 2.0]}, {"0": [float("nan"), 1.0]}, {"0": [1, 2]}, {"0": "x"}],
    ids=["list", "unknown module", "nan", "ints", "string"],
)
def test_a_malformed_weights_fingerprint_is_refused_before_anything_loads(weights: Any) -> None:
    _, source = _trained(OPTIMIZERS["AdamW"])
    saved = copy.deepcopy(source.state_dict())
    assert set(saved["chainopt"]["weights"]) == {"0", "2"}  # what a state carries now
    saved["chainopt"]["weights"] = weights
    model, opt = _trained(OPTIMIZERS["AdamW"], steps=2)
    _assert_refused_and_unchanged(opt, model, saved, "fingerprint")


def test_a_state_saved_without_a_fingerprint_still_loads_and_exports_from_history() -> None:
    """States written before the fingerprint existed load as before (taken on trust)."""
    model, source = _trained(OPTIMIZERS["AdamW"])
    saved = copy.deepcopy(source.state_dict())
    del saved["chainopt"]["weights"]
    state = copy.deepcopy(model.state_dict())
    fresh, opt = _trained(OPTIMIZERS["AdamW"], steps=0)
    opt.load_state_dict(saved)
    fresh.load_state_dict(state)
    from chainopt._load_guard import loaded_plain_weights

    assert not loaded_plain_weights(fresh)


@pytest.mark.parametrize(
    "merged", [[1], {"nope": 2}, {"0": -1}, {"0": 2.5}, {"0": True}],
    ids=["list", "unknown module", "negative", "float", "bool"],
)  # fmt: skip
def test_a_malformed_merged_before_is_refused_before_anything_loads(merged: Any) -> None:
    _, source = _trained(OPTIMIZERS["AdamW"])
    saved = copy.deepcopy(source.state_dict())
    assert saved["chainopt"]["merged_before"] == {"0": 0, "2": 0}  # what a state carries now
    saved["chainopt"]["merged_before"] = merged
    model, opt = _trained(OPTIMIZERS["AdamW"], steps=2)
    _assert_refused_and_unchanged(opt, model, saved, "merged_before")


@pytest.mark.parametrize("case", ["meta A", "meta B", "meta bias", "inner size", "outer size"])
def test_history_factors_that_do_not_fit_their_module_are_refused(case: str) -> None:
    _, source = _trained(OPTIMIZERS["AdamW"], lora_bias=True)
    saved = copy.deepcopy(source.state_dict())
    link = saved["chainopt"]["history"]["knots"][0]["links"]["0"]
    if case.startswith("meta"):
        part = {"meta A": "A", "meta B": "B", "meta bias": "bias"}[case]
        link[part] = torch.empty_like(link[part], device="meta")
        match = "meta"
    elif case == "inner size":  # A (2, 99) for a 12-input layer: an export would write it
        link["A"] = torch.zeros(2, 99)
        match = r"A \(2, 99\)"
    else:
        link["B"] = torch.zeros(5, 2)
        match = r"B \(5, 2\)"
    model, opt = _trained(OPTIMIZERS["AdamW"], steps=2, lora_bias=True)
    _assert_refused_and_unchanged(opt, model, saved, match)


@pytest.mark.parametrize("case", ["meta", "nan"])
def test_a_4bit_master_without_data_or_finite_values_is_refused_before_anything_loads(
    case: str,
) -> None:
    bnb = pytest.importorskip("bitsandbytes")

    def quantized() -> nn.Module:
        torch.manual_seed(0)
        lin = nn.Linear(64, 64)
        layer = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False,
                                         quant_type="nf4")  # fmt: skip
        layer.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return nn.Sequential(layer.to("cpu"), nn.Tanh(), nn.Linear(64, 4))

    def trained(steps: int) -> tuple[nn.Module, ChainLoRAOptimizer]:
        model = quantized()
        opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                                 target_modules=["0"], rank=2, knot_every=3)  # fmt: skip
        for i in range(steps):
            model(torch.randn(8, 64, generator=torch.Generator().manual_seed(i))).sum().backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    _, source = trained(4)
    saved = copy.deepcopy(source.state_dict())
    master = saved["chainopt"]["masters"]["0"]
    if case == "meta":
        saved["chainopt"]["masters"]["0"] = torch.empty_like(master, device="meta")
    else:
        master[0, 0] = float("nan")
    model, opt = trained(2)
    _assert_refused_and_unchanged(opt, model, saved, "masters")


def test_parse_history_refuses_meta_factors() -> None:
    from chainopt.history import parse_history

    _, source = _trained(OPTIMIZERS["AdamW"])
    saved = copy.deepcopy(source.history.state_dict())
    link = saved["knots"][0]["links"]["0"]
    link["A"] = torch.empty_like(link["A"], device="meta")
    with pytest.raises(ValueError, match=r"factors of 0.*meta"):
        parse_history(saved)


@pytest.mark.parametrize(
    "hyper", [{"lr": "x"}, {"betas": (0.9,)}, {"weight_decay": None}, {"eps": [1e-8]}]
)
def test_saved_hyperparameters_the_optimizer_cannot_step_with_are_refused(
    hyper: dict[str, Any],
) -> None:
    """A scratch copy of the optimizer loads each group's saved hyperparameters and one of its
    parameters' state and steps: what would crash at the next real step is refused now."""
    _, source = _trained(OPTIMIZERS["AdamW"])
    saved = copy.deepcopy(source.state_dict())
    saved["param_groups"][0].update(hyper)
    model, opt = _trained(OPTIMIZERS["AdamW"], steps=2)
    _assert_refused_and_unchanged(opt, model, saved, "param group 0")


def test_a_schedule_free_state_saved_in_eval_mode_loads() -> None:
    """The scratch copy steps in train mode: a state saved after ``optimizer.eval()`` is no bad
    state (``train_mode`` False is a mode, not a corruption)."""
    schedulefree = pytest.importorskip("schedulefree")

    def make(p: Any) -> torch.optim.Optimizer:
        opt = schedulefree.AdamWScheduleFree(p, lr=1e-2)
        opt.train()
        return opt

    _, source = _trained(make)
    source.optimizer.eval()
    saved = copy.deepcopy(source.state_dict())
    assert not saved["param_groups"][0]["train_mode"]
    _, opt = _trained(make, steps=2)
    opt.load_state_dict(saved)
