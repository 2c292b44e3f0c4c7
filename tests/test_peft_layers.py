"""Chaining PEFT's own LoRA layers: a PeftModel (or injected layers) given with no target_modules.

Real peft throughout: Linear (dropout, rsLoRA, rank/alpha patterns), Embedding, Conv2d,
``target_parameters`` experts of a transformers-5 MoE, DoRA; knots keep the function and merge
each link's delta into the base layer exactly; the user's own ``save_pretrained`` writes the whole
chain; the paths where PEFT would leave a chain untrained raise.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from models import snapshot, tiny_llama, tiny_qwen2_moe
from torch import nn

from chainopt import ChainLoRAOptimizer

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4], [8, 6, 2, 14, 3, 9, 1, 5]])


def _peft_llama(**config: Any) -> nn.Module:
    kwargs: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    kwargs.update(config)
    return get_peft_model(tiny_llama(), LoraConfig(**kwargs))


def _lora_layers(model: nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _train(model: nn.Module, opt: ChainLoRAOptimizer, steps: int) -> None:
    model.train()
    for _ in range(steps):
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _randomize_links(model: nn.Module) -> None:
    with torch.no_grad():
        for layer in _lora_layers(model).values():
            for factors in (layer.lora_B, layer.lora_embedding_B, layer.lora_A):
                for p in factors.parameters() if isinstance(factors, nn.Module) else []:
                    p.normal_(0, 0.3)


# --- construction: the active adapter's layers, PEFT's own factors and init ---


def test_a_peft_model_without_target_modules_chains_the_active_adapters_layers() -> None:
    model = _peft_llama(
        lora_dropout=0.1, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3}
    )
    layers = _lora_layers(model)
    a_before = {n: m.lora_A["default"].weight.detach().clone() for n, m in layers.items()}
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=3)
    assert [n for n, _ in opt.adapted_modules()] == list(layers)
    factors = {id(p) for g in opt.param_groups for p in g["params"]}
    for m in layers.values():  # PEFT's own factors are what the optimizer trains
        assert {id(m.lora_A["default"].weight), id(m.lora_B["default"].weight)} <= factors
    assert len(factors) == 2 * len(layers)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    for n, m in layers.items():  # the first link keeps PEFT's own init
        assert torch.equal(m.lora_A["default"].weight, a_before[n])
    v = next(m for n, m in layers.items() if n.endswith("v_proj"))
    assert v.r["default"] == 2 and v.scaling["default"] == pytest.approx(3 / 2**0.5)


def test_a_knot_merges_each_peft_link_exactly_and_restarts_it() -> None:
    model = _peft_llama(lora_dropout=0.1, use_rslora=True, rank_pattern={"q_proj": 2})
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=100, seed=3
    )
    _train(model, opt, 2)
    assert opt.state  # the factors have optimizer state
    layers = _lora_layers(model)
    weights = {n: m.base_layer.weight for n, m in layers.items()}
    expected = {}
    for n, m in layers.items():  # W + s·B·A, one float32 sum
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        expected[n] = torch.addmm(m.base_layer.weight, b, a, alpha=m.scaling["default"])
        torch.testing.assert_close(
            expected[n], m.base_layer.weight + m.get_delta_weight("default"), rtol=0, atol=1e-6
        )
    a_before = {n: m.lora_A["default"].weight.detach().clone() for n, m in layers.items()}
    before = _logits(model)
    opt.tie_knot()
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    for n, m in layers.items():
        assert m.base_layer.weight is weights[n]  # Parameter identity kept
        assert torch.equal(m.base_layer.weight, expected[n])
        assert not m.lora_B["default"].weight.any()
        assert not torch.equal(m.lora_A["default"].weight, a_before[n])  # chainopt's init=
        assert m.lora_A["default"].weight.shape == a_before[n].shape  # PEFT's rank kept
    assert not any(opt.state[p] for p in opt.factors())  # reset="full"
    assert opt.knots_tied == 1


@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    rank=st.integers(1, 6),
    alpha=st.sampled_from([1.0, 3.0, 16.0]),
    rslora=st.booleans(),
    bias=st.booleans(),
)
def test_a_knot_on_a_peft_linear_keeps_the_function(
    shape: tuple[int, int], rank: int, alpha: float, rslora: bool, bias: bool
) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(shape[0], shape[1], bias=bias), nn.Tanh())
    model = get_peft_model(
        net, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], use_rslora=rslora)
    )
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=10)
    _randomize_links(model)
    x = torch.randn(5, shape[0])
    with torch.no_grad():
        before = model(x)
    opt.tie_knot()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


# --- the user's own save, resume ---


def test_the_users_own_save_pretrained_writes_the_whole_chain(tmp_path: Path) -> None:
    model = _peft_llama(lora_dropout=0.1, use_rslora=True, rank_pattern={"v_proj": 2})
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2, seed=1
    )
    _train(model, opt, 5)  # 2 knots, a third link under way
    assert opt.knots_tied == 2
    trained = _logits(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # 3 links of rank 4 (q_proj) or 2 (v_proj, zero-padded); PEFT's scale is 1: folded into B
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (12, 12, False)
    assert config["rank_pattern"] == {} and config["lora_dropout"] == 0.1
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model), trained, rtol=0, atol=0)  # the save changed nothing


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
@pytest.mark.parametrize("embedding_layers", ["auto", False])
def test_a_save_that_writes_a_chained_embedding_base_does_not_add_its_merged_links_twice(
    tmp_path: Path, target: str, embedding_layers: Any
) -> None:
    """PEFT's save writes the base weight of a targeted ``embed_tokens``/``lm_head`` beside the
    adapter (``save_embedding_layers="auto"``), and ``from_pretrained`` loads it over the
    base's: after a knot that weight holds the merged links, which the whole-chain adapter added
    a second time (logits 0.099 off for ``embed_tokens``, 0.27 for ``lm_head``;
    ``scripts/probe_peft_paths.py``). Such a layer saves the link under way; without the base
    weight (``False``) the whole chain."""
    model = _peft_llama(target_modules=["q_proj", target])
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 5)  # 2 knots, a third link under way
    trained = _logits(model)
    model.save_pretrained(tmp_path, save_embedding_layers=embedding_layers)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    base_key = next((k for k in saved if k.endswith(f"{target}.base_layer.weight")), None)
    assert (base_key is not None) == (embedding_layers == "auto")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), trained, rtol=1e-5, atol=1e-5)
    if embedding_layers == "auto":  # export_peft_adapter is that save: its report says so
        from chainopt import export_peft_adapter

        ranks = export_peft_adapter(opt, tmp_path / "export").chain_ranks
        assert {n.rpartition(".")[2]: r for n, r in ranks.items()} == {target: 4, "q_proj": 12}


def test_a_chained_peft_model_resumes_bitwise(tmp_path: Path) -> None:
    def build() -> tuple[nn.Module, ChainLoRAOptimizer]:
        model = _peft_llama(use_rslora=True, rank_pattern={"v_proj": 2})
        opt = ChainLoRAOptimizer(
            model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2, seed=1
        )
        return model, opt

    model, opt = build()
    _train(model, opt, 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, 3)
    model2, opt2 = build()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, 3)
    assert opt2.knots_tied == opt.knots_tied == 3
    for k, v in snapshot(model).items():
        assert torch.equal(model2.state_dict()[k], v), k


# --- refusals that name PEFT ---


def test_target_modules_on_a_peft_model_is_refused_naming_peft() -> None:
    model = _peft_llama()
    before = snapshot(model)
    for spec in (["q_proj"], "all-linear"):
        with pytest.raises(ValueError, match=r"PEFT.*omit target_modules"):
            ChainLoRAOptimizer(
                model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=spec,
                knot_every=2,
            )  # fmt: skip
    after = snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in after)


def test_a_plain_model_without_target_modules_is_refused() -> None:
    model = tiny_llama()
    with pytest.raises((TypeError, ValueError), match="target_modules"):
        ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=2)


def test_rank_and_alpha_come_from_peft() -> None:
    model = _peft_llama()
    with pytest.raises(ValueError, match=r"rank.*LoraConfig"):
        ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), rank=2, knot_every=2)


def test_trainable_modules_on_a_peft_model_is_refused_naming_modules_to_save() -> None:
    """The chain trained ``trainable_modules=["lm_head"]`` of a PeftModel, but PEFT's
    ``save_pretrained`` writes the adapter and the ``LoraConfig``'s ``modules_to_save`` only: the
    reloaded adapter silently lacked the trained head (logits 1.30 away;
    ``scripts/probe_peft_paths.py``). Refused, pointing to ``modules_to_save`` (which trains and
    saves: ``test_peft_modules_to_save_train_as_they_are_and_save_with_the_chain``)."""
    model = _peft_llama()
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"trainable_modules=\['lm_head'\].*modules_to_save"):
        ChainLoRAOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=2,
            trainable_modules=["lm_head"],
        )  # fmt: skip
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = snapshot(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any("chainopt" in k for m in model.modules() for k in vars(m))


@pytest.mark.parametrize("inner", ["base_model", "get_base_model"])
def test_a_chain_of_the_model_inside_a_peft_model_warns_that_no_save_writes_it(
    tmp_path: Path, inner: str
) -> None:
    """Chaining ``peft_model.base_model`` or ``peft_model.get_base_model()`` trains the same
    layers, but the whole-chain save goes on the model chained, and the ``PeftModel``'s own
    ``save_pretrained``, which chainopt cannot reach, writes the link under way only: reloaded
    on the original base, 0.42 off the trained logits (``scripts/probe_peft_paths.py``),
    silently. It warns at construction now; the ``PeftModel`` itself chains without it."""
    import warnings

    from chainopt import ChainLoRAWarning

    model = _peft_llama()
    chained = model.base_model if inner == "base_model" else model.get_base_model()
    with pytest.warns(ChainLoRAWarning, match=r"no adapter save.*Chain the PeftModel itself"):
        opt = ChainLoRAOptimizer(
            chained, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2
        )
    _train(model, opt, 3)
    model.save_pretrained(tmp_path)  # PEFT's own save: the link under way, as the warning says
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert not torch.allclose(_logits(reloaded), _logits(model), atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChainLoRAWarning)
        outer = _peft_llama()
        ChainLoRAOptimizer(outer, torch.optim.AdamW(outer.parameters(), lr=1e-2), knot_every=2)


def test_a_chain_that_peft_froze_raises_at_the_knot_naming_peft_config() -> None:
    # What SFTTrainer(model, peft_config=..., optimizers=(chain, None)) does: get_peft_model over
    # a chained model freezes every chain factor.
    model = tiny_llama()
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules=["q_proj"],
        knot_every=2,
    )  # fmt: skip
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["v_proj"]))
    assert not any(p.requires_grad for p in opt.factors())
    with pytest.raises(RuntimeError, match="peft_config"):
        _train(wrapped, opt, 2)


def test_freezing_some_factors_on_purpose_is_not_refused() -> None:
    """LoRA-FA freezes every A and trains B: the chain trains, so it knots."""
    model = _peft_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    for layer in _lora_layers(model).values():
        layer.lora_A["default"].weight.requires_grad_(False)
    _train(model, opt, 4)
    assert opt.knots_tied == 2


def test_a_chain_whose_factors_get_no_gradient_raises_at_the_knot() -> None:
    model = _peft_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    weights = {n: m.base_layer.weight.detach().clone() for n, m in _lora_layers(model).items()}
    with pytest.raises(RuntimeError, match="no factor of the chain received a gradient"):
        for _ in range(2):  # a loop that never calls backward on the chained model
            opt.step()
            opt.zero_grad()
    for n, m in _lora_layers(model).items():
        assert torch.equal(m.base_layer.weight, weights[n])


def test_target_modules_accepts_a_set() -> None:
    model = tiny_llama()
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules={"q_proj", "v_proj"},
        knot_every=2,
    )  # fmt: skip
    assert len(opt.adapted_modules()) == 4


# --- other layer kinds ---


class _EmbConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv2d(6, 5, kernel_size=3, padding=1)
        self.head = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (batch, seq, 6)
        h = h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 4)  # (batch, 6, seq, 4)
        return self.head(self.conv(h).mean(dim=(2, 3)))


def test_knots_on_peft_embedding_and_conv2d_layers_keep_the_function_exactly() -> None:
    model = get_peft_model(
        _EmbConv(), LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv"])
    )
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=10)
    layers = _lora_layers(model)
    assert set(layers) == {"base_model.model.emb", "base_model.model.conv"}
    with torch.no_grad():
        for m in layers.values():
            for p in m.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.3)
    expected = {n: m.base_layer.weight + m.get_delta_weight("default") for n, m in layers.items()}
    ids = torch.randint(0, 20, (3, 7))
    with torch.no_grad():
        before = model(ids)
    opt.tie_knot()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    for n, m in layers.items():
        torch.testing.assert_close(m.base_layer.weight, expected[n], rtol=0, atol=1e-6)
    emb, conv = layers["base_model.model.emb"], layers["base_model.model.conv"]
    # a new link computes nothing yet, and still trains
    assert not (emb.lora_embedding_B["default"] @ emb.lora_embedding_A["default"]).any()
    assert not conv.lora_B["default"].weight.any()


def _tiny_mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    return MixtralForCausalLM(cfg).eval()


def test_knots_on_a_peft_target_parameter_are_exact() -> None:
    """A 2-D parameter targeted through PEFT's target_parameters (Mixtral's router)."""
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=["mlp.gate.weight"]
    )
    model = get_peft_model(_tiny_mixtral(), config)
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=10)
    layers = _lora_layers(model)
    wrappers = {n: m for n, m in layers.items() if type(m).__name__ == "ParamWrapper"}
    assert len(wrappers) == 1 and len(opt.adapted_modules()) == 2
    _randomize_links(model)
    expected = {n: m.get_param() + m.get_delta_weight("default") for n, m in wrappers.items()}
    before = _logits(model)
    opt.tie_knot()
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    for n, m in wrappers.items():
        torch.testing.assert_close(m.get_param(), expected[n], rtol=0, atol=1e-6)
        assert not m.lora_B["default"].weight.any()


def test_knots_on_peft_fused_experts_are_exact_per_expert_and_save_the_whole_chain(
    tmp_path: Path,
) -> None:
    """transformers 5 stores Mixtral's experts as 3-D Parameters; PEFT's target_parameters
    adapts them with one pair of factors for all experts."""
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )  # fmt: skip
    model = get_peft_model(_tiny_mixtral(), config)
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=10)
    layers = _lora_layers(model)
    wrappers = {n: m for n, m in layers.items() if type(m).__name__ == "ParamWrapper"}
    assert len(wrappers) == 2 and len(opt.adapted_modules()) == 3
    _randomize_links(model)
    expected = {n: m.get_param() + m.get_delta_weight("default") for n, m in wrappers.items()}
    delta_norms = {n: float(m.get_delta_weight("default").norm()) for n, m in wrappers.items()}
    before = _logits(model)
    opt.tie_knot()
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    for n, m in wrappers.items():  # each expert's s·Bₑ·Aₑ went into its own slice
        torch.testing.assert_close(m.get_param(), expected[n], rtol=0, atol=1e-6)
        assert not m.lora_B["default"].weight.any()
    norms = opt.history.knots[0].norms
    for n in wrappers:  # the guard's norm: all experts' updates together
        assert norms[n] == pytest.approx(delta_norms[n], rel=1e-4)
    _randomize_links(model)  # a second link under way
    trained = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(_tiny_mixtral(), tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), trained, rtol=1e-5, atol=1e-5)


def test_a_lora_config_naming_fused_experts_in_target_modules_warns() -> None:
    """transformers 5 holds Mixtral's experts as 3-D Parameters, which PEFT's target_modules
    cannot adapt: ``"down_proj"`` names ``experts.down_proj`` and PEFT leaves it frozen, so the
    chain would silently never train the experts. It warns, naming target_parameters."""
    import warnings

    from chainopt import ChainLoRAWarning

    model = get_peft_model(
        _tiny_mixtral(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    )
    with pytest.warns(ChainLoRAWarning, match=r"experts\.down_proj.*target_parameters") as got:
        opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=2)
    assert all(".q_proj" in n for n, _ in opt.adapted_modules())
    assert any(w.filename == __file__ for w in got)  # points at the caller's line
    # a regex string, as PEFT reads it (re.fullmatch of the name in the wrapped model)
    regex = r".*\.(q_proj|down_proj)"
    model = get_peft_model(_tiny_mixtral(), LoraConfig(r=2, lora_alpha=4, target_modules=regex))
    with pytest.warns(ChainLoRAWarning, match=r"experts\.down_proj.*target_parameters"):
        ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=2)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                        target_parameters=["mlp.experts.down_proj"])  # fmt: skip
    model = get_peft_model(_tiny_mixtral(), config)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChainLoRAWarning)  # the user chose the bare parameters
        ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=2)


def test_peft_all_linear_that_leaves_fused_experts_frozen_warns() -> None:
    """PEFT expands ``target_modules="all-linear"`` into the names of the Linear layers. On
    Qwen2-MoE that leaves the routed experts (3-D Parameters) and the router frozen, 26% of the
    model, with no target_parameters, and the chain trained the attention and shared expert
    only, silently. It warns, naming the target_parameters that chain them; with those, or on
    Mixtral (where PEFT adds them itself), or with only some Linears targeted, it is silent."""
    import warnings

    from chainopt import ChainLoRAWarning

    def chain(model: nn.Module, config: LoraConfig) -> ChainLoRAOptimizer:
        peft_model = get_peft_model(model, config)
        return ChainLoRAOptimizer(
            peft_model, torch.optim.SGD(peft_model.parameters(), lr=0.1), knot_every=2
        )

    advice = (
        r"every Linear layer \(8 layers\) but leaves 3 matrix weights, 26% .*frozen.*"
        r"target_parameters=\['gate.weight', 'experts.gate_up_proj', 'experts.down_proj'\]"
    )
    with pytest.warns(ChainLoRAWarning, match=advice) as got:
        chain(tiny_qwen2_moe(), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    assert [w.filename for w in got if w.category is ChainLoRAWarning] == [__file__]
    # what the warning advises chains the experts and the router, and is silent
    suffixes = ["gate.weight", "experts.gate_up_proj", "experts.down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChainLoRAWarning)
        opt = chain(
            tiny_qwen2_moe(),
            LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", target_parameters=suffixes),
        )
        adapted = [n for n, _ in opt.adapted_modules()]
        assert sum(".mlp.experts" in n for n in adapted) == 2 and any(
            ".mlp.gate" in n for n in adapted
        )
        chain(_tiny_mixtral(), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
        chain(tiny_qwen2_moe(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


def test_a_chain_of_peft_embedding_and_conv_layers_saves_the_whole_chain(tmp_path: Path) -> None:
    def base() -> nn.Module:
        torch.manual_seed(0)
        return _EmbConv()

    model = get_peft_model(base(), LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "conv"]))
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    ids = torch.randint(0, 20, (3, 7))
    for _ in range(5):  # two knots, a link under way
        model(ids).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = model(ids)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids), trained, rtol=1e-5, atol=1e-5)


# --- DoRA ---


@given(
    shape=st.tuples(st.integers(1, 10), st.integers(1, 10)),
    rank=st.integers(1, 4),
    alpha=st.sampled_from([1.0, 4.0]),
)
def test_a_knot_on_a_dora_linear_keeps_the_function(
    shape: tuple[int, int], rank: int, alpha: float
) -> None:
    """DoRA computes ``m ⊙ V x / ‖V‖_row`` with ``V = W + s·B·A``: merging ``s·B·A`` into ``W``
    (so ``V`` is the new ``W``) and keeping ``m`` computes the same, with ``B = 0`` after."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(shape[0], shape[1]))
    model = get_peft_model(
        net, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], use_dora=True)
    )
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=10)
    _randomize_links(model)
    layer = next(iter(_lora_layers(model).values()))
    magnitude = layer.lora_magnitude_vector["default"].weight
    m_before = magnitude.detach().clone()
    x = torch.randn(4, shape[0])
    with torch.no_grad():
        before = model(x)
    opt.tie_knot()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert torch.equal(magnitude, m_before)
    # the magnitude trains on through knots, as it is
    assert magnitude.requires_grad and all(p is not magnitude for p in opt.factors())
    assert any(p is magnitude for g in opt.param_groups for p in g["params"])


