"""Schedule-free optimizers: their API passes through, and a knot keeps the eval-mode model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chainopt import ChainLoRAOptimizer
from chainopt._attach import lora_parametrization

schedulefree = pytest.importorskip("schedulefree")


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 12, generator=gen)
    return x, torch.tanh(x @ torch.randn(12, 3, generator=gen))


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree", "RAdamScheduleFree"])
@pytest.mark.parametrize("reset", ["full", "none"])
def test_a_knot_keeps_the_eval_mode_model_and_restarts_every_iterate(name: str, reset: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    base = getattr(schedulefree, name)(model.parameters(), lr=5e-2)
    opt = ChainLoRAOptimizer(model, base, target_modules=["0", "2"], rank=2, knot_every=5,
                             reset=reset)  # fmt: skip
    x, y = _data()

    def eval_loss() -> float:
        opt.eval()  # passes through to the schedule-free optimizer
        with torch.no_grad():
            loss = nn.functional.mse_loss(model(x), y).item()
        opt.train()
        return loss

    opt.train()
    first, around_knots = eval_loss(), []
    for step in range(1, 16):
        nn.functional.mse_loss(model(x), y).backward()
        if step % 5 == 0:
            opt.optimizer.step()  # the wrapped step alone, to see the knot apart from it
            opt.optimizer_steps += 1
            before = eval_loss()
            opt.tie_knot()
            around_knots.append((before, eval_loss()))
        else:
            opt.step()
        opt.zero_grad()
    for before, after in around_knots:
        assert after == pytest.approx(before, rel=1e-5, abs=1e-7)  # the eval-mode model is kept
    assert eval_loss() < first
    # the last knot (after step 15) restarted every link with z = x: in eval mode they agree
    opt.eval()
    for _n, m in opt.adapted_modules():
        link = lora_parametrization(m)
        state = opt.state.get(link.lora_A, {})  # type: ignore[union-attr]
        assert (reset == "full" and not state) or torch.equal(state["z"], link.lora_A.detach())  # type: ignore[union-attr]
    opt.train()


def test_the_wrapped_optimizers_api_passes_through() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    base = schedulefree.AdamWScheduleFree(model.parameters(), lr=1e-2)
    opt = ChainLoRAOptimizer(model, base, target_modules=["0"], rank=2, knot_every=3)
    opt.train()
    assert all(g["train_mode"] for g in opt.param_groups)
    opt.eval()
    assert not any(g["train_mode"] for g in opt.param_groups)
    with pytest.raises(AttributeError, match="no attribute 'no_such_thing'"):
        opt.no_such_thing  # noqa: B018
