"""ChainConfig.from_kwargs: every bad argument and unsafe model is refused, nothing changed."""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from models import assert_same, fingerprint, mlp, requires_grad_map, snapshot
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


def _refused(
    model: nn.Module,
    err: type[Exception] | tuple[type[Exception], ...],
    match: str,
    **kwargs: Any,
) -> None:
    """Construction raises ``err`` matching ``match``, and model and optimizer (which holds
    state) are exactly as before (:func:`models.fingerprint`: parameters, flags, hooks,
    instance attributes, state dict, groups, state)."""
    base = torch.optim.AdamW(model.parameters())
    stepped = [p for p in model.parameters() if p.is_floating_point() and not p.is_meta]
    for p in stepped:
        p.grad = torch.ones_like(p)
    try:
        base.step()
    except (NotImplementedError, RuntimeError):  # no Adam for float8 weights: no state then
        base.state.clear()
    base.zero_grad()
    before, grads = snapshot(model), requires_grad_map(model)
    whole = fingerprint(model, base)
    kwargs = {"rank": 2, "knot_every": 3, **kwargs}
    with pytest.raises(err, match=match):
        ChainLoRAOptimizer(model, base, **kwargs)
    _untouched(model, before, grads)
    assert_same(whole, fingerprint(model, base))


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


# --- every bad value of every argument, refused naming both, nothing changed ---

_NOT_INTS = st.one_of(
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.builds(np.int64, st.integers(1, 4)),
    st.just(None),
)
_NOT_BOOLS = st.one_of(st.integers(), st.text(max_size=3), st.none(), st.just(np.True_))
_NOT_POLICIES = st.one_of(st.text(max_size=8), st.none(), st.integers(), st.just(["full"]))
_NO_MODULE = st.lists(st.text("xyz", min_size=1, max_size=4), min_size=1, max_size=3)
BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "rank": st.one_of(
        _NOT_INTS.filter(lambda v: v is not None),
        st.integers(max_value=0),
        st.integers(13, 10**9),
        st.just([]),
        st.lists(st.integers(-3, 0), min_size=1, max_size=3),
        st.lists(st.integers(1, 4), min_size=1, max_size=2).map(lambda r: [*r, True]),
    ),
    "alpha": st.one_of(
        st.booleans(),
        st.floats(max_value=0.0),
        st.just(math.nan),
        st.just(math.inf),
        st.text(max_size=3),
        st.builds(np.float32, st.floats(1, 4)),
        st.floats(min_value=1e39, max_value=1e308),  # alpha / rank 2 overflows float32
        st.floats(min_value=5e-324, max_value=2e-38),  # ... or is no normal float32
    ),
    "knot_every": st.one_of(_NOT_INTS.filter(lambda v: v is not None), st.integers(max_value=0)),
    "knots": st.one_of(
        st.just([]),
        st.lists(st.integers(max_value=0), min_size=1, max_size=3),
        st.lists(st.integers(1, 9), min_size=2, max_size=4).filter(lambda k: k != sorted(set(k))),
        st.lists(st.floats(1, 9), min_size=1, max_size=3),
        st.text(max_size=3),
    ),
    "num_links": st.one_of(_NOT_INTS.filter(lambda v: v is not None), st.integers(max_value=0)),
    "total_steps": st.one_of(_NOT_INTS.filter(lambda v: v is not None), st.integers(max_value=1)),
    "steps_per_epoch": st.one_of(
        _NOT_INTS.filter(lambda v: v is not None), st.integers(max_value=0)
    ),
    "seed": st.one_of(_NOT_INTS, st.integers(min_value=2**64), st.integers(max_value=-(2**63) - 1)),
    "lora_bias": _NOT_BOOLS,
    "keep_history": _NOT_BOOLS,
    "exact_merge": st.one_of(st.integers(), st.text(max_size=3), st.floats()),
    "non_finite": _NOT_POLICIES,
    "reset": _NOT_POLICIES,
    "init": _NOT_POLICIES,
    "quantized_master": _NOT_POLICIES,
    "prune_ratio": st.one_of(
        st.floats(min_value=1.0),
        st.floats(max_value=0.0, exclude_max=True),
        st.just(math.nan),
        st.booleans(),
        st.text(max_size=3),
    ),
    "factor_dtype": st.one_of(
        st.sampled_from([torch.int64, torch.bool, torch.complex64, torch.float8_e5m2]),
        st.text(max_size=8),
        st.integers(),
    ),
    "target_modules": st.one_of(
        st.just([]),
        st.just([""]),
        st.integers(),
        st.binary(max_size=3),
        _NO_MODULE,
        _NO_MODULE.map(lambda names: ["0", *names]),
    ),
    "trainable_modules": st.one_of(
        st.just([]), st.integers(), _NO_MODULE, _NO_MODULE.map(lambda names: ["4", *names])
    ),
}


