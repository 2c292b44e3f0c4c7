"""WrappedOptimizer: the Optimizer plumbing ChainLoRAOptimizer builds on, tested on its own."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from chainopt import ChainLoRAWarning
from chainopt._wrapper import WrappedOptimizer


class Passthrough(WrappedOptimizer):
    """The smallest subclass: steps the base, saves and loads its state through the hooks."""

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return self._base.step(closure)

    def state_dict(self) -> dict[str, Any]:
        return self._hooked_state_dict(self._base.state_dict)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._hooked_load(state_dict, self._base.load_state_dict)


def _wrapped() -> tuple[nn.Linear, torch.optim.SGD, Passthrough]:
    lin = nn.Linear(3, 2)
    base = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    return lin, base, Passthrough(base)


def test_groups_state_and_defaults_are_the_base_ones_both_ways() -> None:
    lin, base, opt = _wrapped()
    assert opt.param_groups is base.param_groups and opt.defaults is base.defaults
    lin(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert opt.state is base.state and len(base.state) == 2
    groups = [dict(base.param_groups[0], lr=0.5)]
    opt.param_groups = groups
    assert base.param_groups is groups
    opt.state, opt.defaults = {}, {"lr": 1.0}
    assert base.state == {} and base.defaults == {"lr": 1.0}


def test_a_scheduler_drives_the_base_lr_through_the_wrapper() -> None:
    _, base, opt = _wrapped()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)


def test_other_attributes_reach_the_base_and_missing_ones_raise() -> None:
    _, base, opt = _wrapped()
    base.custom = lambda: "from the base"  # type: ignore[attr-defined]
    assert opt.custom() == "from the base"  # type: ignore[attr-defined]
    assert opt.optimizer is base
    with pytest.raises(
        AttributeError,
        match="'Passthrough' object \\(nor the 'SGD' it wraps\\) has no attribute 'nope'",
    ):
        _ = opt.nope  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        _ = opt.__array__  # type: ignore[attr-defined]  # dunders never fall through


def test_add_param_group_adds_to_the_base_and_warns_for_frozen_parameters() -> None:
    _, base, opt = _wrapped()
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.warns(ChainLoRAWarning):
        opt.add_param_group({"params": frozen})
    assert base.param_groups[-1]["params"] == [frozen]


def test_state_dict_hooks_run_in_order_and_may_replace() -> None:
    _, _, opt = _wrapped()
    seen: list[str] = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": len(seen)})
    sd = opt.state_dict()
    assert seen == ["pre"] and sd["extra"] == 1

    def replace(o: Any, sd: dict[str, Any]) -> dict[str, Any]:
        seen.append("load-pre")
        return {**sd, "param_groups": [dict(g, lr=0.125) for g in sd["param_groups"]]}

    opt.register_load_state_dict_pre_hook(replace)
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    opt.load_state_dict(sd)
    assert seen == ["pre", "load-pre", "load-post"]
    assert opt.optimizer.param_groups[0]["lr"] == 0.125  # the replaced state dict was loaded


def test_a_shallow_copy_shares_the_base_and_its_hooks_dicts_are_its_own() -> None:
    _, base, opt = _wrapped()
    other = Passthrough(base)
    assert copy.copy(opt).optimizer is base
    assert opt._optimizer_state_dict_pre_hooks is not other._optimizer_state_dict_pre_hooks


class Counting(Passthrough):
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.steps = getattr(self, "steps", 0) + 1
        return super().step(closure)


def test_a_shallow_copy_steps_itself_not_the_original_an_lr_scheduler_patched() -> None:
    lin = nn.Linear(3, 2)
    opt = Counting(torch.optim.SGD(lin.parameters(), lr=0.1))
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)  # patches opt.step on the instance
    shallow = copy.copy(opt)
    lin(torch.randn(4, 3)).sum().backward()
    shallow.step()
    assert shallow.__dict__.get("steps") == 1 and "steps" not in opt.__dict__
    assert shallow.__dict__.get("_opt_called") is True and "_opt_called" not in opt.__dict__


def test_a_copy_leaves_out_a_patch_it_cannot_see_into_and_warns() -> None:
    _, _, opt = _wrapped()
    opt.zero_grad = lambda set_to_none=True: None  # type: ignore[method-assign]
    with pytest.warns(ChainLoRAWarning, match="does not keep 'zero_grad'"):
        shallow = copy.copy(opt)
    assert "zero_grad" not in shallow.__dict__ and "zero_grad" in opt.__dict__


def test_a_grad_scaler_s_grad_scale_and_found_inf_reach_a_fused_base() -> None:
    """``GradScaler.step`` sets them on the optimizer it is given and a fused step reads them on
    itself: through the wrapper, the fused SGD unscales and skips an inf step as it does alone."""

    def run(wrap: bool) -> nn.Linear:
        torch.manual_seed(0)
        lin = nn.Linear(3, 2)
        base = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, fused=True)
        opt: torch.optim.Optimizer = Passthrough(base) if wrap else base
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for i in range(3):
            loss = lin(torch.randn(4, 3)).square().mean() * (float("inf") if i == 1 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        assert not hasattr(base, "grad_scale") and not hasattr(opt, "found_inf")
        return lin

    alone, wrapped = run(False), run(True)
    assert torch.isfinite(wrapped.weight).all()
    torch.testing.assert_close(wrapped.weight, alone.weight, rtol=0, atol=0)
    torch.testing.assert_close(wrapped.bias, alone.bias, rtol=0, atol=0)
