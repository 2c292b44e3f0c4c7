"""Leaving the chain: plain-key state dicts and merge_and_unload, on HF models and deep copies."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from models import tiny_llama, tiny_opt
from torch import nn

import chainopt
from chainopt import ChainLoRAOptimizer, merged_state_dict


def _trained(model: nn.Module, bias: bool = False) -> ChainLoRAOptimizer:
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=2e-2),
        target_modules=["q_proj", "v_proj"],
        rank=4,
        alpha=8,
        knot_every=3,
        lora_bias=bias,
    )
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(5):  # a knot, then a pending link
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(9))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize(("build", "bias"), [(tiny_llama, False), (tiny_opt, True)])
def test_merged_state_dict_loads_strictly_into_a_plain_model(build, bias) -> None:  # type: ignore[no-untyped-def]
    model = build()
    _trained(model, bias)
    expected = _logits(model)
    plain = build(seed=123)
    sd = merged_state_dict(model)
    assert not any("parametrizations" in k for k in sd)
    plain.load_state_dict(sd, strict=True)
    torch.testing.assert_close(_logits(plain), expected, rtol=1e-5, atol=1e-5)
    assert chainopt.adapted_modules(model)  # the model itself is still adapted


def test_save_pretrained_with_merged_state_dict_round_trips(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    _trained(model)
    expected = _logits(model)
    model.save_pretrained(tmp_path, state_dict=merged_state_dict(model))
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_logits(loaded.eval()), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_on_a_deepcopy_leaves_both_correct() -> None:
    model = tiny_llama()
    opt = _trained(model)
    expected = _logits(model)
    clone = copy.deepcopy(model)
    chainopt.merge_and_unload(clone)
    q = clone.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear
    torch.testing.assert_close(_logits(clone), expected, rtol=1e-5, atol=1e-5)
    # The original still trains and unloads correctly.
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=0)
    opt.merge_and_unload()
    torch.testing.assert_close(_logits(model), expected, rtol=1e-5, atol=1e-5)
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_merge_and_unload_refuses_non_finite_and_changes_nothing() -> None:
    model = tiny_llama()
    _trained(model)
    link = chainopt.adapted_modules(model)[0][1].parametrizations.weight[0]
    with torch.no_grad():
        link.lora_A[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(chainopt.NonFiniteUpdateError, match="refusing to merge"):
        chainopt.merge_and_unload(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _poisoned(dtype: torch.dtype = torch.float32, value: float = float("nan")) -> nn.Module:
    from models import mlp

    model = mlp(dtype=dtype)
    ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       target_modules=["0", "2"], rank=2, knot_every=9)  # fmt: skip
    link = model[2].parametrizations.weight[0]
    with torch.no_grad():
        if dtype == torch.float16:  # finite factors whose merge overflows float16
            link.lora_A.fill_(300.0)
            link.lora_B.fill_(300.0)
        else:
            link.lora_B[0, 0] = value
    return model


@pytest.mark.parametrize(
    ("dtype", "value"),
    [(torch.float32, float("nan")), (torch.float32, float("inf")), (torch.float16, 0.0)],
)
def test_nothing_non_finite_is_exported_or_merged(
    tmp_path: Any, dtype: torch.dtype, value: float
) -> None:
    model = _poisoned(dtype, value)
    keys, before = list(model.state_dict()), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(chainopt.NonFiniteUpdateError, match="'2'"):
        chainopt.merged_state_dict(model)
    with pytest.raises(chainopt.NonFiniteUpdateError, match="'2'"):
        chainopt.merge_and_unload(model)
    assert list(model.state_dict()) == keys
    assert all(
        torch.equal(before[k], v) or torch.isnan(v).any() for k, v in model.state_dict().items()
    )
    assert chainopt.adapted_modules(model)  # nothing was unloaded


def test_save_merged_refuses_nan_and_writes_nothing(tmp_path: Any) -> None:
    from models import tiny_llama

    model = tiny_llama()
    ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       target_modules=["q_proj"], rank=2, knot_every=9)  # fmt: skip
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.parametrizations.weight[0].lora_B[0, 0] = float(
            "nan"
        )
    with pytest.raises(chainopt.NonFiniteUpdateError):
        chainopt.save_merged(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _head_gone_nan() -> tuple[nn.Module, ChainLoRAOptimizer]:
    """A NaN gradient for the head alone on a step between knots: the head trained as it is
    (``trainable_modules``) takes the NaN step, the links stay finite (a knot with such a head
    refuses, but no knot is due here)."""
    model = tiny_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                             target_modules=["q_proj"], trainable_modules=["lm_head"], rank=2,
                             knot_every=3, non_finite="skip", keep_history=True)  # fmt: skip
    for step in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        if step == 1:
            model.lm_head.weight.grad.fill_(float("nan"))
        opt.step()
        opt.zero_grad()
    assert opt.knots_tied == 0 and bool(model.lm_head.weight.isnan().all())
    return model, opt


def test_a_trained_module_gone_non_finite_is_not_exported(tmp_path: Path) -> None:
    """The links' check never saw a ``trainable_modules`` parameter: ``merged_state_dict`` and
    ``save_pretrained`` wrote the NaN head. Refused now, nothing written."""
    model, _ = _head_gone_nan()
    with pytest.raises(chainopt.NonFiniteUpdateError, match=r"\['lm_head.weight'\].*NaN"):
        chainopt.merged_state_dict(model)
    for save in (model.save_pretrained, lambda p: chainopt.save_merged(model, p)):
        with pytest.raises(chainopt.NonFiniteUpdateError, match=r"lm_head\.weight"):
            save(tmp_path / "out")
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with torch.no_grad():
        model.lm_head.weight.zero_()  # finite again: exported
    assert torch.equal(chainopt.merged_state_dict(model)["lm_head.weight"], model.lm_head.weight)


def test_merge_and_unload_keeps_the_parameter_order() -> None:
    from models import mlp

    model = mlp()
    keys = list(model.state_dict())
    ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                       target_modules=["0", "2"], rank=2, knot_every=9, lora_bias=True)  # fmt: skip
    chainopt.merge_and_unload(model)
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("call", ["merged_state_dict", "merge_and_unload", "adapted_modules"])
def test_a_non_module_is_a_type_error(call: str) -> None:
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        getattr(chainopt, call)("model")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantized_dtype": 3}, "quantized_dtype must be None or a floating"),
        ({"quantized_dtype": torch.int8}, "quantized_dtype must be None or a floating"),
        ({"quantized_dtype": torch.float8_e4m3fn}, "quantized_dtype must be None or a floating"),
        ({"quantized_dtype": "bfloat16"}, "quantized_dtype must be None or a floating"),
        ({"keep_quantized": "yes"}, "keep_quantized must be a bool"),
    ],
)
def test_merged_state_dict_refuses_bad_options(kwargs: dict[str, Any], match: str) -> None:
    model = tiny_llama()
    ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["q_proj"], rank=2,
        knot_every=2,
    )  # fmt: skip
    with pytest.raises(TypeError, match=match):
        merged_state_dict(model, **kwargs)


@pytest.mark.parametrize("lora_bias", [False, True])
def test_merged_state_dict_of_a_module_registered_twice_loads_strictly_into_the_plain_model(
    lora_bias: bool,
) -> None:
    """The state dict holds such a module under both names; the second name's chain keys
    (``2.parametrizations.weight.original``, factors) were passed through unmerged, so the
    result did not load into the plain model."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    model = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(6, 2))
    plain = copy.deepcopy(model)
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             target_modules=["2"], rank=2, knot_every=2,
                             lora_bias=lora_bias)  # fmt: skip
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    for _ in range(3):  # a knot, then a pending link
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    merged = merged_state_dict(model)
    assert sorted(merged) == sorted(plain.state_dict())
    plain.load_state_dict(merged)  # strict
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-6)
