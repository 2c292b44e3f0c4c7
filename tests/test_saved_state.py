"""Loading a saved chain state: everything is checked before anything is loaded."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from models import mlp, snapshot
from torch import nn

from chainopt import ChainLoRAOptimizer, merged_state_dict
from chainopt._attach import lora_parametrization


def _chain(rank: Any = 2, **kw: Any) -> tuple[nn.Module, ChainLoRAOptimizer]:
    torch.manual_seed(0)
    model = mlp()
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                             target_modules=["0", "2"], rank=rank, knot_every=3, keep_history=True,
                             **kw)  # fmt: skip
    return model, opt


def _trained(steps: int = 4, **kw: Any) -> tuple[nn.Module, ChainLoRAOptimizer]:
    model, opt = _chain(**kw)
    for i in range(steps):
        model(
            torch.randn(8, 12, generator=torch.Generator().manual_seed(i))
        ).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _entry(sd: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = sd["chainopt"]
    return entry


def _first_state(sd: dict[str, Any]) -> dict[str, Any]:
    return next(iter(sd["state"].values()))  # type: ignore[no-any-return]


CORRUPTIONS: dict[str, tuple[Callable[[dict[str, Any]], None], type[Exception], str]] = {
    "no entry": (lambda sd: sd.pop("chainopt"), ValueError, "no 'chainopt' entry"),
    "version": (lambda sd: _entry(sd).update(version=99), ValueError, "version 99"),
    "config": (lambda sd: _entry(sd)["config"].update(alpha=3.0), ValueError, "alpha=3.0"),
    "ranks": (lambda sd: _entry(sd)["config"].update(ranks=[3]), ValueError, r"ranks=\[3\]"),
    "steps": (lambda sd: _entry(sd).update(optimizer_steps="x"), ValueError, "optimizer_steps"),
    "knots": (lambda sd: _entry(sd).update(knots_tied=-1), ValueError, "knots_tied"),
    "generator": (
        lambda sd: _entry(sd).update(generator=torch.zeros(10, dtype=torch.uint8)),
        ValueError,
        "generator",
    ),
    "no generator": (lambda sd: _entry(sd).pop("generator"), ValueError, "generator"),
    "history": (lambda sd: _entry(sd).update(history={"knots": 3}), ValueError, "history"),
    "history factor": (
        lambda sd: _entry(sd)["history"]["knots"][0]["links"]["0"].update(A=torch.zeros(3)),
        ValueError,
        "history",
    ),
    "moment shape": (
        lambda sd: _first_state(sd).update(exp_avg=torch.zeros(5, 7)),
        ValueError,
        r"exp_avg.*shape \(5, 7\)",
    ),
    "groups": (lambda sd: sd["param_groups"].append(sd["param_groups"][0]), ValueError, "groups"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_bad_state_is_refused_and_nothing_is_loaded(case: str) -> None:
    _, source = _trained()
    saved = copy.deepcopy(source.state_dict())
    corrupt, err, match = CORRUPTIONS[case]
    corrupt(saved)
    model, opt = _trained(steps=2)
    before, state = snapshot(model), copy.deepcopy(opt.state_dict())
    with pytest.raises(err, match=match):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["chainopt"]["optimizer_steps"] == 2 and len(opt.history) == 0
    assert torch.equal(after["chainopt"]["generator"], state["chainopt"]["generator"])
    for index, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(after["state"][index][key], value)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


def test_a_non_dict_state_is_a_type_error() -> None:
    _, opt = _chain()
    with pytest.raises(TypeError, match="state_dict must be a dict, got list"):
        opt.load_state_dict([])  # type: ignore[arg-type]


def test_a_model_load_of_factors_of_another_rank_is_refused_whole() -> None:
    model2, _ = _trained(rank=2)
    model4, _ = _chain(rank=4)
    before = snapshot(model4)
    with pytest.raises(ValueError, match=r"nothing was loaded.*rank in \[4\]"):
        model4.load_state_dict(model2.state_dict())
    after = snapshot(model4)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lora_parametrization(model4[0]).rank == 4  # type: ignore[union-attr]


@pytest.mark.parametrize("strict", [True, False])
def test_a_model_load_of_a_chain_with_other_targets_is_refused_whole(strict: bool) -> None:
    """A chain on ``["0", "2"]`` loading into one on ``["0"]``: module 2's link keys fit no key
    of the model. Torch loaded every other tensor, then raised (``strict=True``) or skipped
    them silently, module 2 keeping its own weight (``strict=False``). Refused now, whole."""
    source, _ = _trained(rank=2)
    torch.manual_seed(1)
    model = mlp()
    ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()), target_modules=["0"],
                       rank=2, knot_every=3)  # fmt: skip
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"nothing was loaded.*'2\.parametrizations.*other targets"
    ):
        model.load_state_dict(source.state_dict(), strict=strict)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    wider = mlp()  # more targets: the source's "4.weight" is a plain weight, taken exactly
    ChainLoRAOptimizer(wider, torch.optim.AdamW(wider.parameters()), target_modules=["0", "2", "4"],
                       rank=2, knot_every=3)  # fmt: skip
    wider.load_state_dict(source.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(wider(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("strict", [True, False])
def test_a_model_load_of_a_bias_delta_the_chain_lacks_is_refused_whole(strict: bool) -> None:
    """A ``lora_bias=True`` chain's state into a chain without: torch loaded the rest, then
    raised, or skipped ``….bias.0.delta`` and ``….bias.original`` silently, the bias keeping
    its own value. Refused now, whole; the other way, the plain ``….bias`` is taken exactly."""
    source, _ = _trained(lora_bias=True)
    model, _ = _chain()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"nothing was loaded.*'0\.parametrizations\.bias\.0\.d"):
        model.load_state_dict(source.state_dict(), strict=strict)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    plain_bias, _ = _trained()
    biased, _ = _chain(lora_bias=True)
    biased.load_state_dict(plain_bias.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(biased(x), plain_bias(x), rtol=0, atol=0)


@pytest.mark.parametrize("strict", [True, False])
def test_a_weight_loaded_without_its_merge_residual_restarts_the_residual(strict: bool) -> None:
    """A float32 chain's state (no merge residual) into a trained bfloat16 chain: the residual
    kept what rounding had dropped from the old weight and the next knot added it to the loaded
    one (a bfloat16 ulp off); ``strict=True`` raised the missing key after loading the rest.
    The residual restarts at zero now: the knot is the one a fresh chain ties after that load."""

    def bf16_chain() -> tuple[nn.Module, ChainLoRAOptimizer]:
        torch.manual_seed(0)
        model = mlp(dtype=torch.bfloat16)
        base = torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, ChainLoRAOptimizer(
            model, base, target_modules=["0", "2"], rank=2, knot_every=3
        )

    model, opt = bf16_chain()
    for i in range(9):  # three knots: the residuals hold what rounding dropped
        x = torch.randn(8, 12, generator=torch.Generator().manual_seed(i), dtype=torch.bfloat16)
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    residual = model[0].parametrizations.weight[0].merge_residual
    assert bool(residual.any())
    source, _ = _trained()  # float32: no residual keys
    state = {k: v + 0.01 if k.endswith("lora_B") else v for k, v in source.state_dict().items()}
    model.load_state_dict(state, strict=strict)
    assert not bool(residual.any())
    fresh, fresh_opt = bf16_chain()
    fresh.load_state_dict(state)
    opt.tie_knot()
    fresh_opt.tie_knot()
    for i in (0, 2):
        after = model[i].parametrizations.weight.original
        assert torch.equal(after, fresh[i].parametrizations.weight.original)


@pytest.mark.parametrize("key", ["2.weight", "2.parametrizations.weight.original"])
def test_a_model_load_of_non_finite_weights_under_a_link_is_refused_whole(key: str) -> None:
    """NaN/Inf for a weight under a link (a merged checkpoint's plain ``….weight``, or the
    chain's own ``….original``) loaded: no knot could merge into it, and under
    ``non_finite="skip"`` every knot then dropped every link of it, blaming the factors.
    Refused now, nothing loaded. NaN factors still load: the next knot refuses or drops them
    (what ``"skip"`` resumes through)."""
    source, _ = _trained()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    if key == "2.weight":
        state = merged_state_dict(source)
    state[key][0, 0] = float("inf")
    model, _ = _chain()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"nothing was loaded.*original', a frozen.*NaN/Inf"):
        model.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    factors = {k: v.clone() for k, v in source.state_dict().items()}
    factors["2.parametrizations.weight.0.lora_B"][0, 0] = float("nan")
    model.load_state_dict(factors)
    assert bool(model[2].parametrizations.weight[0].lora_B.isnan().any())


@pytest.mark.parametrize(
    "bad", [torch.zeros(2, 9), torch.zeros(2), torch.zeros(2, 12, device="meta")]
)
def test_a_model_load_of_malformed_factors_is_refused_whole(bad: torch.Tensor) -> None:
    model, _ = _chain()
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    state["2.parametrizations.weight.0.lora_A"] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match="nothing was loaded"):
        model.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())


def test_a_rank_step_down_checkpoint_still_loads_into_a_fresh_chain() -> None:
    model, opt = _trained(steps=4, rank=[2, 1])
    fresh_model, fresh_opt = _chain(rank=[2, 1])
    fresh_model.load_state_dict(model.state_dict())
    fresh_opt.load_state_dict(opt.state_dict())
    assert lora_parametrization(fresh_model[0]).rank == 1  # type: ignore[union-attr]


def test_a_history_that_does_not_split_into_the_experts_is_refused_and_nothing_is_loaded() -> None:
    """A fused-experts link's history holds ``A (r·E, in)``, ``B (out, r·E)``: factors whose rank
    is not a whole number per expert were loaded and failed later, in the export's split."""

    def chained() -> ChainLoRAOptimizer:
        torch.manual_seed(0)
        model = nn.Module()
        model.w = nn.Parameter(torch.randn(4, 5, 6))  # 4 experts of (out=5, in=6)
        return ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                  target_parameters=["w"], rank=2, knot_every=1,
                                  keep_history=True)  # fmt: skip

    source = chained()
    with torch.no_grad():
        source.chain.records[0].link.lora_B.normal_()
    source.tie_knot()
    saved = copy.deepcopy(source.state_dict())
    link = _entry(saved)["history"]["knots"][0]["links"]["w"]
    assert tuple(link["A"].shape) == (8, 6) and tuple(link["B"].shape) == (5, 8)
    link.update(A=link["A"][:3].clone(), B=link["B"][:, :3].clone())  # 3 rows over 4 experts
    opt = chained()
    before = snapshot(opt.model)
    with pytest.raises(ValueError, match=r"history.*for each of 4 experts: A must be \(r·4, 6\)"):
        opt.load_state_dict(saved)
    assert len(opt.history) == 0 and opt.knots_tied == 0
    assert all(torch.equal(before[k], v) for k, v in snapshot(opt.model).items())
    opt.load_state_dict(copy.deepcopy(source.state_dict()))  # the whole history loads
    assert len(opt.history) == 1
