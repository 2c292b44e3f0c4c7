"""Loads into a live 4-bit chain keep each host master and its 4-bit weight consistent.

A chain over 4-bit weights keeps a float32 master per adapted layer (:mod:`chainopt.quantized`);
a knot writes ``quantize(master)``. A load that replaces the 4-bit weight (a merged checkpoint,
as ``load_best_model_at_end`` and any reload into a live chain do) must leave the master on the
loaded weight and the link at zero, or the next knot writes the old weights back. Every backend:
bitsandbytes NF4 and FP4 (double quantization on and off) and torchao NF4.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import chainopt
from chainopt import ChainLoRAOptimizer

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

X = torch.randn(6, 256, generator=torch.Generator().manual_seed(3))


def _bnb(quant_type: str, nested: bool) -> Callable[[nn.Linear], nn.Module]:
    def make(linear: nn.Linear) -> nn.Module:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=True,
                                  compute_dtype=torch.float32, quant_type=quant_type,
                                  compress_statistics=nested)  # fmt: skip
        weight = linear.weight.detach().clone()
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=quant_type,
                                         compress_statistics=nested)  # fmt: skip
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer.to("cpu")

    return make


def _torchao(linear: nn.Linear) -> nn.Module:
    nf4 = pytest.importorskip("torchao.quantization").to_nf4
    layer = nn.Linear(256, 256)
    layer.weight = nn.Parameter(nf4(linear.weight.detach().clone()), requires_grad=False)
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


BACKENDS = {
    "bnb-nf4-nested": _bnb("nf4", True),
    "bnb-nf4": _bnb("nf4", False),
    "bnb-fp4-nested": _bnb("fp4", True),
    "torchao-nf4": _torchao,
}


def _model(make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(make(nn.Linear(256, 256)), nn.Tanh(), make(nn.Linear(256, 256)),
                         nn.Tanh(), nn.Linear(256, 4))  # fmt: skip


def _chain(model: nn.Module, **kw: Any) -> ChainLoRAOptimizer:
    kw = {"target_modules": ["0", "2"], "rank": 4, "alpha": 8, "knot_every": 3, "seed": 1, **kw}
    return ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=3e-2), **kw)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    gen = torch.Generator().manual_seed(5)
    for _ in range(steps):
        x = torch.randn(8, 256, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def _rounded(layer: nn.Module, dense: torch.Tensor) -> torch.Tensor:
    """``deq(quantize(dense))`` as the layer would store it."""
    from chainopt._quant_backends import backend_for

    backend = backend_for(layer)
    assert backend is not None
    return backend.rounded(layer, dense)


def _weight(layer: nn.Module) -> torch.Tensor:
    from chainopt._quant_backends import backend_for

    backend = backend_for(layer)
    assert backend is not None
    return backend.dequantize(layer)


def _assert_consistent(opt: ChainLoRAOptimizer) -> None:
    """Every 4-bit weight is what its master rounds to, or (a master restarted from a loaded
    weight, as at construction) the master is the weight dequantized."""
    for r in opt.chain.records:
        assert r.quant is not None and r.quant.master is not None
        weight, master = _weight(r.module), r.quant.master
        assert torch.equal(weight, master) or torch.equal(weight, _rounded(r.module, master)), (
            r.name
        )


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("strict", [True, False])
def test_a_merged_4bit_checkpoint_loaded_into_a_live_chain_moves_the_masters(
    backend: str, strict: bool
) -> None:
    make = BACKENDS[backend]
    model = _model(make)
    opt = _chain(model)
    _train(model, opt, 4)  # a knot, then a pending link
    # what save_pretrained writes, and load_best_model_at_end loads back
    checkpoint = chainopt.merged_state_dict(model, keep_quantized=True)
    best = copy.deepcopy(model)
    chainopt.merge_and_unload(best)  # the checkpoint's model, as stock layers
    expected = _out(best)
    _train(model, opt, 4)  # another knot: the live chain moves on
    assert not torch.allclose(_out(model), expected)

    model.load_state_dict(checkpoint, strict=strict)
    assert torch.equal(_out(model), expected)  # the link restarted at zero
    loaded = {}
    for r in opt.chain.records:
        assert not r.link.lora_B.any()
        loaded[r.name] = _weight(r.module)
        assert torch.equal(r.quant.master, loaded[r.name])  # type: ignore[union-attr]
    opt.tie_knot()  # a knot of the zero link rounds the loaded weight once, not the old master
    for r in opt.chain.records:
        assert torch.equal(_weight(r.module), _rounded(r.module, loaded[r.name])), r.name
    # (with double-quantized statistics quantize(deq(W)) is not bitwise W, as at the first knot
    # after construction: 4e-4 at most here, against the 0.01-0.1 the live chain had moved)
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=1e-3)
    _assert_consistent(opt)
    _train(model, opt, 3)  # and training goes on from there, exact knots
    _assert_consistent(opt)


@pytest.mark.parametrize("backend", ["bnb-nf4-nested", "bnb-fp4-nested", "bnb-nf4"])
def test_a_merged_checkpoint_loads_into_layers_bitsandbytes_repacked(backend: str) -> None:
    """On a CPU with AVX512-BF16 an eval forward repacks each ``Linear4bit`` (another layout,
    bfloat16 statistics); a load into such a chain still leaves each master on the loaded
    weight and the model computing the checkpoint's model (through the same kernel)."""
    if not bnbf.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks a 4-bit weight")
    model = _model(BACKENDS[backend])
    opt = _chain(model)
    _train(model, opt, 4)
    checkpoint = chainopt.merged_state_dict(model, keep_quantized=True)
    best = copy.deepcopy(model)
    chainopt.merge_and_unload(best)
    expected = _out(best.eval())
    _train(model, opt, 4)
    _out(model.eval())
    assert getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)
    model.load_state_dict(checkpoint)
    for r in opt.chain.records:
        assert torch.equal(r.quant.master, _weight(r.module))  # type: ignore[union-attr]
    assert torch.equal(_out(model), expected)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_reloading_the_chain_own_state_keeps_the_masters(backend: str) -> None:
    """A load that writes back the weight the master rounds to changes no master."""
    model = _model(BACKENDS[backend])
    opt = _chain(model)
    _train(model, opt, 4)
    masters = {r.name: r.quant.master.clone() for r in opt.chain.records}  # type: ignore[union-attr]
    model.load_state_dict(model.state_dict())
    for r in opt.chain.records:
        assert torch.equal(r.quant.master, masters[r.name])  # type: ignore[union-attr]


