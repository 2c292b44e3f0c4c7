"""The frozen weights' fingerprint: equal weights match, any change to one element does not."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from chainopt import ChainLoRAOptimizer
from chainopt._fingerprint import fingerprint, same_weights


def _chain(width: int, bias: bool) -> tuple[nn.Module, ChainLoRAOptimizer]:
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             target_modules=["0", "2"], rank=1, knot_every=5,
                             lora_bias=bias)  # fmt: skip
    return model, opt


@settings(max_examples=30, deadline=None)
@given(
    width=st.integers(2, 16),
    bias=st.booleans(),
    row=st.integers(0, 15),
    col=st.integers(0, 15),
    scale=st.sampled_from([1e-6, 1e-3, 1.0]),
    sign=st.sampled_from([-1.0, 1.0]),
)
def test_a_change_to_any_one_frozen_element_changes_the_fingerprint(
    width: int, bias: bool, row: int, col: int, scale: float, sign: float
) -> None:
    torch.manual_seed(width)
    model, opt = _chain(width, bias)
    saved = fingerprint(opt.chain.records)
    assert set(saved) == {"0", "2"} and all(len(v) == (4 if bias else 2) for v in saved.values())
    assert same_weights(saved, fingerprint(opt.chain.records))
    frozen = model[0].parametrizations.weight.original
    with torch.no_grad():
        frozen[row % width, col % width] += sign * scale * max(1.0, float(frozen.abs().max()))
    assert not same_weights(saved, fingerprint(opt.chain.records))


def test_a_knot_changes_the_fingerprint_and_the_copy_of_a_model_matches_it() -> None:
    import copy

    torch.manual_seed(0)
    _, opt = _chain(6, bias=False)
    with torch.no_grad():
        for r in opt.chain.records:
            r.link.lora_B.normal_()
    before = fingerprint(opt.chain.records)
    opt.tie_knot()
    after = fingerprint(opt.chain.records)
    assert not same_weights(before, after)
    twin = copy.deepcopy(opt)
    assert same_weights(after, fingerprint(twin.chain.records))
