"""Choosing modules (suffixes, regexes, predicates) and checking each can take a link."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from models import assert_same, fingerprint, mlp, tiny_llama, tiny_qwen2_moe
from test_config import _refused
from torch import nn

from chainopt import ChainLoRAOptimizer
from chainopt._attach import lora_parametrization
from chainopt.targets import select_modules


def _names(spec: object) -> list[str]:
    return [n for n, _ in select_modules(tiny_llama(), spec)]  # type: ignore[arg-type]


def test_suffix_matches_whole_name_components() -> None:
    names = _names(["q_proj", "v_proj"])
    assert names == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert _names("proj") == []  # a suffix is a whole component, not a substring


def test_regex_fullmatches_the_qualified_name() -> None:
    assert _names(re.compile(r".*\.0\.self_attn\.[qk]_proj")) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
    ]


def test_callable_sees_name_and_module() -> None:
    names = _names(lambda name, m: isinstance(m, nn.Linear) and "mlp" in name)
    assert len(names) == 6 and all(".mlp." in n for n in names)


@pytest.mark.parametrize(
    ("argument", "spec", "match"),
    [
        (
            "target_modules",
            lambda name: True,
            r"target_modules must be a callable \(name, module\).*\(name\)",
        ),
        ("trainable_modules", lambda name: name == "2", r"trainable_modules must be a callable"),
        (
            "target_parameters",
            lambda name: True,
            r"target_parameters must be a callable \(name, parameter\)",
        ),
        (
            "target_modules",
            nn.Linear,
            r"target_modules .* the class Linear: .*isinstance\(module, Linear\)",
        ),
        (
            "target_modules",
            nn.Linear(2, 2),
            r"target_modules .* a Linear module: give its qualified name",
        ),
    ],
    ids=["one-argument", "trainable", "parameters", "a-class", "a-module"],
)
def test_a_callable_that_cannot_take_name_and_module_is_refused_naming_the_argument(
    argument: str, spec: object, match: str
) -> None:
    """A one-argument predicate raised the call's own ``TypeError`` (``<lambda>() takes 1
    positional argument but 2 were given``), naming neither the argument nor the value; a class
    (``nn.Linear``) or a module failed inside its constructor or forward."""
    kwargs: dict[str, Any] = {argument: spec}
    if argument == "trainable_modules":
        kwargs["target_modules"] = ["0"]
    _refused(mlp(), TypeError, match, knot_every=2, rank=2, **kwargs)


def test_root_is_never_matched() -> None:
    assert select_modules(nn.Linear(2, 2), lambda n, m: True) == []


@pytest.mark.parametrize(("spec", "err"), [([], ValueError), ([""], ValueError), (3, TypeError)])
def test_bad_specs(spec: object, err: type[Exception]) -> None:
    with pytest.raises(err, match="target_modules"):
        _names(spec)


# --- shared and tied weights ---


def _tied_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_a_tied_output_layer_is_refused_naming_both_places() -> None:
    model = _tied_llama()
    _refused(
        model,
        ValueError,
        r"'lm_head', whose weight is shared with \['model.embed_tokens.weight'\] \(tied"
        r".*'all-linear' leaves tied",
        target_modules=["lm_head", "q_proj"],
    )
    _refused(model, ValueError, "lm_head", target_modules=lambda n, m: isinstance(m, nn.Linear))


def test_all_linear_leaves_tied_and_output_layers_out_and_the_model_keeps_tying() -> None:
    model = _tied_llama()
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()),
                             target_modules="all-linear", rank=2, knot_every=2)  # fmt: skip
    assert "lm_head" not in opt.config.modules
    assert len(opt.config.modules) == 7  # q, k, v, o, gate, up, down
    model.tie_weights()  # still works on the chained model
    ids = torch.randint(0, 64, (2, 8))
    before = model(ids).logits
    with torch.no_grad():
        for _n, m in opt.adapted_modules():
            lora_parametrization(m).lora_B.normal_(std=0.1)  # type: ignore[union-attr]
        trained = model(ids).logits
        opt.tie_knot()
        torch.testing.assert_close(model(ids).logits, trained, rtol=1e-4, atol=1e-4)
    assert not torch.equal(before, trained)


def test_two_modules_sharing_one_weight_are_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    _refused(model, ValueError, r"'0', whose weight is shared with \['2.weight'\]",
             target_modules=["0"])  # fmt: skip
    _refused(model, ValueError, "shared", target_modules=["2"])


def test_a_module_registered_twice_is_one_module_adapted_once() -> None:
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             target_modules=["0", "2"], rank=2, knot_every=2)  # fmt: skip
    assert opt.config.modules == ("0",)
    x = torch.randn(3, 4)
    with torch.no_grad():
        lora_parametrization(lin).lora_B.normal_()  # type: ignore[union-attr]
        before = model(x)
        opt.tie_knot()
        torch.testing.assert_close(model(x), before)


def test_a_weight_that_views_another_tensor_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight = nn.Parameter(model[0].weight.data[:4])  # shares memory
    _refused(model, ValueError, r"'1', whose weight shares memory with \['0.weight'\]",
             target_modules=["1"])  # fmt: skip


def test_trainable_modules_that_contain_a_target_are_refused() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), nn.Linear(4, 2))
    _refused(model, ValueError, "trainable_modules matches '0', which contains the target '0.0'",
             target_modules=["0.0"], trainable_modules=["0"])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int8])
def test_a_weight_in_a_dtype_chainopt_cannot_merge_into_is_refused(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].weight = nn.Parameter(model[0].weight.detach().to(dtype), requires_grad=False)
    _refused(model, TypeError, rf"'0', a module whose weight is {dtype}.*chains over float32",
             target_modules=["0"])  # fmt: skip


def _task_model(kind: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    if kind == "llama-seq":
        cfg = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
        )  # fmt: skip
        return transformers.LlamaForSequenceClassification(cfg)
    if kind == "gpt2-seq":
        cfg = transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=1, n_head=4, num_labels=3, pad_token_id=0
        )
        return transformers.GPT2ForSequenceClassification(cfg)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_labels=3,
    )  # fmt: skip
    if kind == "bert-token":
        return transformers.BertForTokenClassification(cfg)
    return transformers.BertForSequenceClassification(cfg)


@pytest.mark.parametrize(
    ("kind", "head"),
    [("llama-seq", "score"), ("gpt2-seq", "score"), ("bert-seq", "classifier"),
     ("bert-token", "classifier")],
)  # fmt: skip
def test_all_linear_leaves_a_task_models_fresh_head_out_and_a_rank_error_names_it(
    kind: str, head: str
) -> None:
    """PEFT leaves the classification head out of "all-linear"; chainopt took it, and at a rank
    above the label count the error said nothing about the head."""
    model = _task_model(kind)
    chosen = [name for name, _ in select_modules(model, "all-linear")]
    assert chosen and not any(n == head or n.startswith(f"{head}.") for n in chosen)
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters()), target_modules="all-linear", rank=4,
        knot_every=2, trainable_modules=[head],
    )  # fmt: skip
    assert opt.config.modules == tuple(chosen)  # rank 4 > 3 labels: no error, head trained whole
    every_linear = _task_model(kind)
    with pytest.raises(ValueError, match=rf"'{head}'.* task head '{head}'.*trainable_modules"):
        ChainLoRAOptimizer(
            every_linear, torch.optim.AdamW(every_linear.parameters()),
            target_modules=lambda n, m: isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D",
            rank=4, knot_every=2,
        )  # fmt: skip


def test_all_linear_on_a_mixture_of_experts_warns_naming_the_fused_experts_it_leaves_out() -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    from chainopt import ChainLoRAWarning

    cfg = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    model = MixtralForCausalLM(cfg)
    advice = r"experts\.gate_up_proj.*experts\.down_proj.*add target_parameters=\[.*PeftModel"
    with pytest.warns(ChainLoRAWarning, match=advice):
        ChainLoRAOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules="all-linear",
            knot_every=2,
        )  # fmt: skip


def _tiny_moe(kind: str) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    common = dict(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **common)
        return transformers.MixtralForCausalLM(cfg)
    return tiny_qwen2_moe()


def test_a_target_name_that_also_names_fused_experts_warns_that_they_stay_frozen() -> None:
    """transformers 4 held each expert as ``down_proj`` Linear layers; transformers 5 fuses them
    into one ``experts.down_proj`` parameter. On Qwen2-MoE ``["gate_proj", "up_proj",
    "down_proj"]`` matched only the shared expert's Linears and left the routed experts frozen,
    silently; it now warns and names the ``target_parameters`` that chain them."""
    import warnings

    from chainopt import ChainLoRAWarning

    spec = ["gate_proj", "up_proj", "down_proj"]
    model = _tiny_moe("qwen2_moe")
    advice = r"also names 1 bare parameter \['model.layers.0.mlp.experts.down_proj'\].*" + (
        r"target_parameters=\['experts.down_proj'\].*stay frozen"
    )
    with pytest.warns(ChainLoRAWarning, match=advice):
        opt = ChainLoRAOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=spec, knot_every=2
        )
    assert all(".shared_expert." in n for n in opt.config.modules)
    model = _tiny_moe("qwen2_moe")
    with warnings.catch_warnings():  # chained with target_parameters: nothing left to name
        warnings.simplefilter("error", ChainLoRAWarning)
        ChainLoRAOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=spec,
            target_parameters=["experts.down_proj"], knot_every=2,
        )  # fmt: skip
        ChainLoRAOptimizer(
            _tiny_moe("qwen2_moe"), torch.optim.SGD, knot_every=2,
            target_modules=["shared_expert.down_proj"],
        )  # fmt: skip


@pytest.mark.parametrize("spec", [["q_proj", "down_proj"], ["down_proj"]])
def test_a_target_name_of_fused_experts_only_is_refused_pointing_to_target_parameters(
    spec: list[str],
) -> None:
    """On Mixtral ``"down_proj"`` names no module but the fused experts: the refusal said "a
    typo or a name from another model: remove it"; it names ``target_parameters`` now."""
    model = _tiny_moe("mixtral")
    _refused(model, ValueError, r"'down_proj'.*target_parameters=\['experts.down_proj'\]",
             target_modules=spec)  # fmt: skip


