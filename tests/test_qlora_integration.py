"""QLoRA chains in the setups people use: a Llama with bitsandbytes 4-bit linears, end to end.

The HF ``Trainer`` with bitsandbytes' 8-bit and paged optimizers, gradient checkpointing, a
``prepare_model_for_kbit_training`` setup, the merged model loaded by a stock dense
``LlamaForCausalLM``, and the chain as one PEFT adapter over the quantized and the float base.
Every knot must stay exact: each 4-bit weight is ``quantize(M)`` with ``M = M₀ + Σ sᵢ·Bᵢ·Aᵢ``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import chainopt
from chainopt import ChainLoRAOptimizer

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

# hidden 128 and rank 32: every factor has 4,096 elements, the size from which bitsandbytes'
# 8-bit optimizers keep 8-bit state (smaller tensors get 32-bit state).
CONFIG = LlamaConfig(
    vocab_size=128,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))
QV = ["q_proj", "v_proj"]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(params=["dequantize", "avx512bf16-repack"])
def bnb_cpu_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both code paths of bitsandbytes' CPU ``Linear4bit``, for the ``Linear4bit`` layers a test
    builds. On a CPU with AVX512-BF16 an eval-mode forward without gradients *repacks* the weight
    (another byte layout, un-nested bfloat16 ``absmax``) and runs a bfloat16 kernel; saving
    re-nests the statistics from those bfloat16 values, so a stock save/load of a model that ran
    in eval mode is not the model. Elsewhere (and in training mode) the layer dequantizes.
    ``"dequantize"`` forces the second path on any CPU (``Linear4bit`` reads ``has_avx512bf16``
    when it is built); ``"avx512bf16-repack"`` runs only where the CPU has the instructions."""
    import bitsandbytes.nn.modules as bnb_modules

    if request.param == "dequantize":
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    elif not bnbf.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks a 4-bit weight here")
    return str(request.param)


def _dense(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(CONFIG).to(dtype)


def _quantize(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Every decoder ``nn.Linear`` replaced by a CPU ``Linear4bit`` (NF4, double quant), in place:
    what ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))``
    builds."""
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or ".layers." not in f".{name}":
            continue
        q = bnb.nn.Linear4bit(module.in_features, module.out_features,
                              bias=module.bias is not None, compute_dtype=compute_dtype,
                              quant_type="nf4", compress_statistics=True)  # fmt: skip
        q.weight = bnb.nn.Params4bit(module.weight.detach().float().clone(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)  # fmt: skip
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to("cpu"))
    return model


def _quantized(seed: int = 0) -> nn.Module:
    return _quantize(_dense(seed))


def _deq(module: nn.Module) -> torch.Tensor:
    return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()


def _round_once(dense: torch.Tensor, like: nn.Module) -> torch.Tensor:
    """``deq(quantize(dense))`` as the layer stores it: the float32 dense quantized, dequantized
    to the layer's dtype."""
    qs = like.weight.quant_state
    nested = bool(getattr(qs, "original_nested", False) or qs.nested)
    q, state = bnbf.quantize_4bit(dense.float(), blocksize=qs.blocksize,
                                  compress_statistics=nested, quant_type=qs.quant_type)  # fmt: skip
    state.dtype = qs.dtype  # quantize(M) of the float32 master, dequantized as the layer does
    return bnbf.dequantize_4bit(q, state).float()


def _assert_knots_exact(opt: ChainLoRAOptimizer, starts: dict[str, torch.Tensor]) -> None:
    """Every 4-bit weight is quantize(M), M the start plus every merged link (keep_history)."""
    quantized = [r for r in opt.chain.records if r.quant is not None]
    assert quantized
    for r in quantized:
        links = opt.history.links(r.name)
        total = sum((lf.scale * lf.B.double() @ lf.A.double() for lf in links), torch.zeros(1))
        master = r.quant.master
        assert master is not None
        torch.testing.assert_close(master.double(), starts[r.name].double() + total,
                                   rtol=1e-6, atol=1e-6)  # fmt: skip
        assert torch.equal(_deq(r.module), _round_once(master, r.module)), r.name


