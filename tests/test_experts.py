"""Links on bare parameters (``target_parameters``): fused mixture-of-experts weights, routers."""

from __future__ import annotations

import copy
import io
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from strategies import tolerance
from torch import nn
from torch.nn.utils import parametrize

from chainopt import ChainLoRAOptimizer, merge_and_unload, merged_state_dict
from chainopt._experts import ParameterLink, cached_forward
from chainopt._marks import PARAMETER_ORDER
from chainopt.advice import ChainLoRAWarning

GATE_UP, DOWN = "experts.gate_up_proj", "experts.down_proj"
EXPERTS = "model.layers.0.mlp.experts"


def _tiny_mixtral(experts_implementation: str | None = None) -> nn.Module:
    """transformers' default experts forward (``grouped_mm``) reads each fused parameter once;
    ``"eager"`` loops over the experts and reads ``self.gate_up_proj[e]`` for each."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32,
        experts_implementation=experts_implementation,
    )  # fmt: skip
    return MixtralForCausalLM(cfg)


class ToyExperts(nn.Module):
    """``E`` experts in one 3-D parameter, ``(E, out, in)`` or, transposed, ``(E, in, out)``;
    the forward reads ``self.w[e]`` once per expert, as transformers' experts modules do."""

    def __init__(self, e: int, out: int, inp: int, transposed: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.is_transposed = transposed
        shape = (e, inp, out) if transposed else (e, out, inp)
        self.w = nn.Parameter(torch.randn(shape, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, in) -> (n, out)
        parts = [x @ w if self.is_transposed else x @ w.T for w in self.w]  # one read per expert
        return torch.stack(parts).sum(0)


class Toy(nn.Module):
    """Experts and a router kept as a bare 2-D ``weight``."""

    def __init__(
        self, e: int = 3, out: int = 5, inp: int = 6, transposed: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:  # fmt: skip
        super().__init__()
        self.experts = ToyExperts(e, out, inp, transposed, dtype)
        self.router = nn.Module()
        self.router.weight = nn.Parameter(torch.randn(2, out, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.experts(x)), self.router.weight)


def _expected(w: torch.Tensor, link: ParameterLink, transposed: bool) -> torch.Tensor:
    """``W_e + s·B_e·A_e`` per expert from the factors' definition (float64 einsum)."""
    e = link.experts
    a = link.lora_A.detach().double().view(e, -1, link.in_features)  # (E, r, in): rows e·r + j
    b = link.lora_B.detach().double().view(link.out_features, -1, e)  # column j·E + e
    delta = torch.einsum("ore,eri->eoi", b, a) * link.scale
    return w.double() + (delta.mT if transposed else delta)


def _states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- knots are exact per expert ---------------------------------------------------------------


@given(
    e=st.integers(1, 4),
    out=st.integers(1, 7),
    inp=st.integers(1, 7),
    data=st.data(),
    transposed=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    alpha=st.sampled_from([0.5, 2.0, 16.0]),
)
def test_a_knot_keeps_the_function_and_merges_each_expert_exactly(
    e: int, out: int, inp: int, data: Any, transposed: bool, dtype: torch.dtype, alpha: float
) -> None:
    rank = data.draw(st.integers(1, min(out, inp)))
    torch.manual_seed(0)
    model = Toy(e, out, inp, transposed, dtype)
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_parameters=["experts.w"],
        rank=rank, alpha=alpha, knot_every=100,
    )  # fmt: skip
    [record] = opt.chain.records
    link = record.link
    assert isinstance(link, ParameterLink)
    assert tuple(link.lora_A.shape) == (rank * e, inp)
    assert tuple(link.lora_B.shape) == (out, rank * e)
    with torch.no_grad():
        link.lora_A.normal_()
        link.lora_B.normal_()
    x = torch.randn(4, inp, dtype=dtype)
    with torch.no_grad():
        before = model(x)
    expected = _expected(record.weight.detach(), link, transposed)
    old_a = link.lora_A.detach().clone()

    opt.tie_knot()

    torch.testing.assert_close(record.weight.detach().double(), expected, **tolerance(dtype))
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **tolerance(dtype))
    assert bool((link.lora_B == 0).all())
    bound = 1 / inp**0.5
    assert not torch.equal(link.lora_A, old_a)
    assert bool((link.lora_A.abs() <= bound).all())


def test_the_router_and_the_experts_are_linked_separately() -> None:
    """Two records, named after their parameters; a 2-D parameter is a plain link."""
    model = Toy()
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1),
        target_parameters=["experts.w", "router.weight"], rank=2, knot_every=5,
    )  # fmt: skip
    assert opt.config.modules == ("experts.w", "router.weight")
    assert opt.config.parameters == opt.config.modules
    assert [(n, m) for n, m in opt.adapted_modules()] == [
        ("experts.w", model.experts),
        ("router.weight", model.router),
    ]
    router = opt.chain.records[1].link
    assert router.experts == 1 and tuple(router.lora_B.shape) == (2, 2)
    keys = [k for k in model.state_dict() if "lora" in k]
    assert keys == [
        "experts.parametrizations.w.0.lora_A",
        "experts.parametrizations.w.0.lora_B",
        "router.parametrizations.weight.0.lora_A",
        "router.parametrizations.weight.0.lora_B",
    ]