def test_select_parameters_matches_suffixes_of_qualified_parameter_names() -> None:
    from torch.nn.utils import parametrize

    from chainopt.targets import select_parameters

    model = nn.Sequential()
    model.add_module("experts", nn.Module())
    model.experts.gate_up = nn.Parameter(torch.zeros(2, 4, 3))
    model.experts.down = nn.Parameter(torch.zeros(2, 3, 4))
    model.add_module("head", nn.Linear(3, 2))
    parametrize.register_parametrization(model.head, "weight", nn.Identity())

    def names(spec: Any) -> list[str]:
        return [name for name, *_ in select_parameters(model, spec)]

    assert names("gate_up") == ["experts.gate_up"]
    assert names(["experts.down", "head.weight"]) == ["experts.down", "head.weight"]
    assert names(re.compile(r"experts\..*")) == ["experts.gate_up", "experts.down"]
    assert names(lambda _n, p: p.dim() == 3) == ["experts.gate_up", "experts.down"]
    assert names("proj") == []  # a suffix is a whole name part
    [(_name, param, module, _tensor)] = select_parameters(model, "head.weight")
    assert (param, module) == ("weight", model.head)  # a parametrized tensor is found too


def test_all_linear_on_a_dense_model_does_not_warn() -> None:
    import warnings

    from chainopt import ChainLoRAWarning

    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChainLoRAWarning)
        ChainLoRAOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules="all-linear",
            knot_every=2,
        )  # fmt: skip


