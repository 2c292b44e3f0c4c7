"""The link: restarting links in place, reproducibly, and loading factors that fit."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from chainopt.lora import BiasDelta, LoRAParametrization, restart_links


def test_reset_parameters_is_reproducible_from_a_generator() -> None:
    a = LoRAParametrization(5, 7, rank=3, alpha=3)
    b = LoRAParametrization(5, 7, rank=3, alpha=3)
    a.reset_parameters(torch.Generator().manual_seed(4))
    b.reset_parameters(torch.Generator().manual_seed(4))
    assert torch.equal(a.lora_A, b.lora_A)


@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 9), st.integers(1, 40), st.integers(1, 4), st.booleans()),
        min_size=1,
        max_size=5,
    ),
    given_a=st.lists(st.booleans(), min_size=5, max_size=5),
    seed=st.integers(0, 2**31 - 1),
)
def test_restart_links_equals_resetting_each_link_in_turn(
    shapes: list[tuple[int, int, int, bool]], given_a: list[bool], seed: int
) -> None:
    """The batched restart a knot uses draws exactly what one link at a time would."""

    def make() -> list[LoRAParametrization]:  # B non-zero, so the reset must clear it
        links = []
        for out, inp, rank, half in shapes:
            dtype = torch.bfloat16 if half else torch.float32
            link = LoRAParametrization(out, inp, rank, 2.0, dtype=dtype)
            with torch.no_grad():
                link.lora_B.fill_(1.0)
            links.append(link)
        return links

    inits = [
        torch.full((rank, inp), 0.5) if use else None
        for (_out, inp, rank, _half), use in zip(shapes, given_a, strict=False)
    ]
    links = make()
    restart_links(links, torch.Generator().manual_seed(seed), inits)
    gen = torch.Generator().manual_seed(seed)  # the reference: nn.Linear's draw, one at a time
    for link, init in zip(links, inits, strict=True):
        if init is None:
            bound = 1 / link.lora_A.shape[1] ** 0.5
            init = torch.empty(link.lora_A.shape).uniform_(-bound, bound, generator=gen)
        assert torch.equal(link.lora_A, init.to(link.lora_A.dtype))
        assert not link.lora_B.any()


@pytest.mark.parametrize(
    ("args", "kwargs", "err", "match"),
    [
        ((4, 4, 0, 8.0), {}, ValueError, "rank must be a positive int, got 0"),
        ((4, 4, True, 8.0), {}, ValueError, "rank must be a positive int, got True"),
        ((4, 4, 2, 8.0), {"ranks": [2, -1]}, ValueError, r"each of ranks=\[2, -1\] .* got -1"),
        ((4, 4, 2, 0.0), {}, ValueError, "alpha must be a positive finite number, got 0.0"),
        ((4, 4, 2, math.inf), {}, ValueError, "alpha must be a positive finite number, got inf"),
        ((4, 4, 2, "8"), {}, TypeError, "alpha must be a positive number, got '8'"),
        ((0, 4, 1, 1.0), {}, ValueError, "out_features must be a positive int, got 0"),
        ((4, 4.0, 1, 1.0), {}, ValueError, "in_features must be a positive int, got 4.0"),
        ((4, 4, 2, 8.0), {"dtype": torch.int8}, TypeError, "dtype must be a floating"),
    ],
)
def test_a_link_with_bad_arguments_is_refused_naming_them(
    args: tuple[Any, ...], kwargs: dict[str, Any], err: type[Exception], match: str
) -> None:
    """``LoRAParametrization`` is public: rank 0 raised ZeroDivisionError, alpha 0/NaN/'8'
    and a float size were taken or failed inside torch."""
    with pytest.raises(err, match=match):
        LoRAParametrization(*args, **kwargs)


@pytest.mark.parametrize(
    ("size", "kwargs", "err"),
    [(-1, {}, ValueError), (2.0, {}, ValueError), (3, {"dtype": torch.int64}, TypeError)],
)
def test_a_bias_delta_with_bad_arguments_is_refused(
    size: Any, kwargs: dict[str, Any], err: type[Exception]
) -> None:
    with pytest.raises(err, match=r"out_features|dtype"):
        BiasDelta(size, **kwargs)
    assert BiasDelta(0).delta.shape == (0,)


def test_a_chained_model_moved_to_meta_runs_a_shape_only_forward() -> None:
    """``torch.is_autocast_enabled("meta")`` raises; the factorised forwards asked it for the
    input's device, so a chained model moved to ``meta`` (a shape or FLOP count without
    memory) failed there. Both the Linear and the Conv1D forward now run."""
    from models import tiny_llama
    from test_conv1d import _gpt2

    from chainopt import ChainLoRAOptimizer

    for model, targets in ((tiny_llama(), ["q_proj", "down_proj"]), (_gpt2(), ["c_attn"])):
        ids = torch.zeros(2, 7, dtype=torch.long)
        want = model(input_ids=ids).logits.shape
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ChainLoRAOptimizer(model, opt, target_modules=targets, knot_every=2)
        model.to("meta")
        logits = model(input_ids=ids.to("meta")).logits
        assert logits.device.type == "meta" and logits.shape == want
