"""The chain's record: norms, kept factors, stacked adapters, effective rank, hooks, skip policy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import mlp, snapshot
from test_optimizer import _train
from test_resume import _roundtrip
from torch import nn

from chainopt import ChainLoRAOptimizer
from chainopt._attach import lora_parametrization
from chainopt.history import ChainHistory


def _chain(**kw: object) -> ChainLoRAOptimizer:
    model = mlp()
    return ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=5e-2),
        target_modules=["0", "2"],
        rank=2,
        alpha=4,
        **{"knot_every": 2, "keep_history": True, **kw},  # type: ignore[arg-type]
    )


@given(st.integers(1, 4))
def test_stacked_history_equals_the_accumulated_update(knots: int) -> None:
    opt = _chain()
    w0 = {n: m.parametrizations.weight.original.clone() for n, m in opt.adapted_modules()}
    _train(opt.model, opt, 2 * knots)
    assert len(opt.history) == knots
    for name, module in opt.adapted_modules():
        b, a = opt.history.stacked(name)
        assert b.shape == (12, 2 * knots) and a.shape == (2 * knots, 12)
        total = module.parametrizations.weight.original - w0[name]
        torch.testing.assert_close(b @ a, total, rtol=1e-4, atol=1e-5)
        assert opt.history.effective_rank(name) == min(2 * knots, 12)


def test_norms_are_the_merged_update_norms() -> None:
    opt = _chain(knot_every=3)
    _train(opt.model, opt, 2)
    expected = {
        n: (lora_parametrization(m).delta()).norm().item() for n, m in opt.adapted_modules()
    }
    record = opt.tie_knot()
    assert record.norms == pytest.approx(expected, rel=1e-5)
    assert record.step == 2 and record.skipped == ()


def test_history_can_be_turned_off_and_keeps_norms() -> None:
    opt = _chain(keep_history=False)
    _train(opt.model, opt, 4)
    assert len(opt.history) == 2 and all(k.norms for k in opt.history.knots)
    assert all(k.links == {} for k in opt.history.knots)
    with pytest.raises(RuntimeError, match="keep_history=False"):
        opt.history.links("0")


def test_history_survives_save_and_load() -> None:
    opt = _chain()
    _train(opt.model, opt, 4)
    sd_model, sd_opt = _roundtrip(opt.model.state_dict()), _roundtrip(opt.state_dict())
    other = _chain()
    other.model.load_state_dict(sd_model)
    other.load_state_dict(sd_opt)
    for name in ("0", "2"):
        for x, y in zip(opt.history.stacked(name), other.history.stacked(name), strict=True):
            assert torch.equal(x, y)


def test_knot_hooks_run_after_each_knot_until_removed() -> None:
    opt = _chain()
    seen: list[tuple[int, int]] = []
    handle = opt.register_knot_hook(lambda o, r: seen.append((o.knots_tied, r.step)))
    _train(opt.model, opt, 4)
    handle.remove()
    _train(opt.model, opt, 2)
    assert seen == [(1, 2), (2, 4)]


def test_skip_policy_drops_non_finite_links_and_merges_the_rest() -> None:
    opt = _chain(non_finite="skip", knot_every=10)
    _train(opt.model, opt, 2)
    bad = lora_parametrization(opt.model[2])
    with torch.no_grad():
        bad.lora_A[0, 0] = float("nan")
    before = snapshot(opt.model)
    with pytest.warns(RuntimeWarning, match=r"\['2'\].*dropped those links unmerged"):
        record = opt.tie_knot()
    after = snapshot(opt.model)
    key0, key2 = "0.parametrizations.weight.original", "2.parametrizations.weight.original"
    assert torch.equal(after[key2], before[key2])  # nothing of the bad link reached the weight
    assert not torch.equal(after[key0], before[key0])  # the good one merged
    assert torch.isfinite(bad.lora_A).all() and torch.count_nonzero(bad.lora_B) == 0
    assert record.skipped == ("2",) and set(record.norms) == {"0"}
    _train(opt.model, opt, 2)  # and training goes on
    assert all(torch.isfinite(p).all() for p in opt.model.parameters())


def test_bad_history_and_policy_arguments() -> None:
    with pytest.raises(ValueError, match="non_finite must be one of"):
        _chain(non_finite="ignore")
    with pytest.raises(TypeError, match="keep_history must be a bool"):
        _chain(keep_history="yes")


def test_effective_rank_of_an_empty_history_is_zero() -> None:
    assert ChainHistory(keep_factors=True).effective_rank("x") == 0


def test_kept_links_are_float32_host_copies_that_later_knots_leave_alone() -> None:
    opt = _chain(factor_dtype=torch.bfloat16)
    _train(opt.model, opt, 2)  # one knot
    record = opt.history.knots[0]
    kept = {n: (f.A.clone(), f.B.clone()) for n, f in record.links.items()}
    for name, f in record.links.items():
        assert f.A.dtype == f.B.dtype == torch.float32 and f.A.device.type == "cpu", name
        assert f.B.any(), name  # the merged link, not the fresh one
    _train(opt.model, opt, 2)  # the next link trains and is merged in place of the same Parameters
    for name, f in opt.history.knots[0].links.items():
        assert torch.equal(f.A, kept[name][0]) and torch.equal(f.B, kept[name][1]), name


def test_history_is_off_by_default() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        target_modules=["0"],
        rank=2,
        knot_every=1,
    )
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert len(opt.history) == 1 and opt.history.knots[0].links == {}
    assert opt.history.knots[0].norms["0"] > 0


def test_keep_factors_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="keep_factors must be a bool"):
        ChainHistory(keep_factors="yes")  # type: ignore[arg-type]