# --- names that match nothing, and hints ---


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_modules": ["0", "q_proj"]}, r"target_modules entry 'q_proj' matches no module"),
        ({"target_modules": {"0", "nope"}}, r"target_modules entry 'nope' matches no module"),
        ({"target_modules": ["0"], "trainable_modules": ["4", "head"]},
         r"trainable_modules entry 'head' matches no module"),
        ({"target_parameters": ["0.weight", "2.wieght"]},
         r"target_parameters entry '2.wieght' matches no parameter.*did you mean '2.weight'"),
    ],
)  # fmt: skip
def test_an_entry_that_matches_nothing_is_refused_naming_it(
    kwargs: dict[str, Any], match: str
) -> None:
    """One typo in a list of names was ignored as long as another entry matched: the chain
    silently adapted (or trained) less than asked."""
    _refused(mlp(), ValueError, match, **kwargs)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("all_linear", "did you mean the string 'all-linear'"),
        (["all-linear"], "did you mean the string 'all-linear' itself"),
        (r".*\.0", r"read as a name suffix, not a regex .*re\.compile"),
        (["0", "q_porj"], "did you mean 'q_proj'"),
    ],
)
def test_a_name_that_matches_nothing_gets_a_hint(spec: object, match: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Module())
    model[1].q_proj = nn.Linear(4, 4)
    _refused(model, ValueError, match, target_modules=spec)