@pytest.mark.parametrize("backend", ["bnb-nf4-nested", "torchao-nf4"])
def test_load_checkpoint_with_the_optimizer_keeps_the_saved_masters(
    backend: str, tmp_path: Any
) -> None:
    """``load_checkpoint`` loads the optimizer (masters) before the model: the model's load
    must not replace the masters it came with, even where they are not what the weight rounds
    from (a float ``master_weights=`` start)."""
    make = BACKENDS[backend]
    torch.manual_seed(0)
    floats = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256))
    model = _model(make)
    opt = _chain(model, master_weights=floats)
    _train(model, opt, 2)  # before the first knot: masters are the float weights
    chainopt.save_checkpoint(tmp_path / "c.pt", model, opt)
    again = _model(make)
    again_opt = _chain(again, master_weights=floats)
    chainopt.load_checkpoint(tmp_path / "c.pt", again, again_opt)
    for a, b in zip(opt.chain.records, again_opt.chain.records, strict=True):
        assert torch.equal(a.quant.master, b.quant.master)  # type: ignore[union-attr]
    _train(model, opt, 3)
    _train(again, again_opt, 3)
    torch.testing.assert_close(_out(again), _out(model), rtol=0, atol=0)


def test_masters_restored_with_an_optimizer_state_are_kept_only_until_the_next_step() -> None:
    """``load_state_dict`` of the optimizer marks its masters as the saved ones for the model
    load that completes the pair; after a step, a model load of other weights moves them."""
    make = BACKENDS["bnb-nf4-nested"]
    model = _model(make)
    opt = _chain(model)
    _train(model, opt, 4)
    other = chainopt.merged_state_dict(model, keep_quantized=True)
    state = copy.deepcopy(opt.state_dict())
    _train(model, opt, 3)  # a knot: the weights move on
    opt.load_state_dict(state)
    _train(model, opt, 1)  # no knot, but a step since the restore
    model.load_state_dict(other)
    for r in opt.chain.records:
        assert torch.equal(r.quant.master, _weight(r.module))  # type: ignore[union-attr]