# --- 4-bit ---


def test_a_4bit_peft_model_ties_exact_knots_through_host_masters() -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from test_quantized import _models, _quantize

    _, quantized = _models()
    quantized.is_loaded_in_4bit = True  # as from_pretrained marks a 4-bit model: PEFT's bnb layers
    model = get_peft_model(quantized, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    layer = model.base_model.model[0]
    assert type(layer).__name__ == "Linear4bit"  # PEFT's bitsandbytes LoRA layer
    start = bnbf.dequantize_4bit(layer.base_layer.weight.data, layer.base_layer.weight.quant_state)
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=3, seed=2
    )
    record = opt.chain.records[0]
    assert record.quant is not None and record.quant.master is not None
    assert record.quant.master.device.type == "cpu"
    assert torch.equal(record.quant.master, start)
    for step in range(6):  # knots after steps 3 and 6
        x = torch.randn(16, 64, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.knots_tied == 2
    # the master is M0 + the merged links, the 4-bit weight quantize(M): rounded once
    links = opt.history.links(record.name)
    total = sum(link.scale * link.B.double() @ link.A.double() for link in links)
    torch.testing.assert_close(
        record.quant.master.double(), start.double() + total, rtol=1e-6, atol=1e-6
    )
    weight = layer.base_layer.weight
    assert torch.equal(weight.data, _quantize(record.quant.master, layer.base_layer))
    assert not layer.lora_B["default"].weight.any()  # restarted after step 6
    assert weight is layer.base_layer.weight  # requantized in place


def test_peft_modules_to_save_train_as_they_are_and_save_with_the_chain(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    def base() -> nn.Module:
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
        )  # fmt: skip
        return LlamaForSequenceClassification(cfg).eval()

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    model = get_peft_model(base(), config)  # PEFT adds the "score" head to modules_to_save
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    head = model.base_model.model.score.modules_to_save["default"].weight
    assert head.requires_grad and any(p is head for g in opt.param_groups for p in g["params"])
    head_before = head.detach().clone()
    labels = torch.tensor([0, 2])
    model.train()
    for _ in range(3):
        model(input_ids=IDS, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert opt.knots_tied == 1 and not torch.equal(head, head_before)  # it trained, never reset
    trained = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base(), tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), trained, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_leaves_peft_layers_computing_the_chain_and_no_marks(
    tmp_path: Path,
) -> None:
    model = _peft_llama(use_rslora=True)
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    assert "save_pretrained" in vars(model) and "load_adapter" in vars(model)
    _train(model, opt, 3)  # a knot, and a link under way
    trained = _logits(model)
    out = opt.merge_and_unload()
    assert out is model
    torch.testing.assert_close(_logits(model), trained, rtol=1e-5, atol=1e-5)
    left = [k for k in vars(model) if "chainopt" in k or k in ("save_pretrained", "load_adapter")]
    assert left == ["_chainopt_base_merged", "save_pretrained"]  # the refusal below, nothing else
    with pytest.raises(ValueError, match=r"merge_and_unload\(\) merged.* nothing was written"):
        model.save_pretrained(tmp_path / "adapter")  # PEFT's own would write the zero link
    assert not (tmp_path / "adapter").exists()
    for layer in _lora_layers(model).values():
        assert [k for k in vars(layer) if "chainopt" in k] == [] and "chainopt" not in str(
            list(layer.state_dict())
        )
        assert not layer.lora_B["default"].weight.any()
    plain = model.merge_and_unload()  # PEFT's own: the plain model
    torch.testing.assert_close(_logits(plain), trained, rtol=1e-5, atol=1e-5)
    from transformers import AutoModelForCausalLM

    plain.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), trained, rtol=1e-5, atol=1e-5)