# --- forward: once per call, gradients reach the factors ----------------------------------------


def test_the_parametrization_runs_once_per_forward_and_gradients_reach_the_factors() -> None:
    model = _tiny_mixtral("eager")
    ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1),
        target_parameters=[GATE_UP, DOWN], rank=2, knot_every=5,
    )  # fmt: skip
    experts = model.get_submodule(EXPERTS)
    plists = experts.parametrizations
    calls = {"gate_up_proj": 0, "down_proj": 0}

    def count(name: str) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            calls[name] += 1

        return hook

    for name in calls:
        plists[name][0].register_forward_hook(count(name))
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert calls == {"gate_up_proj": 1, "down_proj": 1}  # the eager loop reads each per expert
    for name in calls:
        link = plists[name][0]
        assert link.lora_B.grad is not None and bool(link.lora_B.grad.abs().sum() > 0)
        assert link.lora_A.grad is not None  # zero while B is: d/dA = s·Bᵀ·…
    # without the cached forward each read of experts.<param>[e] computes W + Δ again
    calls.update(gate_up_proj=0, down_proj=0)
    base = parametrize.type_before_parametrizations(experts)
    with torch.no_grad():
        base.forward(experts, torch.randn(8, 16), *_routing(8))
    assert calls["gate_up_proj"] > 1