def test_bytes_are_refused_as_the_bytes_given() -> None:
    """``b"0"`` was read as the list ``[48]`` and the message showed that list."""
    _refused(mlp(), TypeError, r"target_modules must be .* got bytes: b'0'", target_modules=b"0")


def test_either_name_of_a_module_registered_twice_matches_it_under_its_first_name() -> None:
    """A module held at two places was matched by its first name only: its second name
    ``"2"`` "matched no module"."""
    for spec in (["2"], ["0"], ["0", "2"], re.compile("2")):
        lin = nn.Linear(4, 4)
        model = nn.Sequential(lin, nn.Tanh(), lin)
        opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                 target_modules=spec, rank=2, knot_every=2)  # fmt: skip
        assert opt.config.modules == ("0",), spec
        assert [m for _, m in opt.adapted_modules()] == [lin]


def test_a_model_on_the_meta_device_is_refused_before_anything_changes() -> None:
    """A chain built on the meta device drew its factors there; ``to_empty()`` then filled A
    and B with garbage (the model's function changed) and replaced the Parameters the
    optimizer held (it stepped nothing)."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.Module())
        model[1].w = nn.Parameter(torch.empty(2, 4, 4))
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    before = fingerprint(model, base)
    for kwargs in ({"target_modules": ["0"]}, {"target_parameters": ["1.w"]}):
        with pytest.raises(
            ValueError, match=r"matches '[01][.w]*', whose parameters are on the meta"
        ):
            ChainLoRAOptimizer(model, base, rank=2, knot_every=2, **kwargs)
        assert_same(before, fingerprint(model, base))


class _TiedPair(nn.Module):
    """Two Linear layers holding one weight, and one layer of its own."""

    def __init__(self, free: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight
        if free:
            self.c = nn.Linear(8, 8)


def test_a_spec_matching_nothing_suggests_only_modules_a_link_can_adapt() -> None:
    """ "Modules a link can adapt include ..." must not name tied layers, which are refused;
    ``"all-linear"`` matching nothing says what it leaves out."""
    with pytest.raises(ValueError, match=r"adapt include \['c'\]$"):
        ChainLoRAOptimizer(_TiedPair(free=True), lambda p: torch.optim.SGD(p, lr=0.1),
                           target_modules=["nope"], rank=2, knot_every=1)  # fmt: skip
    all_linear = r"'all-linear' matches no module.*leaves out.*tied"
    with pytest.raises(ValueError, match=all_linear) as err:
        ChainLoRAOptimizer(_TiedPair(free=False), lambda p: torch.optim.SGD(p, lr=0.1),
                           target_modules="all-linear", rank=2, knot_every=1)  # fmt: skip
    assert "'a'" not in str(err.value) and "'b'" not in str(err.value)