def test_after_merge_and_unload_no_adapter_save_claims_the_original_base(tmp_path: Path) -> None:
    """Between ``opt.merge_and_unload()`` and PEFT's ``merge_and_unload()`` the fine-tuned function
    lives in the base weights and the adapter is zero: PEFT's own save wrote that zero adapter
    (0.07 away from the trained model on the original base). It refuses now, and so does the save
    of any later chain on those weights (its history lacks the merged one), on the same
    PeftModel or on a new one around PEFT's plain model; the plain model itself saves exactly."""
    model = _peft_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 3)
    trained = _logits(model)
    opt.merge_and_unload()
    refused = r"merge_and_unload\(\) merged.* nothing was written"
    with pytest.raises(ValueError, match=refused):
        model.save_pretrained(tmp_path / "between")
    assert not (tmp_path / "between").exists()

    again = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, again, 3)  # a second chain on the merged base trains and ties knots
    assert again.knots_tied == 1
    with pytest.raises(ValueError, match=refused):
        model.save_pretrained(tmp_path / "second")  # it would hold the second chain only
    again.merge_and_unload()
    twin = __import__("copy").deepcopy(model)
    buffer = __import__("io").BytesIO()
    torch.save(model, buffer)  # the refusal is no bound method: the model still pickles
    buffer.seek(0)
    pickled = torch.load(buffer, weights_only=False)
    for m in (model, twin, pickled):
        with pytest.raises(ValueError, match=refused):
            m.save_pretrained(tmp_path / "after")
    assert not (tmp_path / "second").exists() and not (tmp_path / "after").exists()

    final = _logits(model)
    plain = model.merge_and_unload()  # PEFT's own: the plain fine-tuned model
    rewrapped = get_peft_model(plain, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    third = ChainLoRAOptimizer(
        rewrapped, torch.optim.SGD(rewrapped.parameters(), lr=0.0), knot_every=2
    )
    with pytest.raises(ValueError, match=refused):
        rewrapped.save_pretrained(tmp_path / "third")  # a chain over the merged weights again
    third.merge_and_unload()
    plain = rewrapped.merge_and_unload()
    plain.save_pretrained(tmp_path / "plain")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    torch.testing.assert_close(_logits(loaded), final, rtol=1e-5, atol=1e-5)
    assert not torch.equal(final, trained)  # the second chain trained on top of the first


def test_a_bfloat16_peft_model_keeps_the_exact_sum_through_a_merge_residual(tmp_path: Path) -> None:
    """Knots into a bf16 base: ``W + residual`` is ``W₀ + Σ sᵢ·Bᵢ·Aᵢ`` in float32, and the
    residual resumes with the model's state dict."""

    def build() -> tuple[nn.Module, ChainLoRAOptimizer]:
        model = get_peft_model(
            tiny_llama().to(torch.bfloat16),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
        )
        opt = ChainLoRAOptimizer(
            model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2, seed=4
        )
        return model, opt

    model, opt = build()
    layers = _lora_layers(model)
    name, layer = next(iter(layers.items()))
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's float32 adapter
    start = layer.base_layer.weight.detach().float().clone()
    residual = layer.chainopt_merge_residual
    assert residual.dtype == torch.bfloat16 and not residual.any()
    _train(model, opt, 4)  # two knots
    links = opt.history.links(name)
    total = sum(link.scale * link.B.double() @ link.A.double() for link in links)
    exact = layer.base_layer.weight.double() + residual.double()
    torch.testing.assert_close(exact, start.double() + total, rtol=0, atol=2e-6)
    assert residual.any()  # rounding to bf16 dropped something, kept here
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    model2, opt2 = build()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert torch.equal(_lora_layers(model2)[name].chainopt_merge_residual, residual)


@given(
    vocab=st.integers(2, 12),
    dim=st.integers(1, 8),
    channels=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    rank=st.integers(1, 4),
    rslora=st.booleans(),
)
def test_a_knot_on_peft_embedding_and_conv_layers_keeps_the_function(
    vocab: int,
    dim: int,
    channels: tuple[int, int],
    kernel: int,
    stride: int,
    rank: int,
    rslora: bool,
) -> None:
    torch.manual_seed(0)
    net = nn.ModuleDict(
        {
            "emb": nn.Embedding(vocab, dim),
            "conv": nn.Conv2d(channels[0], channels[1], kernel, stride=stride, padding=kernel // 2),
        }
    )
    model = get_peft_model(
        net, LoraConfig(r=rank, lora_alpha=2.0, target_modules=["emb", "conv"], use_rslora=rslora)
    )
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=10)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ids, x = torch.randint(0, vocab, (2, 5)), torch.randn(2, channels[0], 5, 6)
    emb, conv = model.base_model.model["emb"], model.base_model.model["conv"]
    with torch.no_grad():
        before = emb(ids), conv(x)
        opt.tie_knot()
        after = emb(ids), conv(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not emb.lora_embedding_B["default"].any() or not emb.lora_embedding_A["default"].any()
    assert not conv.lora_B["default"].weight.any()


def test_export_peft_adapter_of_a_chained_peft_model_is_its_whole_chain_save(
    tmp_path: Path,
) -> None:
    from chainopt import export_peft_adapter

    model = _peft_llama(use_rslora=True)
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 3)
    trained = _logits(model)
    report = export_peft_adapter(opt, tmp_path)
    assert report.rank == 8 and report.relative_error == 0.0
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), trained, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rank= and base="):
        export_peft_adapter(opt, tmp_path / "other", rank=2)
    assert not (tmp_path / "other").exists()