def _routing(tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.tensor([[0, 1], [2, 3]]).repeat(tokens // 2, 1)  # every expert hit
    return index, torch.full((tokens, 2), 0.5)


def test_a_chained_mixtral_compiles_to_one_graph_and_a_knot_causes_no_recompile() -> None:
    """The cached forward is traceable: torch.compile(fullgraph=True) takes the experts' forward
    (transformers' dispatching wrapper) inside ``parametrize.cached()``; the flags the links set
    while read are set by the compiled model as by the eager one."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _tiny_mixtral()
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2),
        target_parameters=[GATE_UP, DOWN, "mlp.gate.weight"], rank=2, knot_every=2,
    )  # fmt: skip
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(5):  # one graph for all: where the links note they are read (read_in_owner,
        # set at the first step) is no guard, and the knots (steps 2 and 4) recompile nothing
        compiled(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.knots_tied == 2
    assert counters["stats"]["unique_graphs"] == graphs + 1
    links = [r.link for r in opt.chain.records]
    assert all(isinstance(k, ParameterLink) and k.read_in_owner for k in links)
    assert not any(isinstance(k, ParameterLink) and k.read_elsewhere for k in links)
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)


# --- training ----------------------------------------------------------------------------------


def test_training_with_knots_changes_the_experts_and_lowers_the_loss() -> None:
    model = _tiny_mixtral()
    experts = model.get_submodule(EXPERTS)
    start = {n: p.detach().clone() for n, p in experts.named_parameters()}
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2),
        target_modules="all-linear", target_parameters=[GATE_UP, DOWN, "mlp.gate.weight"],
        rank=2, knot_every=4,
    )  # fmt: skip
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert opt.knots_tied == 3
    assert losses[-1] < losses[0] - 0.05
    for name in ("gate_up_proj", "down_proj"):
        original = experts.parametrizations[name].original
        assert not torch.equal(original, start[name])
        for e in range(original.shape[0]):  # every expert's slice took a merge
            assert not torch.equal(original[e], start[name][e])
    assert set(opt.history.knots[0].norms) >= {f"{EXPERTS}.gate_up_proj", f"{EXPERTS}.down_proj"}


def _roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_resume_equals_uninterrupted_training_bitwise_with_a_rank_step_down() -> None:
    def build() -> tuple[nn.Module, ChainLoRAOptimizer]:
        model = _tiny_mixtral()
        opt = ChainLoRAOptimizer(
            model, torch.optim.AdamW(model.parameters(), lr=1e-2),
            target_modules=["q_proj"], target_parameters=[GATE_UP, DOWN],
            rank=[4, 2], alpha=8, knot_every=3, seed=5,
        )  # fmt: skip
        return model, opt

    ids = torch.randint(0, 64, (7, 2, 12), generator=torch.Generator().manual_seed(0))

    def run(model: nn.Module, opt: ChainLoRAOptimizer, batches: torch.Tensor) -> None:
        for b in batches:
            model(input_ids=b, labels=b).loss.backward()
            opt.step()
            opt.zero_grad()

    m1, o1 = build()
    run(m1, o1, ids)
    m2, o2 = build()
    run(m2, o2, ids[:4])  # mid-link, after a knot that stepped the rank down to 2
    sd_m, sd_o = _roundtrip(m2.state_dict()), _roundtrip(o2.state_dict())
    m3, o3 = build()  # rank 4 again until the load resizes it
    m3.load_state_dict(sd_m)
    o3.load_state_dict(sd_o)
    run(m3, o3, ids[4:])
    assert o3.knots_tied == o1.knots_tied == 2
    link = m3.get_submodule(EXPERTS).parametrizations.gate_up_proj[0]
    assert tuple(link.lora_A.shape) == (2 * 4, 16)
    final = m3.state_dict()
    for k, v in m1.state_dict().items():
        assert torch.equal(v, final[k]), k


# --- half precision ----------------------------------------------------------------------------


def test_bf16_experts_get_a_merge_residual_and_a_zero_knot_is_bitwise_idempotent() -> None:
    torch.manual_seed(0)
    model = Toy(e=3, out=5, inp=6, transposed=True, dtype=torch.bfloat16)
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_parameters=["experts.w"],
        rank=2, knot_every=100,
    )  # fmt: skip
    [record] = opt.chain.records
    link = record.link
    assert link.lora_A.dtype == torch.float32
    residual = link.merge_residual
    assert residual is not None and residual.shape == record.weight.shape
    assert residual.dtype == torch.bfloat16
    with torch.no_grad():
        link.lora_B.normal_(std=1e-3)  # small: most of it is below a bfloat16 ulp of W
    exact = _expected(record.weight.detach(), link, transposed=True)
    opt.tie_knot()
    kept = record.weight.double() + residual.double()
    torch.testing.assert_close(kept, exact, rtol=0, atol=1e-5)
    assert bool(residual.abs().sum() > 0)
    weight, res = record.weight.detach().clone(), residual.clone()
    opt.tie_knot()  # B is zero: nothing may move
    assert torch.equal(record.weight, weight)
    assert torch.equal(link.merge_residual, res)


# --- leaving the chain -------------------------------------------------------------------------


def test_merge_and_unload_gives_the_plain_model_with_the_chains_function() -> None:
    model = _tiny_mixtral()
    plain_keys = list(model.state_dict())
    order = [n for n, _ in model.get_submodule(EXPERTS).named_parameters()]
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2),
        target_modules=["q_proj"], target_parameters=[GATE_UP, DOWN, "mlp.gate.weight"],
        rank=2, knot_every=2,
    )  # fmt: skip
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    for _ in range(3):  # a knot, and a pending link
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    merged = merged_state_dict(model)
    assert list(merged) == plain_keys

    opt.merge_and_unload()

    experts = model.get_submodule(EXPERTS)
    assert type(experts).__name__ == "MixtralExperts" and not parametrize.is_parametrized(experts)
    assert type(model.get_submodule("model.layers.0.mlp.gate")).__name__ == "MixtralTopKRouter"
    assert PARAMETER_ORDER not in experts.__dict__
    assert [n for n, _ in experts.named_parameters()] == order
    assert list(model.state_dict()) == plain_keys
    assert [k for k in vars(model) if "chainopt" in k] == ["_chainopt_base_merged"]  # what it holds
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, merged[k]), k


def test_a_merged_state_dict_loads_into_a_new_chain_as_plain_keys() -> None:
    model = _tiny_mixtral()
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2),
        target_parameters=[GATE_UP, DOWN], rank=2, knot_every=2,
    )  # fmt: skip
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    merged = merged_state_dict(model)

    other = _tiny_mixtral()
    ChainLoRAOptimizer(
        other, torch.optim.AdamW(other.parameters(), lr=1e-2),
        target_parameters=[GATE_UP, DOWN], rank=2, knot_every=2,
    )  # fmt: skip
    other.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
    link = other.get_submodule(EXPERTS).parametrizations.down_proj[0]
    assert bool((link.lora_B == 0).all())


def test_unloading_one_parameter_keeps_the_other_linked_and_cached() -> None:
    model = _tiny_mixtral()
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1),
        target_parameters=[GATE_UP, DOWN], rank=2, knot_every=5,
    )  # fmt: skip
    first, second = opt.chain.records
    experts = first.module
    first.unload()
    assert list(experts.parametrizations) == ["down_proj"]
    assert type(experts).forward is cached_forward
    assert isinstance(experts._parameters["gate_up_proj"], nn.Parameter)
    assert first.link.unloaded and not second.link.unloaded
    second.unload()
    assert type(experts).__name__ == "MixtralExperts"
    assert [n for n, _ in experts.named_parameters()] == ["gate_up_proj", "down_proj"]


def _trained_mixtral(keep_history: bool) -> tuple[nn.Module, ChainLoRAOptimizer, torch.Tensor]:
    model = _tiny_mixtral()
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules=["q_proj"],
        target_parameters=[GATE_UP, DOWN, "mlp.gate.weight"], rank=[3, 2], knot_every=2,
        keep_history=keep_history,
    )  # fmt: skip
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(5):  # two knots, a pending link
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, opt, ids


@pytest.mark.parametrize("keep_history", [True, False])
def test_the_exported_peft_adapter_loads_to_the_chains_function(
    tmp_path: Any, keep_history: bool
) -> None:
    """From the history, or from the original weights (``base=``): PEFT's ``target_parameters``
    with each expert's links stacked, rank Σr (3 + 2 + 2 = 7)."""
    import json

    from peft import PeftModel

    from chainopt import export_peft_adapter

    original = _states(_tiny_mixtral())
    model, opt, ids = _trained_mixtral(keep_history)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    report = export_peft_adapter(opt, tmp_path, base=None if keep_history else original)
    assert report.rank == 7 and report.relative_error < 1e-6
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == [
        "model.layers.0.mlp.gate.weight", f"{EXPERTS}.gate_up_proj", f"{EXPERTS}.down_proj",
    ]  # fmt: skip
    loaded = PeftModel.from_pretrained(_tiny_mixtral(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
    small = export_peft_adapter(
        opt, tmp_path / "small", rank=2, base=None if keep_history else original
    )
    assert small.rank == 2 and 0 < small.relative_error < 1


def test_gpt_oss_transposed_experts_merge_and_export_exactly(tmp_path: Any) -> None:
    """GPT-OSS stores its experts ``(E, in, out)`` (``is_transposed``): PEFT's layout rule."""
    from peft import PeftModel
    from transformers import GptOssConfig, GptOssForCausalLM

    from chainopt import export_peft_adapter

    cfg = GptOssConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=32, head_dim=8,
        layer_types=["full_attention"],
    )  # fmt: skip

    def build() -> nn.Module:
        torch.manual_seed(0)
        return GptOssForCausalLM(cfg)

    model = build()
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2),
        target_parameters=[GATE_UP, DOWN], rank=2, knot_every=2, keep_history=True,
    )  # fmt: skip
    up = opt.chain.records[0].link
    assert up.fan_in_fan_out and (up.in_features, up.out_features) == (16, 48)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    export_peft_adapter(opt, tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)


def test_export_peft_adapter_refuses_what_it_cannot_write(tmp_path: Any) -> None:
    from chainopt import export_peft_adapter

    model = Toy()  # not a Hugging Face model: where PEFT nests the wrappers is unknown
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_parameters=["experts.w"],
        rank=2, knot_every=5, keep_history=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"Hugging Face model.*save_merged"):
        export_peft_adapter(opt, tmp_path / "adapter")
    model = Toy()
    model.head = nn.Linear(2, 2)
    biased = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["head"],
        target_parameters=["experts.w"], rank=2, knot_every=5, lora_bias=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"lora_bias=True.*target_parameters"):
        export_peft_adapter(biased, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_save_merged_and_save_pretrained_reload_with_from_pretrained(tmp_path: Any) -> None:
    from transformers import MixtralForCausalLM

    from chainopt import save_merged

    model, opt, ids = _trained_mixtral(False)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    save_merged(opt, tmp_path / "merged")
    model.save_pretrained(tmp_path / "own")  # the model's own save writes the merged model too
    for where in ("merged", "own"):
        plain = MixtralForCausalLM.from_pretrained(tmp_path / where)
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids).logits, trained, rtol=0, atol=1e-6)


