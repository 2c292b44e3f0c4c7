"""Scratch copies of an optimizer: what it starts a parameter's state at."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chainopt._scratch import initial_state


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: torch.optim.Adam(p, lr=0.1), {"exp_avg": 0.0, "exp_avg_sq": 0.0}),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), {"momentum_buffer": 0.0}),
        (lambda p: torch.optim.Rprop(p, lr=0.25), {"prev": 0.0, "step_size": 0.25}),
        (lambda p: torch.optim.Adagrad(p, initial_accumulator_value=0.5), {"sum": 0.5}),
    ],
    ids=["adam", "sgd", "rprop", "adagrad"],
)
def test_the_start_of_each_state_tensor_is_the_optimizer_s_own(make, expected) -> None:  # type: ignore[no-untyped-def]
    p = nn.Parameter(torch.randn(3, 4))
    optimizer = make([p])
    p.grad = torch.randn(3, 4)
    optimizer.step()  # the live state moved on; the start does not depend on it
    before = (p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()})
    rng = torch.random.get_rng_state()
    start = initial_state(optimizer, 0, p)
    assert start is not None
    for key, value in expected.items():
        assert torch.equal(start[key], torch.full((3, 4), value)), key
    assert torch.equal(p, before[0]) and torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(optimizer.state[p][k], v) for k, v in before[1].items())


def test_no_start_where_no_scratch_copy_can_tell() -> None:
    p = nn.Parameter(torch.zeros(2, 2))
    assert initial_state(torch.optim.Adam([p]), 0, torch.zeros(2, 2, device="meta")) is None

    class Broken(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def,override]
            raise RuntimeError("cannot step here")

    assert initial_state(Broken([p], lr=0.1), 0, p) is None