# --- diffusers: PEFT layers injected into a UNet ---


def _tiny_unet() -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=4,
    ).eval()  # fmt: skip


def test_a_diffusers_unet_with_injected_lora_chains_and_saves_the_whole_chain(
    tmp_path: Path,
) -> None:
    pytest.importorskip("diffusers")
    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], use_rslora=True
    )
    unet = _tiny_unet()
    unet.add_adapter(config)
    opt = ChainLoRAOptimizer(unet, torch.optim.AdamW(unet.parameters(), lr=1e-2), knot_every=2)
    assert len(opt.adapted_modules()) == 32  # every to_q, to_k, to_v, to_out.0
    x, t, h = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 3, 8)
    unet.train()
    for _ in range(5):  # two knots, a link under way
        unet(x, t, h).sample.square().mean().backward()
        opt.step()
        opt.zero_grad()
    unet.eval()
    with torch.no_grad():
        trained = unet(x, t, h).sample
        before = snapshot(unet)
        opt.tie_knot()  # a knot keeps the function
        torch.testing.assert_close(unet(x, t, h).sample, trained, rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(v, unet.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="save_lora_adapter"):
        unet.save_pretrained(tmp_path / "model")  # PEFT's keys, which from_pretrained skips
    assert not (tmp_path / "model").exists()
    unet.save_lora_adapter(tmp_path)  # diffusers' own save: the whole chain
    fresh = _tiny_unet()
    fresh.load_lora_adapter(str(tmp_path), prefix=None, use_safetensors=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, h).sample, trained, rtol=1e-5, atol=1e-5)
    # in memory, in place of get_peft_model_state_dict(unet): the same keys and tensors
    from safetensors.torch import load_file

    from chainopt import peft_adapter_state_dict

    state, saved_config = peft_adapter_state_dict(opt)
    written = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert sorted(state) == sorted(written) and saved_config["r"] == 8
    assert all(torch.equal(state[k].float(), written[k]) for k in state)