def _starts(model: nn.Module, suffixes: list[str]) -> dict[str, torch.Tensor]:
    return {
        n: _deq(m).clone()
        for n, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit) and n.rsplit(".", 1)[-1] in suffixes
    }


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _chain(model: nn.Module, **kw: Any) -> ChainLoRAOptimizer:
    kw = {"target_modules": QV, "rank": 8, "alpha": 16, "knot_every": 3, "keep_history": True,
          **kw}  # fmt: skip
    return ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), **kw)


# --- the HF Trainer with bitsandbytes optimizers ---


class _Tokens(torch.utils.data.Dataset):  # type: ignore[type-arg]
    def __init__(self, n: int = 16) -> None:
        self.ids = torch.randint(0, 128, (n, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
def test_the_trainer_with_a_bitsandbytes_optimizer_trains_and_ties_exact_knots(
    optim: str, tmp_path: Path
) -> None:
    from transformers import Trainer, TrainingArguments

    from chainopt.integrations.transformers import ChainLoRACallback, create_chain_optimizer

    model = _quantized()
    starts = _starts(model, QV)
    before = _logits(model)
    args = TrainingArguments(output_dir=str(tmp_path), optim=optim, max_steps=7,
                             per_device_train_batch_size=2, learning_rate=1e-2,
                             save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True)  # fmt: skip
    opt = create_chain_optimizer(model, args, target_modules=QV, rank=32, alpha=64, knot_every=2,
                                 keep_history=True)  # fmt: skip
    assert type(opt.optimizer).__module__.startswith("bitsandbytes")
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(),
                      optimizers=(opt, None), callbacks=[ChainLoRACallback()])  # fmt: skip
    trainer.train()
    assert (opt.optimizer_steps, opt.knots_tied) == (7, 3)
    # the step after the last knot: fresh 8-bit state for the new links (bitsandbytes layout)
    states = [opt.optimizer.state[p] for p in opt.factors() if p in opt.optimizer.state]
    assert states and all(s["state1"].dtype == torch.uint8 for s in states)
    _assert_knots_exact(opt, starts)
    assert not torch.allclose(_logits(model), before)  # the chain trained


def test_the_trainer_trains_a_chain_over_a_from_pretrained_4bit_model(tmp_path: Path) -> None:
    """transformers' ``validate_quantization_for_training`` accepts a quantized model only as a
    PEFT model; a chain clears the model's ``is_quantized`` instance flag (it has trainable
    factors), while the quantizer and the saved config still say the model is 4-bit."""
    from transformers import Trainer, TrainingArguments

    from chainopt.integrations.transformers import create_chain_optimizer

    model = _from_pretrained_4bit(tmp_path)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model.is_quantized
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, learning_rate=1e-2,
                             per_device_train_batch_size=2, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True)  # fmt: skip
    opt = create_chain_optimizer(model, args, target_modules=QV, rank=4, knot_every=1)
    assert not model.is_quantized and model.hf_quantizer is not None
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None))
    trainer.train()
    assert opt.knots_tied == 2


def test_trainer_accepts_a_chained_from_pretrained_4bit_model(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    from chainopt.integrations.transformers import create_chain_optimizer

    model = _from_pretrained_4bit(tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, report_to="none",
                             use_cpu=True, disable_tqdm=True, save_strategy="no")  # fmt: skip
    opt = create_chain_optimizer(model, args, target_modules=QV, rank=4, knot_every=1)
    Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None))


