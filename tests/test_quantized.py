"""Chains over 4-bit weights: bitsandbytes Linear4bit (NF4/FP4, double quant) and torchao NF4."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import assert_same, fingerprint
from torch import nn

import chainopt
from chainopt import ChainLoRAOptimizer, ChainLoRAWarning

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")


def _q4(lin: nn.Linear, quant_type: str = "nf4", double: bool = True) -> nn.Module:
    m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=torch.float32, quant_type=quant_type,
                          compress_statistics=double)  # fmt: skip
    m.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                 quant_type=quant_type, compress_statistics=double)  # fmt: skip
    if lin.bias is not None:
        m.bias = nn.Parameter(lin.bias.data.clone())
    return m.to("cpu")


def _models(quant_type: str = "nf4", double: bool = True) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)
    )
    quantized = nn.Sequential(
        _q4(dense[0], quant_type, double), nn.Tanh(), _q4(dense[2], quant_type, double),
        nn.Tanh(), nn.Linear(64, 4),
    )  # fmt: skip
    quantized[4].load_state_dict(dense[4].state_dict())
    return dense, quantized


def _chain(model: nn.Module, **kw: Any) -> ChainLoRAOptimizer:
    kw = {"target_modules": ["0", "2"], "rank": 4, "knot_every": 3, **kw}
    return ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), **kw)


def _train(model: nn.Module, opt: ChainLoRAOptimizer, steps: range) -> None:
    for step in steps:
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _quantize(master: torch.Tensor, like: nn.Module) -> torch.Tensor:
    qs = like.weight.quant_state
    nested = bool(getattr(qs, "original_nested", False) or qs.nested)
    q, _ = bnbf.quantize_4bit(master, blocksize=qs.blocksize, compress_statistics=nested,
                              quant_type=qs.quant_type)  # fmt: skip
    return q


@pytest.mark.parametrize(("quant_type", "double"), [("nf4", True), ("nf4", False), ("fp4", True)])
def test_a_4bit_chain_trains_with_the_layers_own_forward_and_knots_round_once(
    quant_type: str, double: bool
) -> None:
    _, model = _models(quant_type, double)
    x = torch.randn(8, 64)
    before = model(x)
    start = bnbf.dequantize_4bit(model[0].weight.data, model[0].weight.quant_state).clone()
    opt = _chain(model, keep_history=True)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert type(model[0]).__name__ == "Linear4bit" and model[0].weight.dtype == torch.uint8
    _train(model, opt, range(7))  # knots after steps 3 and 6
    assert opt.knots_tied == 2
    record = opt.chain.records[0]
    assert record.quant is not None and record.quant.master is not None
    # the master is M0 + the merged links, and the 4-bit weight is quantize(M) (rounded once)
    links = opt.history.links("0")
    total = sum(link.scale * link.B.double() @ link.A.double() for link in links)
    torch.testing.assert_close(record.quant.master.double(), start.double() + total,
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    assert torch.equal(model[0].weight.data, _quantize(record.quant.master, model[0]))
    assert record.quant.master.device.type == "cpu" and record.quant.master.dtype == torch.float32
    link = record.link
    w = bnbf.dequantize_4bit(model[0].weight.data, model[0].weight.quant_state)
    expected = x @ w.T + model[0].bias + link.scale * (x @ link.lora_A.T) @ link.lora_B.T
    torch.testing.assert_close(model[0](x), expected, rtol=1e-5, atol=1e-5)


def _knots_of_small_updates(model: nn.Module, opt: ChainLoRAOptimizer, k: int) -> torch.Tensor:
    """``k`` knots, each of a small update; returns the exact sum of the updates."""
    gen = torch.Generator().manual_seed(1)
    total = torch.zeros(64, 64, dtype=torch.float64)
    link = opt.chain.records[0].link
    for _ in range(k):
        with torch.no_grad():
            link.lora_B.normal_(generator=gen).mul_(1e-3)
        total += link.delta().double()
        opt.tie_knot()
    return total


def test_the_host_master_keeps_small_updates_that_in_place_requantization_loses() -> None:
    errors = {}
    for master in ("host", "none"):
        _, model = _models()
        start = bnbf.dequantize_4bit(model[0].weight.data, model[0].weight.quant_state).double()
        ctx = (
            pytest.warns(ChainLoRAWarning, match="compounds")
            if master == "none"
            else warnings.catch_warnings()
        )
        with ctx:
            opt = _chain(model, target_modules=["0"], quantized_master=master)
        total = _knots_of_small_updates(model, opt, 10)
        final = bnbf.dequantize_4bit(model[0].weight.data, model[0].weight.quant_state).double()
        exact = start + total
        floor = (_dequantize_like(exact, model[0]) - exact).norm()
        errors[master] = ((final - exact).norm() / floor).item()
    assert errors["host"] == pytest.approx(1.0, abs=1e-6)  # at the round-once floor
    assert errors["none"] > 1.05


def _dequantize_like(dense: torch.Tensor, like: nn.Module) -> torch.Tensor:
    qs = like.weight.quant_state
    nested = bool(getattr(qs, "original_nested", False) or qs.nested)
    q, state = bnbf.quantize_4bit(dense.float(), blocksize=qs.blocksize, compress_statistics=nested,
                                  quant_type=qs.quant_type)  # fmt: skip
    return bnbf.dequantize_4bit(q, state).double()


def test_a_4bit_chain_resumes_bitwise_from_a_checkpoint(tmp_path: Path) -> None:
    _, straight = _models()
    opt = _chain(straight)
    _train(straight, opt, range(8))

    _, model = _models()
    first = _chain(model)
    _train(model, first, range(4))  # a knot, then mid-link
    chainopt.save_checkpoint(tmp_path / "ckpt.pt", model, first)
    _, resumed = _models()
    again = _chain(resumed)
    chainopt.load_checkpoint(tmp_path / "ckpt.pt", resumed, again)  # weights_only=True
    _train(resumed, again, range(4, 8))
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
    assert torch.equal(opt.chain.records[0].quant.master, again.chain.records[0].quant.master)  # type: ignore[union-attr]


def test_a_bad_saved_master_is_refused_before_anything_loads() -> None:
    _, model = _models()
    opt = _chain(model)
    sd = opt.state_dict()
    sd["chainopt"]["masters"]["0"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="masters"):
        opt.load_state_dict(sd)


def test_merged_exports_are_dense_and_merge_and_unload_requantizes_from_the_master() -> None:
    dense, model = _models()
    opt = _chain(model)
    _train(model, opt, range(5))
    record = opt.chain.records[0]
    expected = record.quant.merged(record.link)  # type: ignore[union-attr]
    merged = chainopt.merged_state_dict(model)
    assert sorted(merged) == sorted(dense.state_dict())
    assert merged["0.weight"].dtype == torch.float32 and torch.equal(merged["0.weight"], expected)
    dense.load_state_dict(merged)  # a plain model takes it
    chainopt.merge_and_unload(model)
    assert type(model[0]).__name__ == "Linear4bit" and "chainopt_link" not in dict(
        model[0].named_children()
    )
    assert torch.equal(model[0].weight.data, _quantize(expected, model[0]))


def test_the_adapter_against_the_quantized_base_is_exact(tmp_path: Path) -> None:
    _, model = _models()
    opt = _chain(model)
    _train(model, opt, range(5))
    _, base = _models()
    report = chainopt.export_peft_adapter(opt, tmp_path / "adapter", base=base)
    assert report.relative_error < 1e-5  # the chain's update is exactly rank sum(r_i)


torchao = pytest.importorskip("torchao")


def test_a_torchao_nf4_chain_knots_round_once() -> None:
    from torchao.quantization import to_nf4

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128, bias=False), nn.Tanh(), nn.Linear(128, 4))
    model[0].weight = nn.Parameter(to_nf4(model[0].weight.detach()), requires_grad=False)
    x = torch.randn(8, 128)
    before = model(x)
    opt = _chain(model, target_modules=["0"], keep_history=True)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    for step in range(4):
        model(
            torch.randn(8, 128, generator=torch.Generator().manual_seed(step))
        ).square().mean().backward()
        opt.step()
        opt.zero_grad()
    master = opt.chain.records[0].quant.master  # type: ignore[union-attr]
    assert opt.knots_tied == 1
    assert torch.equal(model[0].weight.get_original_weight(), to_nf4(master).get_original_weight())


def test_a_bf16_4bit_layer_is_requantized_from_the_float32_master() -> None:
    torch.manual_seed(0)
    dense = nn.Linear(64, 64, bias=False)
    m = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    m.weight = bnb.nn.Params4bit(
        dense.weight.data.bfloat16(), requires_grad=False, quant_type="nf4"
    )
    model = nn.Sequential(m.to("cpu"))
    opt = _chain(model, target_modules=["0"])
    link = opt.chain.records[0].link
    with torch.no_grad():
        link.lora_B.normal_(std=1e-2)
    opt.tie_knot()
    master = opt.chain.records[0].quant.master  # type: ignore[union-attr]
    q, _ = bnbf.quantize_4bit(master, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(model[0].weight.data, q)  # quantize(M) in float32, not quantize(bf16(M))
    assert model[0].weight.quant_state.dtype == torch.bfloat16
    assert model(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_the_summary_reports_the_host_masters_bytes() -> None:
    _, model = _models()
    opt = _chain(model)
    assert opt.chain_summary().master_bytes == 2 * 64 * 64 * 4  # two 64x64 float32 masters


@pytest.mark.parametrize("bad", ["meta", "nan", "inf"])
def test_master_weights_without_data_or_finite_values_are_refused_at_construction(
    bad: str,
) -> None:
    """Before: meta raised NotImplementedError mid-construction; NaN/Inf were accepted and the
    first knot blamed the factors."""
    dense, quantized = _models()
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    if bad == "meta":
        state["2.weight"] = torch.empty_like(state["2.weight"], device="meta")
    else:
        state["2.weight"][3, 5] = float(bad)
    before = {
        k: v.clone() for k, v in quantized.state_dict().items() if isinstance(v, torch.Tensor)
    }
    with pytest.raises(ValueError, match=r"master_weights\['2.weight'\] \(for module '2'\)"):
        _chain(quantized, master_weights=state)
    after = quantized.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert chainopt.adapted_modules(quantized) == []


def test_master_weights_that_would_start_no_master_are_refused_before_anything_changes() -> None:
    """``master_weights`` on a chain with no 4-bit target, or with ``quantized_master="none"``
    (which keeps no master), was ignored without a word."""
    dense, quantized = _models()
    state = dense.state_dict()
    for model, kwargs, match in (
        (dense, {}, r"master_weights \(a \w+\) .* none of \['0', '2'\] is a 4-bit layer"),
        (quantized, {"quantized_master": "none"}, 'master_weights with quantized_master="none"'),
    ):
        base = torch.optim.AdamW(model.parameters(), lr=1e-2)
        before = fingerprint(model, base)
        with pytest.raises(ValueError, match=match):
            ChainLoRAOptimizer(model, base, target_modules=["0", "2"], rank=4, knot_every=3,
                               master_weights=state, **kwargs)  # fmt: skip
        assert_same(before, fingerprint(model, base))