def test_a_unet_whose_chain_was_merged_and_unloaded_refuses_its_adapter_save(
    tmp_path: Path,
) -> None:
    """diffusers' save_lora_adapter after opt.merge_and_unload() would write the zero link as the
    adapter of the original UNet: refused; fuse_lora's path (the plain model) stays open."""
    pytest.importorskip("diffusers")
    unet = _tiny_unet()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]))
    opt = ChainLoRAOptimizer(unet, torch.optim.AdamW(unet.parameters(), lr=1e-2), knot_every=2)
    x, t, h = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 3, 8)
    for _ in range(3):
        unet(x, t, h).sample.square().mean().backward()
        opt.step()
        opt.zero_grad()
    opt.merge_and_unload()
    with pytest.raises(ValueError, match=r"merge_and_unload\(\) merged.* nothing was written"):
        unet.save_lora_adapter(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_save_merged_of_a_chained_peft_model_is_its_whole_chain_save(tmp_path: Path) -> None:
    """chainopt.save_merged(peft_model) went through PeftModel's class save with a state dict,
    which kept the link under way only: an adapter 0.25 away from the trained model. It is the
    model's own save now (the whole chain), and refuses once the chain was merged and unloaded."""
    import chainopt

    model = _peft_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 3)
    trained = _logits(model)
    assert chainopt.save_merged(opt, tmp_path / "chain") == tmp_path / "chain"
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "chain").eval()
    torch.testing.assert_close(_logits(reloaded), trained, rtol=1e-5, atol=1e-5)
    opt.merge_and_unload()
    with pytest.raises(ValueError, match="nothing was written"):
        chainopt.save_merged(model, tmp_path / "after")
    assert not (tmp_path / "after").exists()
    for base in (None, tiny_llama()):  # base= raised an AttributeError; without, it asked for it
        with pytest.raises(ValueError, match=r"PEFT's own LoRA layers.*nothing was written"):
            chainopt.export_peft_adapter(opt, tmp_path / "export", base=base)
    assert not (tmp_path / "export").exists()


def test_save_merged_refuses_a_model_with_injected_peft_layers(tmp_path: Path) -> None:
    """A UNet with injected (chained) PEFT layers: save_merged wrote PEFT's base_layer/lora keys,
    and from_pretrained gave a UNet with fresh attention weights (NaN out). Refused, chained or
    unloaded, with nothing written."""
    pytest.importorskip("diffusers")
    import chainopt

    unet = _tiny_unet()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"]))
    opt = ChainLoRAOptimizer(unet, torch.optim.AdamW(unet.parameters(), lr=1e-2), knot_every=2)
    for unloaded in (False, True):
        if unloaded:
            opt.merge_and_unload()
        with pytest.raises(ValueError, match=r"PEFT layers injected.*nothing was written"):
            chainopt.save_merged(unet, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()


def test_load_adapter_of_a_chain_checkpoint_brings_the_chain_back_to_it(tmp_path: Path) -> None:
    """What the HF Trainer does for resume_from_checkpoint and load_best_model_at_end:
    load_adapter(checkpoint) with the chain's state in the checkpoint's optimizer.pt."""
    model = _peft_llama(use_rslora=True)
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 3)
    at_3 = _logits(model)
    model.save_pretrained(tmp_path / "ckpt")
    torch.save(opt.state_dict(), tmp_path / "ckpt" / "optimizer.pt")
    model.save_pretrained(tmp_path / "bare")  # no optimizer.pt beside it
    _train(model, opt, 3)
    assert not torch.equal(_logits(model), at_3)
    model.load_adapter(str(tmp_path / "ckpt"), "default")
    assert torch.equal(_logits(model), at_3) and opt.optimizer_steps == 3
    _train(model, opt, 1)  # and it trains on
    model.load_adapter(str(tmp_path / "bare"), "default")  # nothing to restore the chain from
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    state, steps = snapshot(model), opt.optimizer_steps
    with pytest.raises(RuntimeError, match=r"optimizer's state_dict.*nothing was changed"):
        opt.step()
    after = snapshot(model)  # refused before the wrapped optimizer stepped the factors
    assert opt.optimizer_steps == steps
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize(
    ("prepare", "match"),
    [
        (lambda m: m.base_model.model.model.layers[0].self_attn.q_proj.merge(), "is merged"),
        (
            lambda m: (
                m.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
                or m.base_model.set_adapter(["default", "other"])
            ),
            "several active adapters",
        ),
        (lambda m: None, r"init_lora_weights='pissa'"),
        (lambda m: None, r"LoRA variant|lora_bias"),
    ],
    ids=["merged", "two-active", "pissa", "lora-bias"],
)
def test_peft_setups_a_chain_cannot_keep_exact_are_refused_before_anything_changes(
    prepare: Any, match: str
) -> None:
    config: dict[str, Any] = {}
    if "pissa" in match:
        config["init_lora_weights"] = "pissa"
    if "lora_bias" in match:
        config["lora_bias"] = True
    model = _peft_llama(**config)
    prepare(model)
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = snapshot(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any("chainopt" in k for m in model.modules() for k in vars(m))


def _tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_a_peft_layer_over_a_tied_weight_is_refused_before_anything_changes(target: str) -> None:
    """A knot merging into a tied embedding's (or output layer's) base weight changed the other
    layer too: the logits moved by 1.19 (0.09 for ``lm_head``) at a knot after one step,
    silently (``scripts/probe_peft_paths.py``). Refused, as ``target_modules`` refuses a tied
    layer."""
    model = get_peft_model(_tied_llama(), LoraConfig(r=4, target_modules=["q_proj", target]))
    before = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    other = "lm_head" if target == "embed_tokens" else "embed_tokens"
    with pytest.raises(ValueError, match=rf"'base_model.model.*{target}'.*shared with .*{other}"):
        ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = snapshot(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any("chainopt" in k for m in model.modules() for k in vars(m))
    model = get_peft_model(_tied_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=2)
    assert len(opt.adapted_modules()) == 1  # a model with tied weights elsewhere is chained


def test_peft_loraplus_optimizer_keeps_its_groups_under_the_chain() -> None:
    """LoRA+ (PEFT's create_loraplus_optimizer: B at a higher LR) wrapped as it is."""
    from peft.optimizers import create_loraplus_optimizer

    model = _peft_llama()
    base = create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0, weight_decay=0.0
    )
    groups = [(g["lr"], {id(p) for p in g["params"]}) for g in base.param_groups]
    opt = ChainLoRAOptimizer(model, base, knot_every=2)
    assert [(g["lr"], {id(p) for p in g["params"]}) for g in opt.param_groups] == groups
    b_group = next(g for g in opt.param_groups if g["lr"] == pytest.approx(16e-3))
    layers = _lora_layers(model).values()
    assert {id(m.lora_B["default"].weight) for m in layers} == {id(p) for p in b_group["params"]}
    _train(model, opt, 2)
    assert opt.knots_tied == 1


def test_a_deep_copy_of_a_chained_peft_model_saves_its_own_chain(tmp_path: Path) -> None:
    import copy

    model = _peft_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 3)
    twin_opt = copy.deepcopy(opt)
    twin = twin_opt.model
    _train(twin, twin_opt, 3)  # the copy trains on; the original stays at step 3
    at_3, twin_logits = _logits(model), _logits(twin)
    assert not torch.equal(at_3, twin_logits)
    twin.save_pretrained(tmp_path / "twin")
    model.save_pretrained(tmp_path / "original")
    for path, expected in ((tmp_path / "twin", twin_logits), (tmp_path / "original", at_3)):
        reloaded = PeftModel.from_pretrained(tiny_llama(), path).eval()
        torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_a_deep_copy_of_a_chained_peft_model_alone_saves_and_unloads(tmp_path: Path) -> None:
    """``copy.deepcopy(model)`` without the optimizer raised ``AttributeError`` (the model held
    the optimizer's bound ``load_state_dict``, whose copy ran on the half-built model copy).
    The copy now has the chain's history and no optimizer: it saves the chain exactly,
    unloads, and takes a new chain, while the original trains on."""
    import copy

    import chainopt

    model = _peft_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 3)
    twin = copy.deepcopy(model)
    at_3 = _logits(model)
    torch.testing.assert_close(_logits(twin), at_3, rtol=0, atol=0)
    twin.save_pretrained(tmp_path / "twin")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "twin").eval()
    torch.testing.assert_close(_logits(reloaded), at_3, rtol=1e-5, atol=1e-5)
    _train(model, opt, 2)  # the original goes on: the copy shares nothing with it
    torch.testing.assert_close(_logits(twin), at_3, rtol=0, atol=0)
    chainopt.merge_and_unload(twin)
    torch.testing.assert_close(_logits(twin), at_3, rtol=1e-5, atol=1e-5)
    twin_opt = ChainLoRAOptimizer(twin, torch.optim.AdamW(twin.parameters(), lr=1e-2), knot_every=2)
    _train(twin, twin_opt, 2)
    assert twin_opt.knots_tied == 1