# --- "all-linear" ------------------------------------------------------------------------------


def _all_linear_warnings(model: nn.Module | None = None, **kwargs: Any) -> list[str]:
    """The ChainLoRAWarnings of an ``"all-linear"`` chain at rank 2 (default: a tiny Mixtral)."""
    model = _tiny_mixtral() if model is None else model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ChainLoRAOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules="all-linear",
            rank=2, knot_every=5, **kwargs,
        )  # fmt: skip
    return [str(w.message) for w in caught if issubclass(w.category, ChainLoRAWarning)]


def test_all_linear_names_what_it_leaves_out_and_points_to_target_parameters() -> None:
    [message] = _all_linear_warnings()
    for name in ("experts.gate_up_proj", "experts.down_proj", "mlp.gate.weight"):
        assert f"model.layers.0.mlp.{name.removeprefix('mlp.')}" in message
    assert (
        "target_parameters=['gate.weight', 'experts.gate_up_proj', 'experts.down_proj']" in message
    )
    assert message.index("target_parameters=[") < message.index("PeftModel")


def test_all_linear_does_not_list_the_parameters_target_parameters_adapts() -> None:
    [message] = _all_linear_warnings(target_parameters=[GATE_UP, DOWN])
    assert "gate_up_proj" not in message and "down_proj" not in message
    assert "model.layers.0.mlp.gate.weight" in message
    assert _all_linear_warnings(target_parameters=[GATE_UP, DOWN, "mlp.gate.weight"]) == []