# --- the HF Trainer: resume_from_checkpoint and load_best_model_at_end of a 4-bit chain ---


class _Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 24) -> None:
        self.ids = torch.randint(0, 64, (n, 10), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _llama_4bit(folder: Any) -> nn.Module:
    """A tiny Llama as ``from_pretrained`` loads it in 4-bit (NF4, double quantization)."""
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
        LlamaForCausalLM(cfg).save_pretrained(folder)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    return LlamaForCausalLM.from_pretrained(folder, device_map="cpu",
                                            quantization_config=quantization)  # fmt: skip


def _trainer(
    model: nn.Module, out: Any, trainer_kw: dict[str, Any] | None = None, **kw: Any
) -> tuple[ChainLoRAOptimizer, Any]:
    from transformers import Trainer, TrainingArguments

    from chainopt.integrations.transformers import ChainLoRACallback

    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=3e-2),
                             target_modules=["q_proj", "v_proj"], rank=4, alpha=8,
                             knot_every=3, seed=5)  # fmt: skip
    kw = {"max_steps": 6, "save_strategy": "steps", "save_steps": 4, **kw}
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, seed=1,
                             report_to="none", use_cpu=True, disable_tqdm=True, **kw)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None),
                      callbacks=[ChainLoRACallback()], **(trainer_kw or {}))  # fmt: skip
    return opt, trainer


def _assert_same_chain(a: ChainLoRAOptimizer, b: ChainLoRAOptimizer) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    for ra, rb in zip(a.chain.records, b.chain.records, strict=True):
        assert torch.equal(ra.quant.master, rb.quant.master), ra.name  # type: ignore[union-attr]
    oa, ob = a.state_dict(), b.state_dict()
    for i, state in oa["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][i][key])), key
    assert (a.optimizer_steps, a.knots_tied) == (b.optimizer_steps, b.knots_tied)
    assert torch.equal(oa["chainopt"]["generator"], ob["chainopt"]["generator"])


def test_trainer_resume_of_a_4bit_chain_mid_link_is_bitwise(tmp_path: Any) -> None:
    pytest.importorskip("transformers")
    opt, trainer = _trainer(_llama_4bit(tmp_path / "base"), tmp_path / "straight")
    trainer.train()
    assert (opt.optimizer_steps, opt.knots_tied) == (6, 2)
    checkpoint = tmp_path / "straight" / "checkpoint-4"  # one knot tied, a link pending
    resumed, trainer2 = _trainer(_llama_4bit(tmp_path / "base"), tmp_path / "resumed")
    trainer2.train(resume_from_checkpoint=str(checkpoint))
    _assert_same_chain(opt, resumed)


def _llama_quantized_by_hand() -> nn.Module:
    """A tiny Llama whose decoder Linears a user replaced by ``Linear4bit`` (no HF quantizer:
    ``save_pretrained`` writes the merged model dense)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4))  # fmt: skip
    make = _bnb("nf4", True)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and ".layers." in f".{name}":
            lin = nn.Linear(module.in_features, module.out_features)
            lin.weight = module.weight
            layer = make(lin)
            layer.bias = None
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return model


def test_trainer_resume_of_a_chain_over_layers_quantized_by_hand_is_bitwise(
    tmp_path: Any,
) -> None:
    """Its checkpoints hold the merged model dense; loading one quantizes each dense weight once
    into its 4-bit layer (an adapted layer's master becomes the dense weight), and the
    optimizer state puts every 4-bit weight back exactly."""
    pytest.importorskip("transformers")
    opt, trainer = _trainer(_llama_quantized_by_hand(), tmp_path / "straight")
    trainer.train()
    checkpoint = tmp_path / "straight" / "checkpoint-4"
    resumed, trainer2 = _trainer(_llama_quantized_by_hand(), tmp_path / "resumed")
    trainer2.train(resume_from_checkpoint=str(checkpoint))
    _assert_same_chain(opt, resumed)


def test_a_dense_merged_checkpoint_loads_into_a_4bit_chain_as_its_master() -> None:
    """A dense ``(out, in)`` float weight for a 4-bit layer is quantized once into it; an
    adapted layer's master becomes that dense weight, exactly, and the link restarts at zero."""
    model = _model(BACKENDS["bnb-nf4-nested"])
    opt = _chain(model)
    _train(model, opt, 4)
    dense = chainopt.merged_state_dict(model)  # masters + links, dense float
    _train(model, opt, 4)
    model.load_state_dict(dense)
    for r in opt.chain.records:
        assert r.quant is not None and r.quant.master is not None
        assert torch.equal(r.quant.master, dense[f"{r.name}.weight"])
        assert torch.equal(_weight(r.module), _rounded(r.module, dense[f"{r.name}.weight"]))
        assert not r.link.lora_B.any()
    bad = {k: v.clone() for k, v in dense.items()}
    bad["0.weight"][0, 0] = float("nan")
    before = {r.name: r.quant.master.clone() for r in opt.chain.records}  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="NaN"):
        model.load_state_dict(bad)
    for r in opt.chain.records:
        assert torch.equal(r.quant.master, before[r.name])  # type: ignore[union-attr]


@pytest.mark.parametrize("save_only_model", [False, True])
def test_trainer_load_best_model_at_end_of_a_4bit_chain(
    tmp_path: Any, save_only_model: bool
) -> None:
    """The best checkpoint's optimizer state brings the chain back (masters, links, 4-bit
    weights, counters); without it (``save_only_model=True``) the callback warns, the links
    restart at zero and each master follows its loaded 4-bit weight."""
    from chainopt import ChainLoRAWarning

    trainer: Any = None

    def first(_: Any) -> dict[str, float]:  # makes checkpoint-2 the best one
        return {"first": float(trainer.state.global_step == 2)}

    opt, trainer = _trainer(_llama_4bit(tmp_path / "base"), tmp_path / "out",
                            {"eval_dataset": _Tokens(4), "compute_metrics": first}, save_steps=2,
                            eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                            metric_for_best_model="first", greater_is_better=True,
                            save_only_model=save_only_model)  # fmt: skip
    best = tmp_path / "out" / "checkpoint-2"
    if save_only_model:
        with pytest.warns(ChainLoRAWarning, match="holds no optimizer.pt"):
            trainer.train()
        assert opt.optimizer_steps == 6
        for r in opt.chain.records:
            assert not r.link.lora_B.any()
            assert r.quant is not None and r.quant.master is not None
            assert torch.equal(r.quant.master, _weight(r.module))
        return
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint) == best
    saved = torch.load(best / "optimizer.pt", weights_only=True)["chainopt"]
    assert (opt.optimizer_steps, opt.knots_tied) == (2, 0)
    state = opt.model.state_dict()
    for r in opt.chain.records:  # the pending link and the 4-bit weight it sits on
        assert {f"{r.name}.chainopt_link.lora_B", f"{r.name}.weight"} <= set(saved["model"])
    for key, value in saved["model"].items():
        assert torch.equal(state[key], value), key
    for r in opt.chain.records:
        assert torch.equal(r.quant.master, saved["masters"][r.name])  # type: ignore[union-attr]