def test_a_non_finite_peft_link_is_refused_before_any_weight_changes() -> None:
    from chainopt import NonFiniteUpdateError

    model = _peft_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=10)
    _randomize_links(model)
    layers = _lora_layers(model)
    bad = next(iter(layers.values()))
    with torch.no_grad():
        bad.lora_B["default"].weight[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(NonFiniteUpdateError, match="non-finite"):
        opt.tie_knot()
    after = snapshot(model)
    assert all(torch.equal(after[k], v) or k.endswith("lora_B.default.weight") for k, v in
               before.items())  # fmt: skip
    assert all(torch.equal(m.base_layer.weight, before[f"{n}.base_layer.weight"])
               for n, m in layers.items())  # fmt: skip


def test_a_nan_modules_to_save_is_not_written_by_the_chained_adapter_save(tmp_path: Path) -> None:
    """The whole chain's save checked the links only: PEFT's ``modules_to_save`` copy of a head
    that took a NaN step was written by ``save_pretrained``, ``export_peft_adapter`` and
    ``peft_adapter_state_dict``. Refused now, nothing written."""
    from chainopt import NonFiniteUpdateError, export_peft_adapter, peft_adapter_state_dict

    model = _peft_llama(modules_to_save=["lm_head"])
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 3)  # a knot and a pending link
    head = model.base_model.model.lm_head.modules_to_save["default"].weight
    with torch.no_grad():
        head[0, 0] = float("inf")
    for save in (
        model.save_pretrained,
        lambda path: export_peft_adapter(opt, path),
        lambda _path: peft_adapter_state_dict(opt),
    ):
        with pytest.raises(NonFiniteUpdateError, match=r"lm_head\.modules_to_save.*NaN/Inf"):
            save(tmp_path / "adapter")
        assert not (tmp_path / "adapter").exists()
    with torch.no_grad():
        head[0, 0] = 0.0
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_chain_summary_of_a_peft_chain_reports_each_layers_stacked_rank() -> None:
    model = _peft_llama(rank_pattern={"v_proj": 2})
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 5)  # two knots, a third link under way
    summary = opt.chain_summary()
    assert summary.links == 3 and len(summary.knot_steps) == 2
    ranks = {n.rsplit(".", 1)[-1]: m.effective_rank for n, m in summary.modules.items()}
    assert ranks == {"q_proj": 12, "v_proj": 6}  # Σ of PEFT's per-module ranks
    assert all(len(m.update_norms) == 2 for m in summary.modules.values())


def test_a_peft_chain_over_gpt2_conv1d_layers_knots_and_saves(tmp_path: Path) -> None:
    """PEFT's Linear over transformers' Conv1D (fan_in_fan_out: the weight is (in, out))."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def base() -> nn.Module:
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)
        return GPT2LMHeadModel(cfg).eval()

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)
    model = get_peft_model(base(), config)
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    (layer,) = _lora_layers(model).values()
    _randomize_links(model)
    expected = layer.base_layer.weight + layer.get_delta_weight("default")
    before = _logits(model)
    opt.tie_knot()
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.weight, expected, rtol=0, atol=1e-6)
    _train(model, opt, 3)
    trained = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(base(), tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), trained, rtol=1e-5, atol=1e-5)


def test_a_dora_chain_trains_and_its_save_reloads_to_the_trained_function(tmp_path: Path) -> None:
    model = _peft_llama(use_dora=True, lora_dropout=0.1)
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 5)  # two knots, a third link under way
    trained = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), trained, rtol=1e-5, atol=1e-5)


# --- the chain as a state machine: steps, knots, resumes; the saved adapter is the update ---


class PeftChainMachine(RuleBasedStateMachine):
    """A chained PeftModel over one Linear under any order of steps, knots and resumes: the
    whole-chain adapter (what save_pretrained writes) on the original weight always gives the
    model's current weight plus its pending link, and a resume continues bitwise."""

    IN, OUT = 6, 5

    @initialize(
        rank=st.integers(1, 4),
        alpha=st.sampled_from([1.0, 8.0]),
        rslora=st.booleans(),
        every=st.integers(1, 4),
        seed=st.integers(0, 100),
    )
    def setup(self, rank: int, alpha: float, rslora: bool, every: int, seed: int) -> None:
        self.spec = (rank, alpha, rslora, every, seed)
        self.model, self.opt = self._build()
        (self.layer,) = _lora_layers(self.model).values()
        self.w0 = self.layer.base_layer.weight.detach().clone()
        self.data = torch.Generator().manual_seed(seed)

    def _build(self) -> tuple[nn.Module, ChainLoRAOptimizer]:
        rank, alpha, rslora, every, seed = self.spec
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(self.IN, self.OUT))
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], use_rslora=rslora)
        model = get_peft_model(net, config)
        opt = ChainLoRAOptimizer(
            model, torch.optim.AdamW(model.parameters(), lr=0.05), knot_every=every, seed=seed
        )
        return model, opt

    @rule()
    def step(self) -> None:
        x = torch.randn(8, self.IN, generator=self.data)
        self.model(x).square().mean().backward()
        self.opt.step()
        self.opt.zero_grad()

    @rule()
    def knot(self) -> None:
        self.opt.tie_knot()

    @rule()
    def resume(self) -> None:
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict()}
        model, opt = self._build()
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        for key, value in self.model.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
        self.model, self.opt = model, opt
        (self.layer,) = _lora_layers(model).values()

    @invariant()
    def the_saved_adapter_is_the_whole_update(self) -> None:
        from chainopt._peft_save import chained_links, whole_chain_tensors

        tensors, _ = whole_chain_tensors(chained_links(self.model), self.opt.history)
        a = tensors["base_model.model.0.lora_A.default.weight"].double()
        b = tensors["base_model.model.0.lora_B.default.weight"].double()
        layer = self.layer
        live = layer.base_layer.weight.double() + layer.get_delta_weight("default").double()
        torch.testing.assert_close(self.w0.double() + b @ a, live, rtol=1e-5, atol=1e-5)


