"""GPT-2's Conv1D (weight stored (in, out)): the factorised forward, exact knots, merged and
PEFT exports that stock loaders take, resume; "all-linear" finds it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import chainopt
from chainopt import ChainLoRAOptimizer
from chainopt._attach import lora_parametrization

IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))


def _gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg).eval()


def _chain(model: nn.Module, **kw: object) -> ChainLoRAOptimizer:
    kw = {"target_modules": ["c_attn", "c_proj", "c_fc"], "rank": 4, "knot_every": 3, **kw}
    return ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=2e-2), **kw)  # type: ignore[arg-type]


def _train(model: nn.Module, opt: ChainLoRAOptimizer, steps: range) -> None:
    for step in steps:
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_conv1d_is_adapted_with_a_factorised_forward_equal_to_the_materialised_one() -> None:
    from transformers.pytorch_utils import Conv1D

    model = _gpt2()
    before = _logits(model)
    opt = _chain(model)
    assert len(opt.config.modules) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    conv = model.transformer.h[0].attn.c_attn
    assert isinstance(conv, Conv1D)
    link = lora_parametrization(conv)
    assert link is not None and link.fan_in_fan_out
    assert tuple(link.lora_A.shape) == (4, 32) and tuple(link.lora_B.shape) == (96, 4)
    with torch.no_grad():
        link.lora_B.normal_()
    x = torch.randn(3, 5, 32)
    generic = torch.addmm(conv.bias, x.reshape(-1, 32), conv.weight).view(3, 5, 96)
    torch.testing.assert_close(conv(x), generic, rtol=1e-5, atol=1e-5)


def test_knots_on_conv1d_preserve_the_function_and_the_merged_export_loads_in_stock_gpt2(
    tmp_path: Path,
) -> None:
    from transformers import GPT2LMHeadModel

    model = _gpt2()
    opt = _chain(model, keep_history=True)
    _train(model, opt, range(3))  # steps 1-2, then the knot after step 3 ...
    assert opt.knots_tied == 1
    _train(model, opt, range(3, 5))  # ... and a pending link
    with torch.no_grad():
        trained = _logits(model)
        opt.tie_knot()
        torch.testing.assert_close(_logits(model), trained, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path / "merged")
    loaded, info = GPT2LMHeadModel.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(_logits(loaded.eval()), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["history", "base"])
def test_the_peft_adapter_of_a_gpt2_chain_reproduces_the_logits(
    tmp_path: Path, source: str
) -> None:
    from peft import PeftModel

    model = _gpt2()
    opt = _chain(model, keep_history=source == "history")
    _train(model, opt, range(5))
    expected = _logits(model)
    report = chainopt.export_peft_adapter(opt, tmp_path / "adapter",
                                          base=_gpt2() if source == "base" else None)  # fmt: skip
    assert report.relative_error < 1e-5
    peft_model = PeftModel.from_pretrained(_gpt2(), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(peft_model), expected, rtol=1e-4, atol=1e-4)


def test_a_gpt2_chain_resumes_bitwise(tmp_path: Path) -> None:
    straight = _gpt2()
    opt = _chain(straight)
    _train(straight, opt, range(8))

    model = _gpt2()
    first = _chain(model)
    _train(model, first, range(4))
    chainopt.save_checkpoint(tmp_path / "ckpt.pt", model, first)
    resumed = _gpt2()
    again = _chain(resumed)
    chainopt.load_checkpoint(tmp_path / "ckpt.pt", resumed, again)
    _train(resumed, again, range(4, 8))
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_all_linear_takes_every_conv1d_but_not_the_tied_output_layer() -> None:
    model = _gpt2()
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()),
                             target_modules="all-linear", rank=2, knot_every=3)  # fmt: skip
    assert len(opt.config.modules) == 8 and "lm_head" not in opt.config.modules


def test_a_spec_that_matches_nothing_lists_modules_that_could_be_adapted() -> None:
    model = _gpt2()
    with pytest.raises(ValueError, match=r"matches no module.*include \['transformer.h.0.attn"):
        _chain(model, target_modules=["q_proj"])
