"""Initialising a new link: Kaiming by default, or from the weight's gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import mlp
from test_resume import _roundtrip
from torch import nn

from chainopt import ChainLoRAOptimizer, ChainLoRAWarning
from chainopt._attach import lora_parametrization
from chainopt.init import a_from_gradient


@given(st.integers(2, 12), st.integers(2, 12), st.data())
def test_a_spans_the_top_right_singular_vectors(out: int, inp: int, data: st.DataObject) -> None:
    rank = data.draw(st.integers(1, min(out, inp)))
    g = torch.randn(out, inp, generator=torch.Generator().manual_seed(out * 31 + inp))
    a = a_from_gradient(g, rank)
    assert a.shape == (rank, inp)
    torch.testing.assert_close(a.norm(dim=1), torch.full((rank,), 3**-0.5))
    vh = torch.linalg.svd(g).Vh[:rank]
    proj = a @ vh.T @ vh  # projecting onto the top subspace changes nothing
    torch.testing.assert_close(proj, a, rtol=1e-4, atol=1e-5)


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [
        (torch.randn(16, 12, generator=gen), torch.randn(16, 6, generator=gen)) for _ in range(n)
    ]


def _run(
    opt: ChainLoRAOptimizer, batches: list[tuple[torch.Tensor, torch.Tensor]], micro: int = 1
) -> None:
    for x, y in batches:
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (nn.functional.mse_loss(opt.model(xs), ys) / micro).backward()
        opt.step()
        opt.zero_grad()


def test_gradient_init_uses_the_dense_gradient_of_the_step_before_the_knot() -> None:
    torch.manual_seed(0)
    model = mlp()
    reference = mlp()
    reference.load_state_dict(model.state_dict())
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["2"], rank=2,
        knot_every=3, init="gradient",
    )  # fmt: skip
    batches = _batches(3)
    _run(opt, batches[:2])
    # The dense gradient of layer 2's weight on batch 3, at the weights in effect before step 3.
    with torch.no_grad():
        reference[2].weight.copy_(model[2].weight)
    x, y = batches[2]
    nn.functional.mse_loss(reference(x), y).backward()
    g = reference[2].weight.grad
    _run(opt, batches[2:], micro=2)  # gradient accumulation: summed over micro-batches
    a = lora_parametrization(model[2]).lora_A
    torch.testing.assert_close(a.abs(), a_from_gradient(g, 2).abs(), rtol=1e-3, atol=1e-4)
    assert torch.count_nonzero(lora_parametrization(model[2]).lora_B) == 0


def test_gradient_init_preserves_the_function_and_resumes_bitwise() -> None:
    def build() -> ChainLoRAOptimizer:
        torch.manual_seed(0)
        model = mlp()
        return ChainLoRAOptimizer(
            model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules=["0", "2"],
            rank=2, knot_every=2, init="gradient",
        )  # fmt: skip

    batches = _batches(6)
    straight = build()
    _run(straight, batches)
    first = build()
    _run(first, batches[:3])
    sd_m, sd_o = _roundtrip(first.model.state_dict()), _roundtrip(first.state_dict())
    resumed = build()
    resumed.model.load_state_dict(sd_m)
    resumed.load_state_dict(sd_o)
    _run(resumed, batches[3:])
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_manual_knot_without_gradients_falls_back_to_kaiming() -> None:
    model = mlp()
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["0"], rank=2,
        knot_every=100, init="gradient",
    )  # fmt: skip
    opt.tie_knot()
    a = lora_parametrization(model[0]).lora_A
    assert a.abs().max() <= 12**-0.5 and a.abs().max() > 0


def test_a_non_finite_gradient_falls_back_to_kaiming_with_a_warning() -> None:
    """An overflowed step before the knot (a GradScaler skip) must not put NaN into A."""
    torch.manual_seed(0)
    model = mlp()
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["0", "2"], rank=2,
        knot_every=2, init="gradient",
    )  # fmt: skip
    x = torch.randn(8, 12)
    model(x).sum().backward()
    opt.step()  # step 1: the next step is the one before the knot, so its gradient is gathered
    opt.zero_grad()
    model(torch.cat([x[:7], torch.full((1, 12), float("inf"))])).sum().backward()
    for p in opt.param_groups[0]["params"]:
        p.grad = None  # what a GradScaler skip leaves the optimizer: nothing to step with
    before = model(x).detach()
    with pytest.warns(ChainLoRAWarning, match="not finite"):
        opt.step()  # step 2: the knot
    assert opt.knots_tied == 1
    for i in (0, 2):
        a = lora_parametrization(model[i]).lora_A
        assert torch.isfinite(a).all() and a.abs().max() > 0
    torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize(
    ("gradient", "rank", "err", "match"),
    [
        (torch.randn(4, 4), 0, ValueError, "rank must be a positive int, got 0"),
        (torch.randn(4, 4), 2.0, ValueError, "rank must be a positive int, got 2.0"),
        (torch.randn(4), 2, TypeError, r"gradient must be a 2-D \(out, in\) tensor, got \(4,\)"),
        (torch.ones(4, 4, dtype=torch.int64), 2, TypeError, "gradient must be a floating"),
        (torch.full((4, 4), float("nan")), 2, ValueError, "gradient holds NaN or Inf"),
    ],
)
def test_a_from_gradient_refuses_bad_input_naming_it(
    gradient: torch.Tensor, rank: object, err: type[Exception], match: str
) -> None:
    """Public: rank 0 gave a (0, in) A, a 1-D gradient an unpacking error, NaN a LinAlgError."""
    with pytest.raises(err, match=match):
        a_from_gradient(gradient, rank)  # type: ignore[arg-type]


def test_gradient_init_on_a_conv1d_takes_the_gradient_in_the_links_orientation() -> None:
    """transformers' ``Conv1D`` stores its weight ``(in, out)``; A ``(r, in)`` must span the
    top right singular vectors of the ``(out, in)`` gradient, as for an ``nn.Linear``."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(12, 16), nn.Tanh(), nn.Linear(12, 4))  # (nf=out, nx=in)
    reference = nn.Sequential(conv1d(12, 16), nn.Tanh(), nn.Linear(12, 4))
    reference.load_state_dict(model.state_dict())
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["0"], rank=2,
        knot_every=2, init="gradient",
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 16, generator=gen) for _ in range(2)]
    model(xs[0]).square().mean().backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        reference[0].weight.copy_(model[0].weight)  # (in, out), the weight in effect now
    reference(xs[1]).square().mean().backward()
    g = reference[0].weight.grad.T  # (out, in)
    model(xs[1]).square().mean().backward()
    opt.step()
    assert opt.knots_tied == 1
    a = lora_parametrization(model[0]).lora_A
    assert a.shape == (2, 16)
    torch.testing.assert_close(a.abs(), a_from_gradient(g, 2).abs(), rtol=1e-3, atol=1e-4)
    assert torch.count_nonzero(lora_parametrization(model[0]).lora_B) == 0