def _names_the_value(message: str, value: object) -> bool:
    """The message shows ``value`` (or, for a list of names, one of its entries)."""
    if repr(value) in message:
        return True
    return isinstance(value, list) and any(repr(v) in message for v in value)


@given(data=st.data(), argument=st.sampled_from(sorted(BAD_VALUES)))
def test_every_bad_value_is_refused_naming_argument_and_value_and_nothing_changes(
    data: st.DataObject, argument: str
) -> None:
    value = data.draw(BAD_VALUES[argument], label=argument)
    model = mlp()
    base = torch.optim.AdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    base.step()
    base.zero_grad()
    before = fingerprint(model, base)
    kwargs: dict[str, Any] = {"target_modules": ["0"], "rank": 2, "knot_every": 3}
    if argument == "knots":
        kwargs["knot_every"] = None
    if argument in ("num_links", "total_steps", "steps_per_epoch"):
        kwargs.update(knot_every=None, num_links=2, total_steps=10)
    kwargs[argument] = value
    with pytest.raises((TypeError, ValueError)) as raised:
        ChainLoRAOptimizer(model, base, **kwargs)
    message = str(raised.value)
    assert argument in message, message
    assert _names_the_value(message, value), message
    assert_same(before, fingerprint(model, base))


@pytest.mark.parametrize(
    ("schedule", "rank", "links"),
    [({"knots": [5]}, [8, 4, 2], 2), ({"num_links": 2, "total_steps": 10}, [4, 2, 1], 2),
     ({"num_links": 1, "total_steps": 10}, [4, 2], 1)],
)  # fmt: skip
def test_a_rank_list_longer_than_the_schedules_links_is_refused(
    schedule: dict[str, Any], rank: list[int], links: int
) -> None:
    """Ranks past the last link would never be used: a list one longer than the chain has
    links was taken silently."""
    match = rf"{re.escape(f'rank={rank}')}.* schedule has {links} link"
    _refused(mlp(), ValueError, match, target_modules=["0"], rank=rank, knot_every=None,
             **schedule)  # fmt: skip
    enough = ChainConfig.from_kwargs(mlp(), target_modules=["0"], rank=rank[:links], **schedule)
    assert enough.ranks == tuple(rank[:links])
    endless = ChainConfig.from_kwargs(mlp(), target_modules=["0"], rank=rank, knot_every=2)
    assert endless.ranks == tuple(rank)  # knot_every: as many links as the run has