@pytest.mark.parametrize("case", ["meta weight", "meta absmax", "bytes", "nf4 shape"])
def test_a_4bit_weight_that_cannot_be_the_layer_weight_is_refused_before_anything_loads(
    case: str,
) -> None:
    backend = "torchao-nf4" if case == "nf4 shape" else "bnb-nf4-nested"
    model = _model(BACKENDS[backend])
    opt = _chain(model)
    _train(model, opt, 4)
    state = {k: v.clone() if type(v) is torch.Tensor else v for k, v in model.state_dict().items()}
    if case == "meta weight":
        state["2.weight"] = torch.empty_like(state["2.weight"], device="meta")
    elif case == "meta absmax":
        state["2.weight.absmax"] = torch.empty_like(state["2.weight.absmax"], device="meta")
    elif case == "bytes":  # the packed weight of a (128, 256) layer
        state["2.weight"] = state["2.weight"][: state["2.weight"].shape[0] // 2]
    else:
        from torchao.quantization import to_nf4

        state["2.weight"] = to_nf4(torch.randn(128, 256))
    state["4.weight"] = state["4.weight"] + 1  # a plain tensor the load would change
    before = {k: v.clone() for k, v in model.state_dict().items() if type(v) is torch.Tensor}
    masters = [r.quant.master.clone() for r in opt.chain.records]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"'2\.weight"):
        model.load_state_dict(state)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    for r, m in zip(opt.chain.records, masters, strict=True):
        assert torch.equal(r.quant.master, m)  # type: ignore[union-attr]