# --- refusals leave the model untouched --------------------------------------------------------


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Module(), nn.Module()
        self.a.w = nn.Parameter(torch.randn(2, 4, 4))
        self.b.w = self.a.w


class _Overlap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        whole = torch.randn(2, 4, 4)
        self.a = nn.Module()
        self.a.w = nn.Parameter(whole)
        self.b = nn.Module()
        self.b.w = nn.Parameter(whole[0])  # a view of a.w's memory


def _parametrized() -> nn.Module:
    model = Toy()

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    parametrize.register_parametrization(model.experts, "w", Double())
    return model


def _with_dtype(dtype: torch.dtype) -> nn.Module:
    model = Toy()
    model.experts.w = nn.Parameter(torch.zeros(3, 5, 6).to(dtype), requires_grad=False)
    return model


def _params4bit() -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    model = Toy()
    model.experts.w = bnb.nn.Params4bit(torch.randn(3, 5, 6), requires_grad=False)
    return model


REFUSALS: list[tuple[str, Callable[[], nn.Module], dict[str, Any], type[Exception], str]] = [
    ("no match", Toy, {"target_parameters": ["nope"]}, ValueError,
     r"target_parameters=\['nope'\] matches no parameter.*'experts\.w'"),
    ("1-D", _tiny_mixtral, {"target_parameters": ["input_layernorm.weight"]}, ValueError,
     r"matches 'model.layers.0.input_layernorm.weight', a torch.float32 tensor of shape \(16,\)"),
    ("also a target module", _tiny_mixtral,
     {"target_modules": ["q_proj"], "target_parameters": ["q_proj.weight"]}, ValueError,
     r"q_proj.weight', a parameter of a module target_modules adapts"),
    ("rank", _tiny_mixtral, {"target_parameters": [DOWN], "rank": 17}, ValueError,
     r"rank must be .* min\(in_features, out_features\)=16 of each expert"),
    ("tied", _Tied, {"target_parameters": ["a.w"]}, ValueError, r"shared with \['b.w'\]"),
    ("shared memory", _Overlap, {"target_parameters": ["a.w"]}, ValueError,
     r"shares memory with \['b.w'\]"),
    ("parametrized", _parametrized, {"target_parameters": ["experts.w"]}, ValueError,
     r"already parametrized"),
    ("int8", lambda: _with_dtype(torch.int8), {"target_parameters": ["experts.w"]}, ValueError,
     r"torch.int8 tensor of shape \(3, 5, 6\)"),
    ("float8", lambda: _with_dtype(torch.float8_e4m3fn), {"target_parameters": ["experts.w"]},
     ValueError, r"torch.float8_e4m3fn tensor"),
    ("4-bit", _params4bit, {"target_parameters": ["experts.w"]}, TypeError,
     r"matches 'experts.w', a Params4bit .*plain float Parameters only"),
    ("trainable", Toy, {"target_parameters": ["experts.w"], "trainable_modules": ["experts"]},
     ValueError, r"a parameter of a module trainable_modules trains whole"),
    ("gradient init", Toy, {"target_parameters": ["experts.w"], "init": "gradient"},
     ValueError, r"init='gradient' with target_parameters"),
    ("lora_bias", Toy, {"target_parameters": ["experts.w"], "lora_bias": True}, ValueError,
     r"lora_bias=True but target_parameters adapts no bias"),
    ("neither", Toy, {}, TypeError, r"target_modules is required.*target_parameters"),
    ("bad spec", Toy, {"target_parameters": 3}, TypeError, r"target_parameters must be a str"),
    ("factory", Toy, {"target_parameters": ["experts.w"], "optimizer": lambda params: None},
     TypeError, r"optimizer factory must return"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("build", "kwargs", "error", "match"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSALS],
)
def test_refusals_name_the_argument_and_leave_the_model_untouched(
    build: Callable[[], nn.Module], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    model = build()
    before = _states(model)
    types = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    optimizer = kwargs.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match=match):
        ChainLoRAOptimizer(model, optimizer, knot_every=5, **{"rank": 2, **kwargs})
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert v.dtype == after[k].dtype and torch.equal(v.float(), after[k].float()), k
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_target_parameters_on_a_peft_model_is_refused() -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_mixtral(), LoraConfig(r=2, target_modules=["q_proj"]))
    before = _states(model)
    with pytest.raises(ValueError, match=r"target_parameters=\['experts.down_proj'\].*PEFT"):
        ChainLoRAOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), target_parameters=[DOWN],
            knot_every=5,
        )  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_regex_a_set_and_a_callable_select_parameters() -> None:
    for spec in (
        re.compile(r".*experts\.(gate_up|down)_proj"),
        {DOWN, GATE_UP},
        (name for name in (GATE_UP, DOWN)),  # read more than once: taken as its list
        lambda name, p: p.dim() == 3,
    ):
        model = _tiny_mixtral()
        opt = ChainLoRAOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), target_parameters=spec,
            rank=2, knot_every=5,
        )  # fmt: skip
        assert opt.config.parameters == (f"{EXPERTS}.gate_up_proj", f"{EXPERTS}.down_proj")


