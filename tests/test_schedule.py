"""Knot schedules."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chainopt.schedule import KnotSchedule


@given(st.integers(1, 20), st.integers(1, 100))
def test_knot_every_fires_on_multiples(n: int, horizon: int) -> None:
    s = KnotSchedule(knot_every=n)
    assert [t for t in range(1, horizon + 1) if s.is_due(t)] == list(range(n, horizon + 1, n))


@given(st.lists(st.integers(1, 50), min_size=1, max_size=6, unique=True))
def test_knot_list_fires_exactly_there(knots: list[int]) -> None:
    knots = sorted(knots)
    s = KnotSchedule(knots=knots)
    assert [t for t in range(1, 60) if s.is_due(t)] == knots


@given(st.integers(1, 8), st.integers(8, 500))
def test_even_schedule_splits_into_num_links(links: int, total: int) -> None:
    s = KnotSchedule.even(num_links=links, total_steps=total)
    due = [t for t in range(1, total + 1) if s.is_due(t)]
    assert len(due) == links - 1
    lengths = [b - a for a, b in zip([0, *due], [*due, total], strict=True)]
    assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of knot_every and knots"),
        ({"knot_every": 3, "knots": [3]}, "exactly one"),
        ({"knot_every": 0}, "knot_every must be a positive int, got 0"),
        ({"knot_every": 2.5}, "knot_every must be a positive int, got 2.5"),
        ({"knot_every": True}, "knot_every must be a positive int, got True"),
        ({"knots": []}, r"knots must be .* got \[\]"),
        ({"knots": [0, 3]}, r"got \[0, 3\]"),
        ({"knots": [5, 3]}, r"got \[5, 3\]"),
        ({"knots": [3, 3]}, r"got \[3, 3\]"),
        ({"knots": [1.5]}, r"got \[1.5\]"),
        ({"knots": "12"}, "got '12'"),
    ],
)
def test_bad_schedules_are_refused(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KnotSchedule(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("links", "total"), [(0, 10), (3, 2), (2, 0)])
def test_bad_even_schedules_are_refused(links: int, total: int) -> None:
    with pytest.raises(ValueError, match=r"num_links|total_steps"):
        KnotSchedule.even(num_links=links, total_steps=total)


def test_one_link_is_plain_lora_with_no_knot() -> None:
    from models import mlp

    from chainopt import ChainLoRAOptimizer

    model = mlp()
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["0"], rank=2,
        num_links=1, total_steps=5,
    )  # fmt: skip
    assert not any(opt.schedule.is_due(s) for s in range(1, 50))
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("knots", [[3, 1], [0], [2, 2], "12", [1.0], (k for k in [1])])
def test_from_steps_refuses_what_the_constructor_refuses(knots: Any) -> None:
    """``from_steps`` is public and took any list ("already checked"), ``[3, 1, -2]`` too."""
    with pytest.raises(ValueError, match="knots must be a strictly increasing list"):
        KnotSchedule.from_steps(knots)
    assert KnotSchedule.from_steps(range(2, 9, 3)).knots == (2, 5, 8)
    assert KnotSchedule.from_steps([]).knots == ()
