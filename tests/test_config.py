"""ChainConfig.from_kwargs: every bad argument and unsafe model is refused, nothing changed."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from models import mlp, requires_grad_map, snapshot
from torch import nn

from chainopt import ChainConfig, ChainLoRAOptimizer
from chainopt._attach import lora_parametrization
from chainopt.config import CONFIG_ARGUMENTS


def _untouched(model: nn.Module, before: dict[str, torch.Tensor], grads: dict[str, bool]) -> None:
    assert all(lora_parametrization(m) is None for m in model.modules())
    assert requires_grad_map(model) == grads
    after = snapshot(model)
    assert list(after) == list(before)  # same keys in the same order
    assert all(torch.equal(before[k], after[k]) for k in before)


def _refused(model: nn.Module, err: type[Exception], match: str, **kwargs: Any) -> None:
    before, grads = snapshot(model), requires_grad_map(model)
    base = torch.optim.AdamW(model.parameters())
    groups = [list(g["params"]) for g in base.param_groups]
    kwargs = {"rank": 2, "knot_every": 3, **kwargs}
    with pytest.raises(err, match=match):
        ChainLoRAOptimizer(model, base, **kwargs)
    _untouched(model, before, grads)
    assert [list(g["params"]) for g in base.param_groups] == groups


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"lora_bias": "False"}, TypeError, "lora_bias must be a bool, got 'False'"),
        ({"lora_bias": "yes"}, TypeError, "lora_bias must be a bool, got 'yes'"),
        ({"lora_bias": 2}, TypeError, "lora_bias must be a bool, got 2"),
        ({"lora_bias": None}, TypeError, "lora_bias must be a bool, got None"),
        ({"exact_merge": 0}, TypeError, "exact_merge must be None or a bool, got 0"),
        ({"exact_merge": 1}, TypeError, "exact_merge must be None or a bool, got 1"),
        ({"exact_merge": 1.0}, TypeError, "exact_merge must be None or a bool, got 1.0"),
        ({"seed": 2**64}, ValueError, "seed must be in .*got 18446744073709551616"),
        ({"seed": -(2**63) - 1}, ValueError, "seed must be in"),
        ({"seed": True}, TypeError, "seed must be an int, got True"),
        ({"factor_dtype": torch.float8_e4m3fn}, TypeError, "factor_dtype .*float8_e4m3fn"),
        ({"factor_dtype": torch.complex64}, TypeError, "factor_dtype .*complex64"),
        ({"keep_history": 1}, TypeError, "keep_history must be a bool, got 1"),
        ({"non_finite": "ignore"}, ValueError, "non_finite must be one of .*'ignore'"),
        ({"reset": "FULL"}, ValueError, "reset must be one of .*'FULL'"),
        ({"reset": ["full"]}, ValueError, r"reset must be one of .*\['full'\]"),
        ({"init": "xavier"}, ValueError, "init must be one of .*'xavier'"),
        ({"prune_ratio": 1.0}, ValueError, "prune_ratio must be in"),
        ({"rank": "8"}, ValueError, "rank must be a positive int .*got '8'"),
        ({"rank": []}, ValueError, r"rank must be a positive int .*got \[\]"),
    ],
)
def test_bad_arguments_name_the_argument_and_the_value(
    kwargs: dict[str, Any], err: type[Exception], match: str
) -> None:
    _refused(mlp(), err, match, target_modules=["0"], **kwargs)


def test_extreme_valid_seeds_are_taken() -> None:
    for seed in (2**64 - 1, -(2**63)):
        model = mlp()
        ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           target_modules=["0"], rank=2, knot_every=2, seed=seed)  # fmt: skip


def test_a_rejected_construction_keeps_the_parameter_order() -> None:
    model = mlp()
    keys = list(model.state_dict())

    def failing(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        raise RuntimeError("factory failed")

    with pytest.raises(RuntimeError, match="factory failed"):
        ChainLoRAOptimizer(model, failing, target_modules=["0", "2"], rank=2, knot_every=2)
    assert list(model.state_dict()) == keys
    assert [n for n, _ in model[0].named_parameters()] == ["weight", "bias"]


def test_the_config_round_trips_through_its_dict() -> None:
    model = mlp()
    config = ChainConfig.from_kwargs(
        model, target_modules=["0"], rank=[4, 2], knots=[3, 9], factor_dtype=torch.bfloat16,
        trainable_modules=["4"],
    )  # fmt: skip
    assert ChainConfig.from_dict(config.to_dict()) == config
    assert config.differences(config.to_dict()) == {}
    with pytest.raises(ValueError, match="not a saved chain config"):
        ChainConfig.from_dict({"modules": ["0"]})


def test_a_model_built_under_deepspeed_zero_init_is_refused() -> None:
    model = mlp()
    for p in model.parameters():
        p.ds_id = 0  # type: ignore[attr-defined]  # what ZeRO-3's zero.Init leaves on parameters
    _refused(model, ValueError, "deepspeed.zero.Init", target_modules=["0"])


@pytest.mark.parametrize("link", [-1, "0", 1.0, True, None])
def test_link_rank_refuses_what_is_not_a_link_index(link: Any) -> None:
    model = mlp()
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["0"],
        rank=[4, 2], knot_every=1,
    )  # fmt: skip
    assert [opt.link_rank(i) for i in (0, 1, 5)] == [4, 2, 2]
    with pytest.raises(ValueError, match="link must be a non-negative int"):
        opt.link_rank(link)


def test_the_constructor_and_the_config_take_the_same_arguments() -> None:
    """One declaration: ``ChainLoRAOptimizer.__init__`` takes exactly ``from_kwargs``'s keyword
    arguments (same names, order, defaults and annotations), plus ``master_weights``, and
    forwards them by ``CONFIG_ARGUMENTS``; its docstring documents each."""
    config = inspect.signature(ChainConfig.from_kwargs).parameters
    ctor = inspect.signature(ChainLoRAOptimizer.__init__).parameters
    keyword = [p for p in ctor.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    declared = [p for p in config.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert [p.name for p in keyword] == [p.name for p in declared] + ["master_weights"]
    for mine, theirs in zip(keyword, declared, strict=False):
        assert (mine.default, mine.annotation) == (theirs.default, theirs.annotation), mine.name
    assert tuple(p.name for p in declared) == CONFIG_ARGUMENTS
    doc = ChainLoRAOptimizer.__doc__ or ""
    assert all(f"\n        {name}: " in doc for name in ctor if name != "self")


def test_every_argument_reaches_the_config() -> None:
    """A non-default value of each forwarded argument shows in the optimizer's config."""
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["0"], rank=[3, 2],
        alpha=5.0, knots=[4, 9], lora_bias=True, trainable_modules=["2"], seed=7,
        factor_dtype=torch.float64, exact_merge=True, keep_history=True, non_finite="skip",
        reset="prune", prune_ratio=0.5, init="gradient", quantized_master="none",
    )  # fmt: skip
    assert opt.config == ChainConfig(
        modules=("0",), ranks=(3, 2), alpha=5.0, knot_every=None, knots=(4, 9), lora_bias=True,
        seed=7, factor_dtype=torch.float64, exact_merge=True, keep_history=True, reset="prune",
        prune_ratio=0.5, init="gradient", non_finite="skip", trainable=("2",),
        quantized_master="none",
    )  # fmt: skip