TestPeftChainMachine = PeftChainMachine.TestCase
TestPeftChainMachine.settings = settings(max_examples=15, stateful_step_count=8, deadline=None)


# --- PEFT's own adapter switches between knots: a knot while the adapter is not in the forward ---


def _peft_merge(model: Any) -> Any:
    model.merge_adapter()
    return model.unmerge_adapter


def _peft_merge_and_unload(model: Any) -> Any:
    model.merge_and_unload()
    return None


def _peft_unload(model: Any) -> Any:
    model.unload()
    return None


def _peft_other_adapter(model: Any) -> Any:
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    model.set_adapter("other")
    return lambda: model.set_adapter("default")


def _peft_delete_adapter(model: Any) -> Any:
    model.base_model.delete_adapter("default")
    return None


_SWITCHES = {
    "merge_adapter": (_peft_merge, "merged its adapter"),
    "merge_and_unload": (_peft_merge_and_unload, "merged its adapter"),
    "unload": (_peft_unload, "no longer part of the model"),
    "set_adapter": (_peft_other_adapter, "not PEFT's active adapter"),
    "delete_adapter": (_peft_delete_adapter, "deleted its adapter"),
}


@pytest.mark.parametrize("switch", sorted(_SWITCHES))
def test_a_knot_refuses_while_peft_has_taken_the_adapter_out_of_the_forward(switch: str) -> None:
    """PEFT's merge_adapter (TRL merges around generation), merge_and_unload, unload,
    set_adapter and delete_adapter leave a forward that does not add the chain's link: a knot
    then would add an update the model does not compute (before this check: the function moved by
    0.02-0.03, silently). It raises, naming PEFT's call, and changes nothing; put back, the
    knot is exact."""
    model = _peft_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=100)
    _randomize_links(model)
    layers = _lora_layers(model)
    put_back = _SWITCHES[switch][0](model)
    state = snapshot(model)
    factors = [f.detach().clone() for f in opt.factors()]
    with pytest.raises(RuntimeError, match=_SWITCHES[switch][1]):
        opt.tie_knot()
    after = snapshot(model)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert all(torch.equal(f, g) for f, g in zip(opt.factors(), factors, strict=True))
    assert opt.knots_tied == 0
    for name, layer in layers.items():  # the layers PEFT took out keep their factors too
        assert switch == "delete_adapter" or layer.lora_B["default"].weight.any(), name
    if put_back is not None:
        put_back()
        before = _logits(model)
        opt.tie_knot()
        torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)


def test_a_knot_inside_peft_disable_adapter_refuses() -> None:
    """Inside ``disable_adapter()`` (DPO's reference pass) the model computes the base alone: a
    knot there would move that function (and every later reference pass) by the link."""
    model = _peft_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=100)
    _randomize_links(model)
    with model.disable_adapter():
        base = _logits(model)
        with pytest.raises(RuntimeError, match="disabled"):
            opt.tie_knot()
        torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)


def test_merges_and_exports_refuse_while_peft_merged_the_adapter() -> None:
    """chainopt's own merges read ``W + s·B·A``: with PEFT's merge in W already, that would
    count the link twice."""
    import chainopt

    model = _peft_llama()
    ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=100)
    _randomize_links(model)
    model.merge_adapter()
    state = snapshot(model)
    for call in (chainopt.merged_state_dict, chainopt.merge_and_unload):
        with pytest.raises(RuntimeError, match="merged its adapter"):
            call(model)
    after = snapshot(model)
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


# --- an adapter saved elsewhere, loaded into a live chain ---


def _foreign_adapter(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A PEFT adapter trained on the original base (B random), saved; and its logits."""
    other = _peft_llama()
    _randomize_links(other)
    other.save_pretrained(tmp_path / "other")
    return tmp_path / "other", _logits(other.eval())


def test_an_adapter_saved_elsewhere_loads_exactly_into_a_chain_before_any_knot(
    tmp_path: Path,
) -> None:
    where, logits = _foreign_adapter(tmp_path)
    model = _peft_llama()
    ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=100)
    model.load_adapter(where, adapter_name="default")
    torch.testing.assert_close(_logits(model.eval()), logits, rtol=1e-5, atol=1e-5)


def test_an_adapter_saved_elsewhere_is_refused_into_the_chained_adapter_after_a_knot(
    tmp_path: Path,
) -> None:
    """After a knot the base holds the merged link: loading only an adapter's factors would
    compute links + adapter (0.03-0.08 off its logits, silently, before this check)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from chainopt import ChainLoRAWarning

    where, _ = _foreign_adapter(tmp_path)
    model = _peft_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=100)
    _randomize_links(model)
    opt.tie_knot()
    _randomize_links(model)
    state = snapshot(model)
    other = PeftModel.from_pretrained(tiny_llama(), where)
    for load in (
        lambda: model.load_adapter(where, adapter_name="default"),
        lambda: set_peft_model_state_dict(model, get_peft_model_state_dict(other)),
        lambda: model.load_state_dict(  # a partial load of the factors alone
            {k: v for k, v in other.state_dict().items() if ".lora_" in k}, strict=False
        ),
    ):
        with pytest.raises(ValueError, match="merged link"):
            load()
        after = snapshot(model)
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    # under another name it loads, with a warning that it runs on the chain's merged base
    with pytest.warns(ChainLoRAWarning, match="merged link"):
        model.load_adapter(where, adapter_name="other")


def test_a_knot_merges_with_the_scale_peft_uses_now() -> None:
    """PEFT's ``set_scale`` (diffusers' ``set_adapters(weights=...)``, ``scale_layer``) changes
    ``scaling[adapter]`` after the chain was built: the knot merges what the forward adds."""
    model = _peft_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=100)
    _randomize_links(model)
    for layer in _lora_layers(model).values():
        layer.set_scale("default", 0.5)
    before = _logits(model)
    opt.tie_knot()
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)


def test_the_chains_own_save_serves_through_auto_peft_model(tmp_path: Path) -> None:
    """A chained PeftModel over a base loaded from a directory: its ``save_pretrained`` names that
    base, and ``AutoPeftModelForCausalLM.from_pretrained(adapter_dir)`` (the serving path that
    reads the base from the adapter's config) loads the trained function."""
    from peft import AutoPeftModelForCausalLM
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 5)  # two knots, a link under way
    trained = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    served = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert served.peft_config["default"].r == 12  # three links of rank 4
    torch.testing.assert_close(_logits(served), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_the_merged_state_dict_of_a_chained_peft_model_loads_into_the_same_peft_model(
    use_dora: bool,
) -> None:
    """PEFT's layers keep PEFT's keys in ``merged_state_dict`` (and so in Accelerate's
    ``save_model`` and the other deploy saves): merged under plain keys, the base layers' biases
    were dropped and DoRA's magnitude ignored (0.031 off in outputs), and the result loaded into
    neither the PeftModel nor the base."""
    import chainopt

    def base() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    def config() -> LoraConfig:
        return LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], use_dora=use_dora)

    model = get_peft_model(base(), config())
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    x = torch.randn(4, 8)
    for _ in range(3):  # a knot, and a link under way
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = model(x)
    fresh = get_peft_model(base(), config())
    fresh.load_state_dict(chainopt.merged_state_dict(model), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), trained, rtol=0, atol=1e-6)


# --- what the adapter's LoraConfig asks for that a chain would silently not do ---


