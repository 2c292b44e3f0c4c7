"""Half precision end to end: knots lose nothing beyond rounding once; factors stay float32."""

from __future__ import annotations

import pytest
import torch
from models import mlp
from torch import nn

from chainopt import ChainLoRAOptimizer, KnotRecord

WIDTH, OUT = 64, 8


def _train_with_reference(
    dtype: torch.dtype, exact_merge: bool | None
) -> tuple[ChainLoRAOptimizer, dict[str, tuple[float, float]]]:
    """10 knots of AdamW training on ``dtype`` weights, and per module (lost, floor).

    The reference adds every merged link (the float32 factors the knot record keeps) to a
    float64 copy of the starting weight. ``lost`` is ``|W - ref| / |ref - W₀|``: the part of the
    chain's accumulated update missing from the weight; ``floor`` is the same for ``ref`` rounded
    once to ``dtype``, the least any ``dtype`` weight can lose.
    """
    torch.manual_seed(0)
    model = mlp(width=WIDTH, out=OUT, dtype=dtype)
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-4),  # updates of ~0.5% of |W| per chain
        target_modules=["0", "2"],
        rank=4,
        knot_every=3,
        seed=1,
        exact_merge=exact_merge,
        keep_history=True,  # the hook below reads each merged link
    )
    weights = {n: m.parametrizations.weight.original for n, m in opt.adapted_modules()}
    start = {n: w.detach().double().clone() for n, w in weights.items()}
    ref = {n: w.clone() for n, w in start.items()}

    def accumulate(_: ChainLoRAOptimizer, record: KnotRecord) -> None:
        for name, link in record.links.items():
            ref[name] += link.scale * link.B.double() @ link.A.double()

    opt.register_knot_hook(accumulate)
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        x, y = torch.randn(16, WIDTH, generator=gen), torch.randn(16, OUT, generator=gen)
        nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        opt.step()
        opt.zero_grad()
    result = {}
    for name, w in weights.items():
        total = (ref[name] - start[name]).norm()
        lost = (w.double() - ref[name]).norm() / total
        floor = (ref[name].to(dtype).double() - ref[name]).norm() / total
        result[name] = (lost.item(), floor.item())
    return opt, result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ten_knots_on_half_precision_weights_lose_only_the_cast_once_floor(
    dtype: torch.dtype,
) -> None:
    opt, exact = _train_with_reference(dtype, exact_merge=None)  # the default for half weights
    assert opt.knots_tied == 10
    for name, (lost, floor) in exact.items():
        assert lost <= floor * (1 + 1e-3), name
    _, naive = _train_with_reference(dtype, exact_merge=False)  # rounding W at every knot
    for name, (lost, floor) in naive.items():
        assert lost > 2 * floor, name


@pytest.mark.parametrize(
    ("dtype", "exact_merge", "residual"),
    [
        (torch.bfloat16, None, torch.bfloat16),
        (torch.float16, None, torch.float32),
        (torch.bfloat16, False, None),
        (torch.float32, None, None),
        (torch.float32, True, None),  # a float32 sum is one rounding: a residual stays 0
        (torch.float64, True, None),
    ],
)
def test_what_exact_knots_cost(
    dtype: torch.dtype, exact_merge: bool | None, residual: torch.dtype | None
) -> None:
    model = mlp(dtype=dtype)
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        target_modules=["0", "2"],
        knot_every=2,
        lora_bias=True,
        exact_merge=exact_merge,
    )
    for _name, module in opt.adapted_modules():
        link = module.parametrizations.weight[0]
        weight = module.parametrizations.weight.original
        if residual is None:
            assert link.merge_residual is None
        else:  # one residual element per weight element (and per bias element)
            assert link.merge_residual.dtype == residual
            assert link.merge_residual.shape == weight.shape
            delta = module.parametrizations.bias[0]
            assert delta.merge_residual.shape == module.parametrizations.bias.original.shape


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("asked", [None, torch.bfloat16])
def test_factors_stay_float32_under_autocast_unless_asked(
    weights: torch.dtype, asked: torch.dtype | None
) -> None:
    model = mlp(dtype=weights)
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        target_modules=["0", "2"],
        rank=2,
        knot_every=2,
        lora_bias=True,
        factor_dtype=asked,
    )
    expected = asked or torch.float32
    for step in range(5):  # two knots
        x = torch.randn(4, 12, generator=torch.Generator().manual_seed(step))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.to(weights))
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        for p in opt.factors():
            assert p.dtype == expected and p.grad is not None and p.grad.dtype == expected
        opt.step()
        opt.zero_grad()
    assert opt.knots_tied == 2
    assert all(p.dtype == expected for p in opt.factors())
    for p in opt.factors():  # AdamW's moments follow the factors
        state = opt.state.get(p, {})
        assert all(v.dtype == expected for k, v in state.items() if k != "step")
    for _name, module in opt.adapted_modules():
        assert module.parametrizations.weight.original.dtype == weights
        assert torch.isfinite(module.parametrizations.weight.original).all()