def test_a_deep_copy_of_the_chained_model_keeps_its_links() -> None:
    model = Toy()
    ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_parameters=["experts.w"],
        rank=2, knot_every=5,
    )  # fmt: skip
    clone = copy.deepcopy(model)
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x))
    merge_and_unload(clone)
    assert type(clone.experts) is ToyExperts
    assert parametrize.is_parametrized(model.experts)


def test_a_second_chain_on_the_same_model_is_refused() -> None:
    model = Toy()
    ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_parameters=["experts.w"],
        rank=2, knot_every=5,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"already wrapped by a ChainLoRAOptimizer.*experts\.w"):
        ChainLoRAOptimizer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), target_parameters=["router.weight"],
            rank=2, knot_every=5,
        )  # fmt: skip


def test_factors_that_do_not_fit_the_experts_are_refused_before_anything_loads() -> None:
    model = Toy(e=3, out=5, inp=6)
    ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_parameters=["experts.w"],
        rank=[2, 1], knot_every=5,
    )  # fmt: skip
    before = _states(model)
    state = _states(model)
    state["experts.parametrizations.w.0.lora_A"] = torch.zeros(2, 6)  # rank 2 of one expert only
    state["experts.parametrizations.w.0.lora_B"] = torch.zeros(5, 2)
    with pytest.raises(ValueError, match=r"do not fit a link over 3 expert\(s\) of \(5, 6\)"):
        model.load_state_dict(state)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    state["experts.parametrizations.w.0.lora_A"] = torch.ones(3, 6)  # rank 1 for each expert: fits
    state["experts.parametrizations.w.0.lora_B"] = torch.ones(5, 3)
    model.load_state_dict(state)
    link = model.experts.parametrizations.w[0]
    assert (link.rank, link.scale) == (1, 16.0)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_other_moe_families_train_knot_and_merge(family: str) -> None:
    """Qwen3-MoE and OLMoE store their experts as Mixtral does; the router is a bare weight."""
    import transformers

    kinds = {
        "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", {"moe_intermediate_size": 24}),
        "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", {"pad_token_id": 0, "eos_token_id": 1}),
    }
    config_name, class_name, extra = kinds[family]
    cfg = getattr(transformers, config_name)(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
        head_dim=8, max_position_embeddings=32, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(cfg)
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules="all-linear",
        target_parameters=[GATE_UP, DOWN, "mlp.gate.weight"], rank=2, knot_every=2,
    )  # fmt: skip
    assert len(opt.config.parameters) == 3
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    start = model.get_submodule(EXPERTS).parametrizations.down_proj.original.detach().clone()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model.get_submodule(EXPERTS).parametrizations.down_proj.original, start)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    merge_and_unload(model)
    assert not parametrize.is_parametrized(model.get_submodule(EXPERTS))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)