def test_an_adapter_loaded_for_inference_is_refused_naming_is_trainable(tmp_path: Path) -> None:
    trained = _peft_llama()
    _randomize_links(trained)
    trained.save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)  # is_trainable=False: frozen
    before = snapshot(frozen)
    flags = {n: p.requires_grad for n, p in frozen.named_parameters()}
    with pytest.raises(ValueError, match=r"is_trainable=True.*nothing was changed"):
        ChainLoRAOptimizer(frozen, torch.optim.AdamW(frozen.parameters(), lr=1e-2), knot_every=2)
    assert {n: p.requires_grad for n, p in frozen.named_parameters()} == flags
    for k, v in snapshot(frozen).items():
        assert torch.equal(v, before[k]), k
    # factors made trainable by hand are the user's choice: chained
    for name, p in frozen.named_parameters():
        p.requires_grad_("lora_" in name)
    ChainLoRAOptimizer(frozen, torch.optim.AdamW(frozen.parameters(), lr=1e-2), knot_every=2)
    # loaded trainable, the saved adapter (B non-zero from the start) is the chain's first link
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 5)
    model.save_pretrained(tmp_path / "chain")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "chain").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_peft_bias_training_is_refused_not_silently_frozen(bias: str) -> None:
    from models import tiny_opt

    model = get_peft_model(tiny_opt(), LoraConfig(r=4, target_modules=["q_proj"], bias=bias))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(v for n, v in flags.items() if n.endswith("bias"))  # PEFT trains biases
    with pytest.raises(ValueError, match=rf"bias='{bias}'.*nothing was changed"):
        ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_add_weighted_adapter_of_the_chained_adapter_after_a_knot_is_refused(
    tmp_path: Path,
) -> None:
    """After a knot the chained adapter's factors are the link under way only: a combination
    of them, saved and loaded onto the original base, missed the merged links (0.42 off in
    scripts/probe_peft_paths.py)."""
    model = _peft_llama()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"]))
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 1)  # before any knot the factors are the whole adapter: PEFT's own
    model.add_weighted_adapter(["default"], [1.0], "early", combination_type="cat")
    _train(model, opt, 2)
    assert opt.knots_tied == 1
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"add_weighted_adapter.*save_pretrained"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "comb", "cat")
    assert "comb" not in model.peft_config and snapshot(model).keys() == before.keys()
    model.add_weighted_adapter(["other"], [0.5], "scaled", combination_type="linear")  # not chained
    assert "scaled" in model.peft_config
    # the documented way: the whole chain, loaded onto the original base, combined there
    trained = _logits(model)
    model.save_pretrained(tmp_path, selected_adapters=["default"])
    base = PeftModel.from_pretrained(tiny_llama(), tmp_path, adapter_name="chain")
    base.add_weighted_adapter(["chain"], [1.0], "comb", combination_type="cat")
    base.set_adapter("comb")
    torch.testing.assert_close(_logits(base.eval()), trained, rtol=1e-5, atol=1e-5)
    opt.merge_and_unload()
    assert "add_weighted_adapter" not in model.__dict__  # the class's again


def test_peft_trainable_tokens_train_alone_and_the_chain_saves_the_trained_function(
    tmp_path: Path,
) -> None:
    """trainable_token_indices: the chain kept PEFT's whole token layer trainable, so its
    base_layer (the full embedding, which the adapter does not save) trained too; the save was
    0.71 off the trained logits."""
    model = _peft_llama(trainable_token_indices={"embed_tokens": [1, 5, 9]})
    peft_trains = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == peft_trains
    embedding = model.base_model.model.model.embed_tokens.token_adapter.base_layer.weight
    before = embedding.detach().clone()
    _train(model, opt, 5)
    assert torch.equal(embedding, before)
    trained = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("switch", ["set_adapter", "disable_adapter", "merge_adapter"])
def test_a_step_while_peft_has_taken_the_chained_adapter_out_refuses(switch: str) -> None:
    """A step under another active adapter (whose factors PEFT made trainable) trained nothing
    of the chain (its factors got no gradient) yet counted towards the knot, silently; disabled
    or merged, the same wherever something else in the forward trains (modules_to_save)."""
    model = _peft_llama()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=3)
    _train(model, opt, 1)
    if switch == "set_adapter":
        model.set_adapter("other")
    elif switch == "merge_adapter":
        model.merge_adapter()
    context = model.disable_adapter() if switch == "disable_adapter" else contextlib.nullcontext()
    with context:
        if switch == "set_adapter":  # otherwise nothing in the forward requires grad
            model.train()
            model(input_ids=IDS, labels=IDS).loss.backward()
        state, steps = snapshot(model), opt.optimizer_steps
        with pytest.raises(RuntimeError, match=r"cannot step the chain.*nothing was changed"):
            opt.step()
        after = snapshot(model)
        assert opt.optimizer_steps == steps
        assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    opt.zero_grad()
    if switch == "set_adapter":
        model.set_adapter("default")
    elif switch == "merge_adapter":
        model.unmerge_adapter()
    _train(model, opt, 2)  # put back, the chain trains and knots on
    assert opt.knots_tied == 1


def test_the_whole_chain_in_memory_replaces_get_peft_model_state_dict(tmp_path: Path) -> None:
    """PEFT's ``get_peft_model_state_dict`` of a chained ``PeftModel`` holds the link under way
    only (0.4 off the trained logits on the original base after 2 knots), which chainopt cannot
    see; ``peft_adapter_state_dict(opt)`` is the whole chain, what ``save_pretrained`` writes."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from chainopt import peft_adapter_state_dict

    model = _peft_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2)
    _train(model, opt, 5)
    trained = _logits(model)
    state, config = peft_adapter_state_dict(opt)
    assert config["r"] == config["lora_alpha"] == 12
    model.save_pretrained(tmp_path)
    written = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(state) == sorted(written)
    assert all(torch.equal(state[k].cpu(), written[k]) for k in state)

    def served(adapter: dict[str, torch.Tensor], r: int, alpha: int) -> nn.Module:
        fresh = get_peft_model(
            tiny_llama(), LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
        )
        set_peft_model_state_dict(fresh, adapter)
        return fresh.eval()

    torch.testing.assert_close(_logits(served(state, 12, 12)), trained, rtol=1e-5, atol=1e-5)
    peft_own = get_peft_model_state_dict(model)  # the link under way: another model
    assert (_logits(served(peft_own, 4, 8)) - trained).abs().max() > 1e-2
    with pytest.raises(ValueError, match="rank= and base= are not taken"):
        peft_adapter_state_dict(opt, rank=4)


class _ConvNet(nn.Module):
    def __init__(self, **conv: Any) -> None:
        super().__init__()
        self.conv, self.emb = nn.Conv2d(4, 4, 3, **conv), nn.Embedding(10, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize(
    ("conv", "config", "match"),
    [
        ({"groups": 2}, {"target_modules": ["conv"]}, r"groups=2"),
        ({"dilation": 2}, {"target_modules": ["conv"]}, r"dilation=\(2, 2\)"),
        ({"padding": 1, "padding_mode": "reflect"}, {"target_modules": ["conv"]}, "'reflect'"),
        ({}, {"target_modules": ["conv"], "use_dora": True}, "DoraConv2dVariant"),
        ({}, {"target_modules": ["emb"], "use_dora": True}, "DoraEmbeddingVariant"),
    ],
    ids=["groups", "dilation", "reflect-padding", "dora-conv", "dora-embedding"],
)
def test_peft_layers_whose_knot_could_not_keep_the_function_are_refused(
    conv: dict[str, Any], config: dict[str, Any], match: str
) -> None:
    """What integrations.md lists as refused: a convolution PEFT's LoRA branch is not the merged
    kernel of (groups, dilation, a padding mode other than zeros), and DoRA on anything but a
    Linear layer; nothing changes."""
    torch.manual_seed(0)
    model = get_peft_model(_ConvNet(**conv), LoraConfig(r=2, **config))
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), knot_every=2)
    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any("chainopt" in k for m in model.modules() for k in vars(m))