def test_steps_per_epoch_without_num_links_names_its_value() -> None:
    _refused(mlp(), ValueError, "steps_per_epoch goes with num_links .*got steps_per_epoch=7",
             target_modules=["0"], steps_per_epoch=7)  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": np.int64(4)}, r"got np.int64\(4\) \(np.int64\(4\) is a numpy.int64, not a "
                                r"Python int: pass int\(...\)\)"),
        ({"rank": [4, np.int32(2)]}, r"np.int32\(2\) is a numpy.int32, not a Python int"),
        ({"alpha": np.float32(4.0)}, r"alpha .* is a numpy.float32, not a Python float"),
        ({"knot_every": torch.tensor(3)}, r"knot_every .* is a torch.Tensor, not a Python int"),
        ({"knot_every": None, "knots": np.array([2, 5])},
         r"knots .*got array\(\[2, 5\]\) \(a numpy.ndarray, not a list: pass .tolist\(\)\)"),
        ({"seed": np.int64(1)}, r"seed must be an int, got np.int64\(1\) .* not a Python int"),
        ({"prune_ratio": np.float64(2.0)}, r"prune_ratio must be in \[0, 1\), got"),
    ],
)  # fmt: skip
def test_numpy_and_tensor_numbers_are_refused_saying_what_to_pass(
    kwargs: dict[str, Any], match: str
) -> None:
    """A numpy or tensor scalar (a sweep's ``np.arange``) is not taken for an int or float
    (the config is saved and must load with ``weights_only``); the message said only "must be
    a positive int, got np.int64(4)", which a numpy int looks like."""
    _refused(mlp(), (TypeError, ValueError), match, target_modules=["0"], **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"alpha": 10**400}, ValueError, r"alpha must be finite, got 1000"),
        ({"alpha": 1e308}, ValueError, r"alpha=1e\+308 with rank=\[2\] gives link scales .*NaN"),
        ({"alpha": 1e-300, "rank": [4, 2]}, ValueError,
         r"alpha=1e-300 with rank=\[4, 2\] .* rounds to 0 trains nothing"),
        ({"knot_every": None}, ValueError,
         r"exactly one of knot_every and knots, or num_links with total_steps: a chain needs"),
        ({"target_modules": "all-linear", "model": nn.Linear(4, 4)}, ValueError,
         r"the model itself is a Linear, and the root is never adapted: wrap it"),
        ({"target_modules": "all-linear", "model": nn.Sequential(nn.Embedding(3, 3))}, ValueError,
         r"^target_modules='all-linear' matches no module of the model \(it leaves out .*\); "
         r"it has no Linear or Conv1D layer a link can adapt$"),
    ],
)  # fmt: skip
def test_edge_values_raise_a_value_error_that_says_what_to_do(
    kwargs: dict[str, Any], err: type[Exception], match: str
) -> None:
    """``alpha=10**400`` raised ``OverflowError`` (``math.isfinite`` of an int too large for a
    float); ``alpha=1e308`` was taken, and every forward then raised torch's "value cannot be
    converted to type float without overflow" (a half-precision model computed NaN instead),
    and ``alpha=1e-300`` gave links whose scale rounds to 0 in float32, which trained nothing,
    silently; no schedule at all named only ``knot_every`` and ``knots``; a bare ``nn.Linear`` as
    the model was told that no module matched, and ``"all-linear"`` that matched nothing was
    asked whether it meant ``"all-linear"``."""
    model = kwargs.pop("model", None) or mlp()
    _refused(model, err, match, **{"target_modules": ["0"], **kwargs})


@pytest.mark.parametrize(
    ("field", "value", "err"),
    [("ranks", (0,), ValueError), ("ranks", (), ValueError), ("alpha", math.nan, ValueError),
     ("alpha", 4, ValueError), ("knot_every", 0, ValueError), ("knots", (3, 3), ValueError),
     ("modules", ["0"], TypeError), ("parameters", ("x.w",), ValueError),
     ("lora_bias", 1, TypeError), ("exact_merge", 0, TypeError), ("seed", 2**64, ValueError),
     ("factor_dtype", torch.int8, TypeError), ("reset", "FULL", ValueError),
     ("prune_ratio", 1.0, ValueError)],
)  # fmt: skip
def test_a_hand_built_or_corrupt_config_is_refused_naming_the_field(
    field: str, value: object, err: type[Exception]
) -> None:
    """``ChainConfig`` is public and ``from_dict`` reads saves: neither checked any field, so a
    config no construction makes (rank 0, NaN alpha) was taken."""
    good = ChainConfig.from_kwargs(mlp(), target_modules=["0"], rank=2, knot_every=3)
    kwargs = {f: getattr(good, f) for f in good.__dataclass_fields__}
    with pytest.raises(err, match=rf"ChainConfig\.{field} must be"):
        ChainConfig(**{**kwargs, field: value})
    saved = good.to_dict() | {field: list(value) if isinstance(value, tuple) else value}
    if field not in ("factor_dtype", "modules"):  # (saved as a string; as a list)
        with pytest.raises((TypeError, ValueError), match=rf"ChainConfig\.{field}|not a saved"):
            ChainConfig.from_dict(saved)