class _Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int = 24) -> None:
        self.ids = torch.randint(0, 64, (n, 10), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _mixtral_trainer(out: Any) -> tuple[nn.Module, ChainLoRAOptimizer, Any]:
    from transformers import Trainer, TrainingArguments

    from chainopt.integrations.transformers import ChainLoRACallback, create_chain_optimizer

    args = TrainingArguments(
        output_dir=str(out), report_to="none", use_cpu=True, disable_tqdm=True, max_steps=6,
        per_device_train_batch_size=2, save_strategy="steps", save_steps=4, logging_steps=1,
        seed=1, learning_rate=1e-2,
    )  # fmt: skip
    model = _tiny_mixtral()
    opt = create_chain_optimizer(
        model, args, target_parameters=[GATE_UP, DOWN, "mlp.gate.weight"], rank=2, knot_every=3,
        seed=5,
    )  # fmt: skip
    trainer = Trainer(
        model=model, args=args, train_dataset=_Tokens(), optimizers=(opt, None),
        callbacks=[ChainLoRACallback()],
    )  # fmt: skip
    return model, opt, trainer


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5: activation_checkpointing
def test_the_trainer_saves_the_merged_model_and_resumes_mid_link_bitwise(tmp_path: Any) -> None:
    from transformers import MixtralForCausalLM

    model, opt, trainer = _mixtral_trainer(tmp_path / "straight")
    trainer.train()
    assert opt.optimizer_steps == 6 and opt.knots_tied == 2
    ids = _Tokens().ids[:2]
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    trainer.save_model(str(tmp_path / "final"))
    loaded, info = MixtralForCausalLM.from_pretrained(tmp_path / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)

    resumed_model, resumed, trainer2 = _mixtral_trainer(tmp_path / "resumed")
    trainer2.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-4"))
    assert resumed.optimizer_steps == 6 and resumed.knots_tied == 2
    a, b = model.state_dict(), resumed_model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- other families: what the sweep (scripts/probe_moe_archs.py) found ---------------------------


def _tiny_qwen2_moe() -> nn.Module:
    """A shared expert gated by ``shared_expert_gate``, an ``nn.Linear(hidden, 1)``."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
        shared_expert_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    return Qwen2MoeForCausalLM(cfg)


def test_all_linear_leaves_out_and_names_layers_narrower_than_the_rank() -> None:
    """Qwen2-MoE (and Qwen3-Next, Qwen3.5-MoE) gate the shared expert with a Linear of one
    output: "all-linear" at rank 2 adapts the rest and names it frozen, rather than refusing
    the whole model (or leaving it out unsaid)."""
    model = _tiny_qwen2_moe()
    gate = "model.layers.0.mlp.shared_expert_gate"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = ChainLoRAOptimizer(
            model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules="all-linear",
            target_parameters=[GATE_UP, DOWN, "mlp.gate.weight"], rank=2, knot_every=2,
        )  # fmt: skip
    ours = [w for w in caught if issubclass(w.category, ChainLoRAWarning)]
    assert all(w.filename == __file__ for w in ours)  # the caller's line, not chainopt's
    messages = [str(w.message) for w in ours]
    [narrow] = [m for m in messages if "narrower than rank=2" in m]
    assert repr(gate) in narrow and "trainable_modules" in narrow
    assert gate not in opt.config.modules
    assert "model.layers.0.mlp.shared_expert.gate_proj" in opt.config.modules
    assert not model.get_submodule(gate).weight.requires_grad
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.knots_tied == 1
    # trainable_modules trains it whole beside "all-linear", and nothing is left unsaid
    whole = _tiny_qwen2_moe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chained = ChainLoRAOptimizer(
            whole, torch.optim.SGD(whole.parameters(), lr=0.1), target_modules="all-linear",
            trainable_modules=["shared_expert_gate"], rank=2, knot_every=2,
        )  # fmt: skip
    assert not any("narrower than rank" in str(w.message) for w in caught)
    assert whole.get_submodule(gate).weight.requires_grad
    assert gate in chained.config.trainable


def test_export_refuses_what_peft_cannot_inject_before_writing(tmp_path: Any) -> None:
    """Ergo keeps a per-expert norm ``(E, H)`` in a submodule of its experts: PEFT wraps
    ``experts`` for ``up_proj`` and then cannot find ``experts.post_expert_norm`` (an
    AttributeError in its loader). The export refuses with a ValueError and writes nothing."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "ErgoForCausalLM"):
        pytest.skip("this transformers has no Ergo")
    from chainopt import export_peft_adapter

    cfg = transformers.ErgoConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=8, shared_intermediate_size=8, first_dense_intermediate_size=8,
        num_dense_blocks=0, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ErgoForCausalLM(cfg)
    norm = "experts.post_expert_norm.weight"
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2),
        target_parameters=["experts.up_proj", "experts.down_proj", norm], rank=2, knot_every=2,
        keep_history=True,
    )  # fmt: skip
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with pytest.raises(ValueError, match=r"PEFT would not load .*AttributeError.*post_expert_norm"):
        export_peft_adapter(opt, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_export_refuses_parameters_another_module_reads(tmp_path: Any) -> None:
    """DBRX's experts module reads its child's ``mlp.w1`` / ``v1`` / ``w2`` itself and passes
    them to the child's forward: PEFT's wrapper of ``mlp`` would serve no such attribute (its
    loader fails after the files are written). chainopt's links see where they are read, and the
    export refuses before writing; Mixtral's are read in their own module's forward."""
    from transformers import DbrxConfig, DbrxForCausalLM

    from chainopt import export_peft_adapter

    cfg = DbrxConfig(
        vocab_size=64, d_model=16, n_heads=2, n_layers=1, max_seq_len=32,
        attn_config={"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 8, "moe_num_experts": 4, "moe_top_k": 2},
    )  # fmt: skip
    torch.manual_seed(0)
    model = DbrxForCausalLM(cfg)
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2),
        target_parameters=["mlp.w1", "mlp.v1", "mlp.w2"], rank=2, knot_every=2, keep_history=True,
    )  # fmt: skip
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    link = opt.chain.records[0].link
    assert isinstance(link, ParameterLink)
    assert link.read_elsewhere and not link.read_in_owner
    with pytest.raises(ValueError, match=r"read by another module.*mlp\.w1.*nothing was written"):
        export_peft_adapter(opt, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()

    # an export script: a new chain resumed from the state, no forward run in it
    saved, weights = copy.deepcopy(opt.state_dict()), _states(model)
    torch.manual_seed(0)
    resumed = DbrxForCausalLM(cfg)
    resumed_opt = ChainLoRAOptimizer(
        resumed, torch.optim.AdamW(resumed.parameters(), lr=1e-2),
        target_parameters=["mlp.w1", "mlp.v1", "mlp.w2"], rank=2, knot_every=2, keep_history=True,
    )  # fmt: skip
    bad = copy.deepcopy(saved)
    bad["chainopt"]["read"] = {"transformer.blocks.0.ffn.experts.mlp.w1": [True]}
    with pytest.raises(ValueError, match=r"\['read'\] must map"):
        resumed_opt.load_state_dict(bad)
    assert resumed_opt.optimizer_steps == 0
    resumed_opt.load_state_dict(saved)
    resumed.load_state_dict(weights)
    with pytest.raises(ValueError, match=r"read by another module.*mlp\.w1.*nothing was written"):
        export_peft_adapter(resumed_opt, tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists()

    mixtral, mixtral_opt, _ids = _trained_mixtral(True)
    with torch.no_grad():
        _ = mixtral.get_submodule(EXPERTS).gate_up_proj  # a look from outside refuses nothing
    [gate_up] = [r.link for r in mixtral_opt.chain.records if r.name.endswith("gate_up_proj")]
    assert isinstance(gate_up, ParameterLink) and gate_up.read_in_owner
    export_peft_adapter(mixtral_opt, tmp_path / "mixtral")
    assert (tmp_path / "mixtral" / "adapter_config.json").exists()


def test_all_linear_suggests_only_the_parameters_a_link_of_the_rank_fits() -> None:
    """Ernie 4.5 keeps a ``(1, E)`` ``e_score_correction_bias`` beside its experts: named as
    left out, but not suggested for ``target_parameters`` at rank 2 (it would be refused);
    the suggestion, taken as it is with the bias's module trained whole, leaves nothing out."""
    import ast

    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    cfg = Ernie4_5_MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, moe_num_experts=4,
        moe_k=2, moe_num_shared_experts=1, max_position_embeddings=32,
    )  # fmt: skip

    def chain(**kwargs: Any) -> list[str]:
        torch.manual_seed(0)
        return _all_linear_warnings(Ernie4_5_MoeForCausalLM(cfg), **kwargs)

    [message] = chain()
    assert "model.layers.1.mlp.gate.moe_statics.e_score_correction_bias" in message
    assert "['moe_statics.e_score_correction_bias'] cannot take a link of rank=2" in message
    found = re.search(r"target_parameters=(\[[^\]]*\])", message)
    assert found is not None
    suggested = ast.literal_eval(found.group(1))
    assert "experts.gate_up_proj" in suggested
    assert not any("e_score_correction_bias" in s for s in suggested)
    assert chain(target_parameters=suggested, trainable_modules=["moe_statics"]) == []
