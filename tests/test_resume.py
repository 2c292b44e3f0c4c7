"""Checkpoint and resume: save mid-link, rebuild, load, continue == never stopping (bitwise)."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import mlp, tiny_llama
from strategies import schedules
from test_optimizer import OPTIMIZERS, _train
from torch import nn

from chainopt import ChainLoRAOptimizer


def _build(name: str, schedule: dict[str, Any], seed: int = 3) -> ChainLoRAOptimizer:
    torch.manual_seed(11)
    model = mlp()
    return ChainLoRAOptimizer(
        model,
        OPTIMIZERS[name](model.parameters()),
        target_modules=["0", "2"],
        rank=3,
        trainable_modules=["4"],
        seed=seed,
        lora_bias=True,
        **schedule,
    )


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@given(schedules, st.sampled_from(sorted(OPTIMIZERS)), st.integers(0, 10), st.integers(1, 8))
def test_resume_equals_uninterrupted_training(
    schedule: dict[str, Any], name: str, save_at: int, more: int
) -> None:
    straight = _build(name, schedule)
    _train(straight.model, straight, save_at + more)

    first = _build(name, schedule)
    _train(first.model, first, save_at)
    model_sd, opt_sd = _roundtrip(first.model.state_dict()), _roundtrip(first.state_dict())
    del first

    resumed = _build(name, schedule)  # same construction: draws A again, then overwritten
    resumed.model.load_state_dict(model_sd)
    resumed.load_state_dict(opt_sd)
    gen = torch.Generator().manual_seed(1)  # replay the data the first run already consumed
    for _ in range(save_at):
        torch.randn(8, 12, generator=gen)
    losses = []
    for _ in range(more):
        x = torch.randn(8, 12, generator=gen)
        loss = resumed.model(x).square().mean()
        loss.backward()
        resumed.step()
        resumed.zero_grad()
        losses.append(loss.item())

    assert resumed.optimizer_steps == straight.optimizer_steps
    assert resumed.knots_tied == straight.knots_tied
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_on_llama_mid_link_is_bitwise() -> None:
    def build() -> tuple[nn.Module, ChainLoRAOptimizer]:
        model = tiny_llama()
        opt = ChainLoRAOptimizer(
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-2),
            target_modules=["q_proj", "v_proj"],
            rank=4,
            alpha=8,
            knot_every=3,
            seed=5,
        )
        return model, opt

    ids = torch.randint(0, 64, (6, 2, 12), generator=torch.Generator().manual_seed(0))

    def run(model: nn.Module, opt: ChainLoRAOptimizer, batches: torch.Tensor) -> None:
        for b in batches:
            model(input_ids=b, labels=b).loss.backward()
            opt.step()
            opt.zero_grad()

    m1, o1 = build()
    run(m1, o1, ids)
    m2, o2 = build()
    run(m2, o2, ids[:4])  # mid-link: knot after step 3, next after 6
    sd_m, sd_o = _roundtrip(m2.state_dict()), _roundtrip(o2.state_dict())
    m3, o3 = build()
    m3.load_state_dict(sd_m)
    o3.load_state_dict(sd_o)
    run(m3, o3, ids[4:])
    assert o3.knots_tied == o1.knots_tied == 2
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m3.state_dict()[k]), k


def test_state_dict_is_the_base_format_plus_a_chain_entry() -> None:
    opt = _build("adamw", {"knot_every": 2})
    _train(opt.model, opt, 3)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "chainopt"}
    chain = sd["chainopt"]
    assert chain["optimizer_steps"] == 3 and chain["knots_tied"] == 1
    assert chain["config"]["modules"] == ["0", "2"]
    assert isinstance(chain["generator"], torch.Tensor)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seed": 4}, "seed=3 vs 4"),
        ({"knot_every": 3}, "knot_every=2 vs 3"),
    ],
)
def test_loading_a_different_config_is_refused_before_anything_loads(
    change: dict[str, Any], match: str
) -> None:
    saved = _build("adamw", {"knot_every": 2})
    _train(saved.model, saved, 3)
    sd = saved.state_dict()
    kwargs: dict[str, Any] = {"knot_every": 2, **change}
    seed = kwargs.pop("seed", 3)
    other = _build("adamw", kwargs, seed=seed)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(sd)
    assert other.optimizer_steps == 0 and len(other.state) == 0


def test_loading_a_plain_optimizer_state_dict_is_refused() -> None:
    opt = _build("adamw", {"knot_every": 2})
    with pytest.raises(ValueError, match="no 'chainopt' entry"):
        opt.load_state_dict(opt.optimizer.state_dict())