def test_parameter_targets_are_records_in_model_order_and_round_trip() -> None:
    """``target_parameters`` adds ``"<module>.<param>"`` records after their module's own."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Module())
    model[1].w = nn.Parameter(torch.randn(3, 4, 4))
    model[1].v = nn.Parameter(torch.randn(4, 4))
    config = ChainConfig.from_kwargs(
        model, target_modules=["0"], target_parameters=["v", "1.w"], rank=2, knot_every=5
    )
    assert config.modules == ("0", "1.w", "1.v")  # the module's parameter order
    assert config.parameters == ("1.w", "1.v")
    assert ChainConfig.from_dict(config.to_dict()) == config
    saved = config.to_dict() | {"parameters": ["1.w"]}
    assert config.differences(saved) == {"parameters": (["1.w"], ["1.w", "1.v"])}
    older = {k: v for k, v in config.to_dict().items() if k != "parameters"}
    assert ChainConfig.from_dict(older).parameters == ()  # saves before target_parameters


def test_a_generator_of_names_is_read_once_and_gives_the_config_a_list_gives() -> None:
    """The specs are read several times (to match, to check, to name them in an error): a
    one-shot iterable (a generator, ``map``, ``iter``) counts as the list of its names."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Module())
    model[2].w = nn.Parameter(torch.randn(3, 4, 4))
    lists = {"target_modules": ["0"], "target_parameters": ["2.w"], "trainable_modules": ["1"]}
    expected = ChainConfig.from_kwargs(model, rank=2, knot_every=5, **lists)
    once = {k: (name for name in v) for k, v in lists.items()}
    assert ChainConfig.from_kwargs(model, rank=2, knot_every=5, **once) == expected
    assert expected.parameters == ("2.w",) and expected.trainable == ("1",)
    with pytest.raises(ValueError, match=r"target_parameters=\['nope'\] matches no parameter"):
        ChainConfig.from_kwargs(model, target_parameters=iter(["nope"]), knot_every=5)
    with pytest.raises(ValueError, match=r"target_modules=\['nope'\] matches no module"):
        ChainConfig.from_kwargs(model, target_modules=map(str, ["nope"]), knot_every=5)