# --- gradient checkpointing and a prepare_model_for_kbit_training setup ---


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_trains_a_4bit_chain_the_same(reentrant: bool) -> None:
    plain = _quantized()
    opt_plain = _chain(plain)
    losses_plain = _train(plain, opt_plain, 7)

    model = _quantized()
    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    if reentrant:  # reentrant checkpointing needs an input that requires grad (as PEFT does)
        model.enable_input_require_grads()
    model.train()
    opt = _chain(model)
    losses = _train(model, opt, 7)
    assert opt.knots_tied == 2
    assert losses == losses_plain
    for a, b in zip(opt_plain.factors(), opt.factors(), strict=True):
        assert torch.equal(a, b)
    _assert_knots_exact(opt, _starts(_quantized(), QV))


def test_a_prepare_model_for_kbit_training_setup_chains_with_exact_knots(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from transformers import BitsAndBytesConfig

    _dense(dtype=torch.bfloat16).save_pretrained(tmp_path / "base")
    model = LlamaForCausalLM.from_pretrained(
        tmp_path / "base", device_map="cpu", dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16),
    )  # fmt: skip
    assert model.model.norm.weight.dtype == torch.bfloat16
    # freezes everything, casts non-4-bit params (norms, embeddings) to float32, enables input
    # grads and (reentrant) gradient checkpointing
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    assert model.model.norm.weight.dtype == torch.float32 and model.is_gradient_checkpointing
    model.train()
    starts = _starts(model, QV)
    opt = _chain(model)
    link = opt.chain.records[0].link
    assert link.lora_A.dtype == torch.float32  # factors in float32 over a bf16-compute layer
    gen = torch.Generator().manual_seed(0)
    for step in range(7):
        ids = torch.randint(0, 128, (2, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        if step == 0:  # through the checkpointed layers, every link gets a gradient
            assert all(p.grad is not None and p.grad.abs().sum() > 0
                       for p in opt.factors() if p.shape[0] != 8)  # the B factors  # fmt: skip
        opt.step()
        opt.zero_grad()
    assert opt.knots_tied == 2
    _assert_knots_exact(opt, starts)


# --- exports ---


def _trained(targets: list[str] = QV, **kw: Any) -> tuple[nn.Module, ChainLoRAOptimizer]:
    model = _quantized()
    opt = _chain(model, target_modules=targets, **kw)
    _train(model, opt, 7)  # two knots and a pending link
    assert opt.knots_tied == 2
    return model, opt


def _quantization_gap() -> float:
    """max |logits| difference between the dense model and its own 4-bit version: the bound
    against which the merged model's distance from the 4-bit chain is measured."""
    return (_logits(_dense()) - _logits(_quantized())).abs().max().item()


def test_the_merged_model_of_an_all_linear_4bit_chain_loads_into_a_stock_dense_llama() -> None:
    model, opt = _trained(LINEARS)
    merged = chainopt.merged_state_dict(model)
    assert all(v.is_floating_point() for v in merged.values())
    plain = LlamaForCausalLM(CONFIG)
    assert set(merged) == set(plain.state_dict()) - {"lm_head.weight"} or set(merged) == set(
        plain.state_dict()
    )
    result = plain.load_state_dict(merged, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    plain.tie_weights()
    # The dense weights are the masters plus the pending links; the 4-bit forward uses
    # quantize(master), so the two differ by the quantization error and no more.
    gap = (_logits(plain) - _logits(model)).abs().max().item()
    assert gap <= 2 * _quantization_gap(), gap
    # exactly the masters: the dense weight of each module is its master plus the pending link
    for r in opt.chain.records:
        assert torch.equal(merged[f"{r.name}.weight"], r.quant.merged(r.link))  # type: ignore[union-attr]


def test_the_merged_model_of_a_qv_4bit_chain_is_dense() -> None:
    model, _ = _trained(QV)
    merged = chainopt.merged_state_dict(model)
    assert all(v.is_floating_point() for v in merged.values())
    LlamaForCausalLM(CONFIG).load_state_dict(merged, strict=False)


def test_the_peft_adapter_against_the_quantized_base_serves_the_chain(
    tmp_path: Path, bnb_cpu_path: str
) -> None:
    peft = pytest.importorskip("peft")
    base = _quantized()
    model = copy.deepcopy(base)  # the quantized model before chaining stays as the base
    opt = _chain(model)
    _train(model, opt, 7)
    report = chainopt.export_peft_adapter(opt, tmp_path / "adapter", base=base)
    assert report.rank == 3 * 8 and report.relative_error < 1e-5
    dense = _dense_of(model)
    served = peft.PeftModel.from_pretrained(_quantized(), tmp_path / "adapter")
    assert not served.training  # eval mode: where the CPU has AVX512-BF16, bitsandbytes repacks
    assert isinstance(served.base_model.model.model.layers[0].self_attn.q_proj.base_layer,
                      bnb.nn.Linear4bit)  # fmt: skip
    # What the adapter controls, on every CPU: each adapted layer adds exactly the chain's
    # update (master + pending link - deq(W0)) to whatever the 4-bit base layer computes.
    merged = chainopt.merged_state_dict(model)
    x = torch.randn(5, CONFIG.hidden_size, generator=torch.Generator().manual_seed(1))
    for name in _starts(base, QV):
        layer = served.base_model.model.get_submodule(name)
        update = merged[f"{name}.weight"] - _deq(base.get_submodule(name))
        with torch.no_grad():
            added = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(added, x @ update.T, rtol=1e-5, atol=1e-5)
    # Where bitsandbytes dequantizes, PEFT computes deq(W0)x + (sum s_i B_i A_i)x: the masters'
    # function, which the dense model computes too. (The repacked bf16 kernel rounds the base.)
    if bnb_cpu_path == "dequantize":
        torch.testing.assert_close(_logits(served), _logits(dense), rtol=1e-4, atol=1e-4)
    # ... which the chained 4-bit model (quantize(M), rounded once) matches to its quantization
    gap = (_logits(dense) - _logits(model)).abs().max().item()
    assert gap <= 2 * _quantization_gap(), gap
    # before any knot the chained model is deq(W0) + the link: the same function as PEFT's,
    # through the same bitsandbytes kernel (both in eval mode, as PEFT serves)
    fresh = copy.deepcopy(base)
    opt2 = _chain(fresh, knot_every=100)
    _train(fresh, opt2, 2)
    chainopt.export_peft_adapter(opt2, tmp_path / "adapter2", base=base)
    served2 = peft.PeftModel.from_pretrained(_quantized(), tmp_path / "adapter2")
    fresh.eval()
    torch.testing.assert_close(_logits(served2), _logits(fresh), rtol=1e-5, atol=1e-5)


def test_the_peft_adapter_against_the_float_base_with_master_weights(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    original = _dense()
    model = _quantized()
    starts = {n: original.get_submodule(n).weight.detach().clone() for n in _starts(model, QV)}
    opt = _chain(model, master_weights=original)
    _train(model, opt, 7)
    _assert_knots_exact(opt, starts)  # M₀ = the float weights: the 4-bit weight is quantize(M)
    report = chainopt.export_peft_adapter(opt, tmp_path / "adapter", base=original)
    assert report.rank == 3 * 8 and report.relative_error < 1e-5
    served = peft.PeftModel.from_pretrained(_dense(), tmp_path / "adapter")
    # the float base + the chain: exactly the dense merged model, q/v from the masters
    expected = _dense()
    merged = chainopt.merged_state_dict(model)
    expected.load_state_dict({k: v for k, v in merged.items() if k.endswith(tuple(
        f"{s}.weight" for s in QV))}, strict=False)  # fmt: skip
    torch.testing.assert_close(_logits(served), _logits(expected), rtol=1e-4, atol=1e-4)


def _dense_of(model: nn.Module) -> nn.Module:
    """A dense Llama computing what the chain's masters compute: adapted layers from
    ``merged_state_dict`` (master + pending link), the others dequantized."""
    dense = _dense()
    state = {}
    merged = chainopt.merged_state_dict(model)
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            key = f"{name}.weight"
            state[key] = merged[key] if merged[key].is_floating_point() else _deq(module)
    dense.load_state_dict(state, strict=False)
    return dense


def _from_pretrained_4bit(tmp_path: Path) -> nn.Module:
    from transformers import BitsAndBytesConfig

    _dense().save_pretrained(tmp_path / "base")
    return LlamaForCausalLM.from_pretrained(
        tmp_path / "base", device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.float32),
    )  # fmt: skip


def test_save_pretrained_of_a_chained_4bit_model_reloads_the_fine_tuned_model(
    tmp_path: Path, bnb_cpu_path: str
) -> None:
    from safetensors.torch import load_file

    model = _from_pretrained_4bit(tmp_path)
    assert not model.training  # from_pretrained: eval mode, the forward bitsandbytes may repack
    opt = _chain(model)
    _train(model, opt, 7)  # two knots and a pending link
    merged = copy.deepcopy(model)
    chainopt.merge_and_unload(merged)  # the fine-tuned model in 4-bit, from the masters
    # a stock save of the same, unchained model (before any forward of it: once an eval forward
    # has repacked a layer, bitsandbytes' save re-nests its statistics from bfloat16 values)
    merged.save_pretrained(tmp_path / "stock")
    before = _logits(merged)
    model.save_pretrained(tmp_path / "saved")
    loaded, info = LlamaForCausalLM.from_pretrained(
        tmp_path / "saved", device_map="cpu", output_loading_info=True
    )
    assert not info["unexpected_keys"] and not info["missing_keys"]
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    # what chainopt writes: each adapted layer quantize(master + pending link), rounded once,
    # with the quantization state quantize_4bit gives it (double-quantized, as loaded)
    for r in opt.chain.records:
        q, state = bnbf.quantize_4bit(r.quant.merged(r.link), blocksize=64,  # type: ignore[union-attr]
                                      compress_statistics=True, quant_type="nf4")  # fmt: skip
        assert torch.equal(saved[f"{r.name}.weight"], q), r.name
        for k, v in state.as_dict(packed=True).items():
            assert torch.equal(saved[f"{r.name}.weight.{k}"], v), (r.name, k)
    # the whole file is what a stock save of the unchained, merged model writes, bit for bit
    stock = load_file(tmp_path / "stock" / "model.safetensors")
    assert set(saved) == set(stock)
    assert all(torch.equal(saved[k], stock[k]) for k in stock)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "stock", device_map="cpu")
    assert torch.equal(_logits(loaded), _logits(reloaded))
    if bnb_cpu_path == "dequantize":  # no repacking: a round trip is lossless, in memory too
        assert torch.equal(_logits(loaded), before)


def test_a_qv_chain_over_a_fully_4bit_model_resumes_from_a_checkpoint(tmp_path: Path) -> None:
    model = _quantized()
    opt = _chain(model)
    _train(model, opt, 4)
    chainopt.save_checkpoint(tmp_path / "ckpt.pt", model, opt)
    again = _quantized()
    again_opt = _chain(again)
    chainopt.load_checkpoint(tmp_path / "ckpt.pt", again, again_opt)
    _train(model, opt, 3, seed=1)
    _train(again, again_opt, 3, seed=1)
    mine, theirs = again.state_dict(), model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


# --- a knot context, as an experiment registers one ---


def test_register_knot_context_returns_a_handle() -> None:
    model = _quantized()
    opt = _chain(model)
    entered: list[int] = []

    class Probe:
        def __call__(self, chain: Any) -> Any:
            import contextlib

            entered.append(len(chain.records))
            return contextlib.nullcontext()

    with warnings.catch_warnings():
        handle = opt.register_knot_context(Probe())
    opt.tie_knot()
    assert entered == [4]
    handle.remove()
