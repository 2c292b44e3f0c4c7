"""Unloading removes every mark chainopt puts on a model: an unloaded model is the plain model."""

from __future__ import annotations

import io

import pytest
import torch
from models import tiny_llama
from torch import nn

import chainopt
from chainopt import ChainLoRAOptimizer
from chainopt._marks import (
    BASE_MERGED,
    CLEARED_IS_QUANTIZED,
    LOAD_GUARD,
    mark_base_merged,
    merged_rank,
)


def _marks(model: nn.Module) -> dict[str, object]:
    """What chainopt could have left: instance attributes, hooks, swapped classes."""
    return {
        "attributes": sorted(
            k for k in vars(model) if "chainopt" in k or k in ("save_pretrained", "is_quantized")
        ),
        "forward_hooks": sum(len(m._forward_hooks) for m in model.modules()),
        "load_hooks": len(model._load_state_dict_pre_hooks)
        + len(model._load_state_dict_post_hooks),
        "classes": sorted(
            {type(m).__name__ for m in model.modules() if "Parametrized" in type(m).__name__}
        ),
        "module_attributes": sorted(
            {k for m in model.modules() for k in vars(m) if "chainopt" in k}
        ),
    }


def _chained(seed: int = 0) -> tuple[nn.Module, ChainLoRAOptimizer, torch.Tensor]:
    model = tiny_llama(seed)
    plain = _marks(model)
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
                             target_modules=["q_proj", "v_proj"], rank=2, knot_every=2,
                             init="gradient", lora_bias=False)  # fmt: skip
    assert _marks(model) != plain  # construction marks the model
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(seed))
    for _ in range(3):  # a knot with the gradient hooks armed, and a pending link
        model(ids).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt, ids


@pytest.mark.parametrize("how", ["method", "function"])
def test_an_unloaded_model_is_the_plain_model(how: str) -> None:
    plain = _marks(tiny_llama())
    model, opt, ids = _chained()
    assert LOAD_GUARD in vars(model) and "save_pretrained" in vars(model)
    if how == "method":
        opt.merge_and_unload()
    else:
        chainopt.merge_and_unload(model)
    left = _marks(model)
    # what the weights now hold, nothing else
    assert left.pop("attributes") == left.pop("module_attributes") == [BASE_MERGED]
    assert plain.pop("attributes") == plain.pop("module_attributes") == []
    assert left == plain
    ranks = 2 * 2 if how == "method" else None  # a knot and the pending link, each of rank 2
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert vars(model)[BASE_MERGED] == dict.fromkeys(names, ranks)
    with torch.no_grad():
        expected = model(ids).logits
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


def test_unloading_gives_a_quantized_model_its_is_quantized_back() -> None:
    model = tiny_llama()
    model.hf_quantizer = object()  # what from_pretrained(quantization_config=...) sets
    model.is_quantized = True
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             target_modules=["q_proj"], rank=2, knot_every=2)  # fmt: skip
    assert model.is_quantized is False and vars(model)[CLEARED_IS_QUANTIZED]  # Trainer may train
    opt.merge_and_unload()
    assert model.is_quantized is True and CLEARED_IS_QUANTIZED not in vars(model)


def test_the_base_merged_mark_adds_what_each_chain_merged_and_forgets_nothing() -> None:
    """Ranks add up across chains; a rank not known (``None``) stays unknown; a mark on a module
    inside the model (a ``PeftModel``'s base) makes every name unknown there."""
    outer = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    assert merged_rank(outer, "0") == 0
    mark_base_merged(outer, {"0": 4, "1.0": 2})
    mark_base_merged(outer, {"0": 8, "1.0": None})
    assert merged_rank(outer, "0") == 12 and merged_rank(outer, "1.0") is None
    assert merged_rank(outer, "never") == 0
    mark_base_merged(outer[1], {})
    assert merged_rank(outer, "0") is None and merged_rank(outer[1], "0") == 0
