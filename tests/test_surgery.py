"""The torch internals chainopt relies on: each fails loudly here if a torch upgrade changes it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim import Optimizer

from chainopt import ChainLoRAOptimizer
from chainopt._attach import attach, detach
from chainopt._surgery import (
    SHARED_OPTIMIZER_ATTRIBUTES,
    forget_parameter_sizes,
    in_parametrize_cache,
    init_optimizer_bookkeeping,
    lr_scheduler_step_patch,
    parameter_order,
    patch_step_for_lr_scheduler,
    remove_forward_hooks,
    restore_parameter_order,
    set_shape_,
)


def test_optimizer_init_sets_only_what_the_wrapper_takes_over() -> None:
    """``Optimizer.__init__`` sets the three shared containers, hook dicts and a profile name."""
    scratch = Optimizer([torch.empty(0)], {})
    own = set(vars(scratch)) - SHARED_OPTIMIZER_ATTRIBUTES
    assert own == {
        "_optimizer_step_pre_hooks",
        "_optimizer_step_post_hooks",
        "_optimizer_state_dict_pre_hooks",
        "_optimizer_state_dict_post_hooks",
        "_optimizer_load_state_dict_pre_hooks",
        "_optimizer_load_state_dict_post_hooks",
        "_zero_grad_profile_name",
        "_warned_capturable_if_run_uncaptured",
    }, "torch's Optimizer.__init__ changed: review chainopt._surgery.init_optimizer_bookkeeping"
    assert callable(Optimizer._patch_step_function)


def test_lbfgs_caches_its_parameters_size_and_forget_parameter_sizes_drops_it() -> None:
    """LBFGS's ``_numel_cache``: set at its first step, read by every later one."""
    p = nn.Parameter(torch.ones(2, 3))
    lbfgs = torch.optim.LBFGS([p], max_iter=1)

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        loss = p.square().sum()
        loss.backward()
        return loss

    lbfgs.step(closure)
    assert lbfgs._numel_cache == 6, "torch's LBFGS changed: review forget_parameter_sizes"
    set_shape_(p, (1, 3))
    with torch.no_grad():
        p.fill_(1.0)
    forget_parameter_sizes(lbfgs)
    lbfgs.state.clear()
    lbfgs.step(closure)  # counts the new size
    assert lbfgs._numel_cache == 3
    forget_parameter_sizes(torch.optim.SGD([p]))  # caches nothing: untouched


def test_public_optimizer_hooks_run_on_the_wrapper_around_the_knot() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["0"], knot_every=1,
        rank=2,
    )  # fmt: skip
    seen: list[tuple[str, int]] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", o.knots_tied)))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", o.knots_tied)))
    opt.register_state_dict_post_hook(lambda o, sd: sd.update(extra=1))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert seen == [("pre", 0), ("post", 1)]  # the post hook sees the knot the step tied
    assert opt.state_dict()["extra"] == 1


def test_bookkeeping_is_fresh_per_instance() -> None:
    a, b = (Optimizer.__new__(Optimizer) for _ in range(2))
    init_optimizer_bookkeeping(a)
    init_optimizer_bookkeeping(b)
    assert a._optimizer_step_pre_hooks is not b._optimizer_step_pre_hooks


def test_parametrize_cache_flag_is_seen() -> None:
    assert not in_parametrize_cache()
    with parametrize.cached():
        assert in_parametrize_cache()
    assert not in_parametrize_cache()


def test_set_shape_survives_a_held_graph_and_drops_the_stale_gradient() -> None:
    p = nn.Parameter(torch.randn(3, 4))
    loss = (p * 2).sum()  # holds p's gradient accumulator with the old shape
    loss.backward(retain_graph=True)
    set_shape_(p, (2, 4))
    assert p.grad is None and tuple(p.shape) == (2, 4)
    (p * 3).sum().backward()
    assert p.grad is not None and tuple(p.grad.shape) == (2, 4)


def test_detach_restores_the_parameter_order() -> None:
    lin = nn.Linear(4, 3)
    order = parameter_order(lin)
    attach(lin, rank=2, alpha=2, bias=True)
    detach(lin)
    assert parameter_order(lin) == order == ("weight", "bias")
    assert list(lin.state_dict()) == ["weight", "bias"]
    params = dict(lin.named_parameters())
    restore_parameter_order(lin, ("bias", "weight"))
    assert parameter_order(lin) == ("bias", "weight") and dict(lin.named_parameters()) == params


def test_parametrize_gives_each_module_its_own_class_that_a_deepcopy_shares() -> None:
    lin = nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", nn.Identity())
    assert parametrize.type_before_parametrizations(lin) is nn.Linear
    assert type(copy.deepcopy(lin)) is type(lin)


@pytest.mark.parametrize("name", ["_foreach_copy_", "_foreach_zero_"])
def test_foreach_ops_exist(name: str) -> None:
    assert callable(getattr(torch, name))


def test_an_lr_scheduler_patches_step_as_chainopt_reads_and_rebuilds_it() -> None:
    """``LRScheduler.__init__`` puts a marked ``functools.wraps`` wrapper on the instance."""
    lin = nn.Linear(2, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    assert lr_scheduler_step_patch(opt.step) is None
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    func = lr_scheduler_step_patch(opt.__dict__["step"])
    assert func is torch.optim.SGD.step
    other = torch.optim.SGD(lin.parameters(), lr=0.1)
    patch_step_for_lr_scheduler(other, func)
    lin(torch.randn(3, 2)).sum().backward()
    other.step()
    assert other.__dict__["_opt_called"] is True and "_opt_called" not in opt.__dict__
    assert lr_scheduler_step_patch(other.__dict__["step"]) is func


def test_remove_forward_hooks_removes_only_the_chosen_hooks() -> None:
    lin = nn.Linear(2, 2)
    seen: list[str] = []
    lin.register_forward_hook(lambda m, a, o: seen.append("theirs"))
    mine = lin.register_forward_hook(lambda m, a, o: seen.append("mine"), with_kwargs=True)
    remove_forward_hooks(lin, lambda hook: hook is lin._forward_hooks[mine.id])
    lin(torch.zeros(1, 2))
    assert seen == ["theirs"] and mine.id not in lin._forward_hooks_with_kwargs
