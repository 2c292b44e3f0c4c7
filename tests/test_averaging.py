"""``track_average``: an EMA/SWA copy of a chained model ties the same knots as the chain."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, get_swa_multi_avg_fn

import chainopt
from chainopt import (
    ChainLoRAOptimizer,
    NonFiniteUpdateError,
    load_checkpoint,
    merge_and_unload,
    merged_state_dict,
    save_checkpoint,
    track_average,
)
from chainopt._layers import find_adapted
from chainopt.merge import merged_weight
from tests.models import mlp, snapshot, tiny_llama
from tests.strategies import schedules

X = torch.randn(8, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
Y = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
TARGETS = ["0", "2", "4"]


def _chain(dtype: torch.dtype = torch.float64, seed: int = 0, **kwargs: Any) -> ChainLoRAOptimizer:
    torch.manual_seed(seed)
    model = mlp(dtype=dtype)
    schedule = {} if "knots" in kwargs or "knot_every" in kwargs else {"knot_every": 3}
    options: dict[str, Any] = {"rank": 2, "alpha": 4, **schedule, **kwargs}
    return ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=5e-2), target_modules=TARGETS, **options
    )


def _step(opt: ChainLoRAOptimizer, x: Tensor = X, y: Tensor = Y) -> None:
    dtype = opt.factors()[0].dtype
    nn.functional.mse_loss(opt.model(x.to(dtype)), y.to(dtype)).backward()
    opt.step()
    opt.zero_grad()


def _merged(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.double() for k, v in merged_state_dict(model).items()}


def _links(model: nn.Module) -> dict[str, Tensor]:
    """Each adapted weight with its pending link, ``W + s·B·A``, in float64 (PEFT layers too)."""
    return {r.name: merged_weight(r, torch.float64) for r in find_adapted(model)}


def _assert_one_averaging_step(
    ema: AveragedModel, before: dict[str, Tensor], live: nn.Module, w: float, tol: float = 1e-12
) -> None:
    """The copy's merged weights are ``(1 − w)·before + w·live``: one averaging step of the
    merged weights (what fails when a knot made the copy mix old and new factors)."""
    now = _links(live)
    for k, v in _links(ema.module).items():
        torch.testing.assert_close(v, (1 - w) * before[k] + w * now[k], rtol=tol, atol=tol)


def _weight(n: int, decay: float | None) -> float:
    """The weight ``update_parameters`` gives the model at its ``n``-th call (0-based): 1 first,
    then ``1 − decay`` (EMA) or ``1/(n+1)`` (SWA's equal average, which torch rounds to
    float32: ``1 / (n_averaged + 1)`` of a long tensor)."""
    if n == 0:
        return 1.0
    return 1.0 - decay if decay is not None else float(1 / (torch.tensor(n) + 1))


def _averaged(model: nn.Module, decay: float | None, use_buffers: bool = False) -> AveragedModel:
    fn = get_ema_multi_avg_fn(decay) if decay is not None else get_swa_multi_avg_fn()
    return AveragedModel(model, multi_avg_fn=fn, use_buffers=use_buffers)


@pytest.mark.parametrize("decay", [0.9, None], ids=["ema", "swa"])
@pytest.mark.parametrize("use_buffers", [False, True])
def test_the_averaged_merged_weights_take_one_averaging_step_across_a_knot(
    decay: float | None, use_buffers: bool
) -> None:
    """Through a knot and the ``update_parameters`` after it, the copy's merged weights move
    exactly as an average of merged weights does: ``M̄' = (1 − w)·M̄ + w·M``. Untracked, the
    copy's ``avg(B)·avg(A)`` mixed the old ``B̄`` with the new ``A`` (off by ~d(1−d)·s·B̄·ΔA)."""
    opt = _chain()
    ema = _averaged(opt.model, decay, use_buffers)
    track_average(opt, ema)
    for _ in range(2):  # the knot is the third step
        _step(opt)
        ema.update_parameters(opt.model)
    before = _merged(ema.module)
    with torch.no_grad():
        out_before = ema(X)
    _step(opt)  # the knot
    assert opt.knots_tied == 1
    with torch.no_grad():  # the knot alone leaves the averaged function as it was
        torch.testing.assert_close(ema(X), out_before, rtol=0, atol=1e-12)
    w = _weight(2, decay)  # the third update
    ema.update_parameters(opt.model)
    live = _merged(opt.model)
    for k, v in _merged(ema.module).items():
        torch.testing.assert_close(v, (1 - w) * before[k] + w * live[k], rtol=1e-12, atol=1e-12)


class _Reference:
    """The average of the live merged weights, by hand, and the product-of-averages error:
    what an average of the factors leaves out of the average of their products, per link,
    carried on (decayed) once the link is merged."""

    def __init__(self, opt: ChainLoRAOptimizer) -> None:
        self.opt = opt
        self.merged: dict[str, Tensor] = {}
        self.n = 0
        rs = opt.chain.records
        self.a = {r.name: torch.zeros_like(r.link.lora_A, dtype=torch.float64) for r in rs}
        self.b = {r.name: torch.zeros_like(r.link.lora_B, dtype=torch.float64) for r in rs}
        self.ba = {r.name: torch.zeros(r.weight.shape, dtype=torch.float64) for r in rs}
        self.err = {r.name: torch.zeros(r.weight.shape, dtype=torch.float64) for r in rs}

    def knot(self, scales: dict[str, float]) -> None:
        """Before the update of a step that tied a knot (``scales``: the merged links'): the
        link's error joins the past."""
        for r in self.opt.chain.records:
            s = scales[r.name]
            self.err[r.name] += self.ba[r.name] - s * self.b[r.name] @ self.a[r.name]
            self.ba[r.name].zero_()
            self.b[r.name] = torch.zeros_like(r.link.lora_B, dtype=torch.float64)
            self.a[r.name] = r.link.lora_A.detach().double().clone()

    def update(self, w: float) -> None:
        for k, v in _merged(self.opt.model).items():
            self.merged[k] = v.clone() if self.n == 0 else self.merged[k].lerp(v, w)
        for r in self.opt.chain.records:
            a, b = r.link.lora_A.detach().double(), r.link.lora_B.detach().double()
            self.a[r.name] = self.a[r.name].lerp(a, w)
            self.b[r.name] = self.b[r.name].lerp(b, w)
            self.ba[r.name] = self.ba[r.name].lerp(r.link.scale * b @ a, w)
            self.err[r.name] *= 1 - w
        self.n += 1

    def expected(self) -> dict[str, Tensor]:
        """``M̄ − Σ errors``: what the tracked copy's merged weights are."""
        out = dict(self.merged)
        for r in self.opt.chain.records:
            s = r.link.scale
            poa = self.ba[r.name] - s * self.b[r.name] @ self.a[r.name]
            out[f"{r.name}.weight"] = out[f"{r.name}.weight"] - self.err[r.name] - poa
        return out


def _run_against_reference(
    opt: ChainLoRAOptimizer, decay: float | None, steps: int, every: int = 1
) -> tuple[float, float]:
    """Train ``steps`` steps with a tracked average updated every ``every`` steps (knots may
    fall between updates); return the largest distance of its merged weights from the
    reference (``M̄ − product-of-averages error``), and the largest product-of-averages error
    itself (how large what is compared is)."""
    ema = _averaged(opt.model, decay)
    track_average(opt, ema)
    ref = _Reference(opt)
    worst, scale = 0.0, 0.0
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        scales = {r.name: r.link.scale for r in opt.chain.records}  # of the link a knot merges
        knots = opt.knots_tied
        _step(opt, torch.randn(8, 12, generator=g), torch.randn(8, 6, generator=g))
        if opt.knots_tied > knots:
            ref.knot(scales)
        if step % every:
            continue
        ref.update(_weight(ref.n, decay))
        ema.update_parameters(opt.model)
        expected = ref.expected()
        for k, v in _merged(ema.module).items():
            worst = max(worst, float((v - expected[k]).abs().max()))
            scale = max(scale, float((v - ref.merged[k]).abs().max()))
    return worst, scale


@pytest.mark.parametrize("decay", [0.8, None], ids=["ema", "swa"])
def test_over_many_knots_the_average_is_the_average_of_merged_weights_but_the_factor_products(
    decay: float | None,
) -> None:
    """Over 5 knots (and a rank step-down), the tracked copy's merged weights are the average of
    the live merged weights less exactly the product-of-averages error the test computes from
    the live factors (what any average of LoRA factors has within a link)."""
    opt = _chain(rank=[3, 2, 1], knot_every=4)
    worst, scale = _run_against_reference(opt, decay, 22)
    assert opt.knots_tied == 5
    assert scale > 1e-4  # the comparison is of something
    assert worst < 1e-10


@given(
    schedule=schedules,
    decay=st.sampled_from([0.5, 0.9, 0.99, None]),
    seed=st.integers(0, 3),
    every=st.integers(1, 3),
)
def test_property_the_tracked_average_keeps_the_identity_over_any_schedule(
    schedule: dict[str, Any], decay: float | None, seed: int, every: int
) -> None:
    """Any knot schedule, EMA or SWA, an average updated every 1 to 3 steps (several knots may
    fall between two updates): the tracked copy is the average of the merged weights less the
    product-of-averages error."""
    opt = _chain(seed=seed, **schedule)
    worst, _ = _run_against_reference(opt, decay, 13, every)
    assert worst < 1e-10


def test_a_tiny_llama_ema_exports_to_the_averaged_function(tmp_path: Path) -> None:
    """The copy exports: ``merged_state_dict`` loads into the plain model, ``save_pretrained``
    of the copy writes it, and ``merge_and_unload`` makes it plain; each computes the averaged
    function."""
    from transformers import LlamaForCausalLM

    model = tiny_llama()
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2),
        target_modules=["q_proj", "v_proj"], rank=2, alpha=4, knot_every=2,
    )  # fmt: skip
    ema = _averaged(model, 0.7)
    track_average(opt, ema)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update_parameters(model)
    with torch.no_grad():
        expected = ema(ids).logits
    plain = tiny_llama()
    plain.load_state_dict(merged_state_dict(ema.module))
    ema.module.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    unloaded = merge_and_unload(ema.module)
    with torch.no_grad():
        for other in (plain, loaded, unloaded):
            torch.testing.assert_close(other(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert chainopt.adapted_modules(unloaded) == []
    with pytest.raises(RuntimeError, match=r"holds none of the chain's links.*opt\.tie_knot"):
        opt.tie_knot()  # refused before the live knot
    assert opt.knots_tied == 2


def test_resume_from_state_dicts_continues_the_tracked_average_bitwise(tmp_path: Path) -> None:
    """Save model, optimizer and ``ema.state_dict()`` mid-run (in a link of a lower rank),
    rebuild everything, load, track again: the average goes on bitwise as without the stop.
    The tracking itself stays registered through ``opt.load_state_dict``/``load_checkpoint``."""

    def build() -> tuple[ChainLoRAOptimizer, AveragedModel]:
        opt = _chain(rank=[3, 2], knot_every=3)
        ema = _averaged(opt.model, 0.8)
        track_average(opt, ema)
        return opt, ema

    def train(opt: ChainLoRAOptimizer, ema: AveragedModel, steps: int) -> None:
        for _ in range(steps):
            _step(opt)
            ema.update_parameters(opt.model)

    opt, ema = build()
    train(opt, ema, 11)
    expected = snapshot(ema)

    opt, ema = build()
    train(opt, ema, 4)  # the second link: rank 2
    save_checkpoint(tmp_path / "c.pt", opt.model, opt, ema=ema.state_dict())
    opt, ema = build()  # rank 3 again
    extra = load_checkpoint(tmp_path / "c.pt", opt.model, opt)
    ema.load_state_dict(extra["ema"])
    train(opt, ema, 7)
    got = snapshot(ema)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k

    opt, ema = build()  # a state dict loaded after tracking started: the tracking stays
    train(opt, ema, 4)
    state, ema_state = copy.deepcopy(opt.state_dict()), copy.deepcopy(ema.state_dict())
    model_state = copy.deepcopy(opt.model.state_dict())
    train(opt, ema, 2)
    opt.load_state_dict(state)
    opt.model.load_state_dict(model_state)
    ema.load_state_dict(ema_state)
    train(opt, ema, 7)
    for k, v in expected.items():
        assert torch.equal(ema.state_dict()[k], v), k


def test_a_link_the_live_knot_drops_is_merged_in_the_average() -> None:
    """``non_finite="skip"``: the live knot drops a link that went NaN on the knot's step; the
    average never took the NaN in and holds the link's past updates, so it merges it."""
    opt = _chain(non_finite="skip", knot_every=3)
    ema = _averaged(opt.model, 0.5)
    track_average(opt, ema)
    for _ in range(2):
        _step(opt)
        ema.update_parameters(opt.model)
    before = _links(ema.module)
    opt.model(X).square().mean().backward()
    with torch.no_grad():
        opt.chain.records[0].link.lora_B.grad.fill_(float("nan"))  # type: ignore[union-attr]
    with pytest.warns(RuntimeWarning, match="dropped those links"):
        opt.step()
    assert opt.history.knots[-1].skipped == ("0",)
    ema.update_parameters(opt.model)
    _assert_one_averaging_step(ema, before, opt.model, 0.5)
    assert all(bool(p.isfinite().all()) for p in ema.parameters() if p.is_floating_point())


def test_a_non_finite_average_refuses_the_knot_before_anything_changes_or_is_dropped() -> None:
    opt = _chain(knot_every=2)
    ema = _averaged(opt.model, 0.5)
    track_average(opt, ema)
    _step(opt)
    ema.update_parameters(opt.model)
    copy_link = ema.module[2].parametrizations.weight[0]
    with torch.no_grad():
        copy_link.lora_B[0, 0] = float("inf")
    live, averaged = snapshot(opt.model), snapshot(ema)
    with pytest.raises(NonFiniteUpdateError, match=r"averaged copy's links \['2'\] would merge"):
        opt.tie_knot()
    assert opt.knots_tied == 0
    for before, model in ((live, opt.model), (averaged, ema)):
        for k, v in before.items():
            assert torch.equal(model.state_dict()[k], v), k

    opt = _chain(knot_every=2, non_finite="skip")
    ema = _averaged(opt.model, 0.5)
    track_average(opt, ema)
    _step(opt)
    ema.update_parameters(opt.model)
    weight = ema.module[2].parametrizations.weight.original.detach().clone()
    with torch.no_grad():
        ema.module[2].parametrizations.weight[0].lora_B[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"averaged copy's links \['2'\].*dropped"):
        _step(opt)
    assert opt.knots_tied == 1
    assert torch.equal(ema.module[2].parametrizations.weight.original, weight)  # unmerged
    assert bool((ema.module[2].parametrizations.weight[0].lora_B == 0).all())


def test_a_chained_peft_model_with_dora_keeps_the_averaged_function_and_refuses_adapter_saves(
    tmp_path: Path,
) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 6))
    model = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"],
                                           use_dora=True))  # fmt: skip
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=5e-2), knot_every=3)
    ema = _averaged(model, 0.5)
    track_average(opt, ema)
    for _ in range(2):
        _step(opt, X.float(), Y.float())
        ema.update_parameters(model)
    before = _links(ema.module)
    _step(opt, X.float(), Y.float())  # the knot
    assert opt.knots_tied == 1
    ema.update_parameters(model)
    _assert_one_averaging_step(ema, before, model, 0.5, tol=1e-6)  # V = W + s·B·A under DoRA
    with torch.no_grad():
        before = ema(X.float())
    with pytest.raises(ValueError, match=r"averaged PeftModel.*nothing was written"):
        ema.module.save_pretrained(tmp_path / "ema")
    assert not (tmp_path / "ema").exists()
    merge_and_unload(ema.module)
    plain = ema.module.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(plain(X.float()), before, rtol=1e-5, atol=1e-5)


def _contexts(opt: ChainLoRAOptimizer) -> list[object]:
    return list(opt.chain.contexts.values())


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda opt: (opt.model, opt.model),
            ValueError,
            "copy of the chained model .*not the live",
        ),
        (lambda opt: (opt, mlp()), ValueError, "holds none of the chain's links"),
        (lambda opt: ("opt", None), TypeError, "optimizer must be a ChainLoRAOptimizer, got str"),
        (lambda opt: (opt, "ema"), TypeError, "averaged must be .*got str"),
        (
            lambda opt: (opt, copy.deepcopy(_chain(rank=3).model)),
            ValueError,
            r"averaged's link '0' has factors of shapes \[\(3, 12\)",
        ),
    ],
    ids=["live-model", "plain-model", "not-an-optimizer", "not-a-module", "another-rank"],
)
def test_bad_input_is_refused_and_nothing_changes(
    make: Callable[[ChainLoRAOptimizer], tuple[Any, Any]], error: type, match: str
) -> None:
    opt = _chain()
    first, averaged = make(opt)
    if first is opt.model:
        first = opt
    before = snapshot(opt.model)
    contexts = _contexts(opt)
    with pytest.raises(error, match=match):
        track_average(first, averaged)
    assert _contexts(opt) == contexts
    assert all(torch.equal(v, opt.model.state_dict()[k]) for k, v in before.items())


def test_a_flat_parameter_ema_is_refused_saying_why() -> None:
    """diffusers' EMAModel copies frozen weights and averages the factors: no knot can fix it."""
    ema_model = pytest.importorskip("diffusers.training_utils").EMAModel
    opt = _chain()
    ema = ema_model(opt.model.parameters())
    contexts = _contexts(opt)
    with pytest.raises(TypeError, match=r"got .*EMAModel.*copies the frozen weights"):
        track_average(opt, ema)
    assert _contexts(opt) == contexts


def test_tracking_twice_an_unloaded_chain_and_half_precision_weights_are_refused() -> None:
    opt = _chain()
    ema = _averaged(opt.model, 0.9)
    track_average(opt, ema)
    contexts = _contexts(opt)
    with pytest.raises(ValueError, match="tracked by this optimizer already"):
        track_average(opt, ema.module)
    assert _contexts(opt) == contexts

    for dtype, options in (
        (torch.bfloat16, {}),  # with a merge residual
        (torch.bfloat16, {"exact_merge": False}),
        (torch.float32, {"factor_dtype": torch.float16}),
    ):
        half = _chain(dtype=dtype, **options)
        averaged = _averaged(half.model, 0.9)
        before = snapshot(averaged)
        match = r"half-precision weights or factors \(\['0', '2', '4'\].*stall"
        with pytest.raises(ValueError, match=match):
            track_average(half, averaged)
        assert _contexts(half) == []
        assert all(torch.equal(v, averaged.state_dict()[k]) for k, v in before.items())

    other = _chain()
    copied = _averaged(other.model, 0.9)
    other.merge_and_unload()
    with pytest.raises(ValueError, match="no chain left"):
        track_average(other, copied)


def test_remove_stops_the_tracking() -> None:
    opt = _chain(knot_every=1)
    ema = _averaged(opt.model, 0.9)
    handle = track_average(opt, ema)
    handle.remove()
    assert _contexts(opt) == []
    b = ema.module[0].parametrizations.weight[0].lora_B
    with torch.no_grad():
        b.fill_(1.0)
    _step(opt)
    assert bool((b == 1).all())  # untouched by the knot


def test_a_4bit_chain_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A record with a 4-bit master (faked here: CPU bitsandbytes is not at hand) is refused."""
    opt = _chain()
    records = opt.chain.records
    fake = [copy.copy(records[0])]
    object.__setattr__(fake[0], "quant", object())
    monkeypatch.setattr(opt.chain, "records", fake + records[1:])
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"4-bit layers \(\['0'\]"):
        track_average(opt, _averaged(opt.model, 0.9))
    assert _contexts(opt) == []


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_experts_take_one_averaging_step_across_a_knot_with_a_rank_step_down(
    transposed: bool,
) -> None:
    from tests.test_experts import Toy

    torch.manual_seed(0)
    model = Toy(transposed=transposed, dtype=torch.float64)
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=5e-2),
        target_parameters=["experts.w", "router.weight"], rank=[2, 1], alpha=4, knot_every=3,
    )  # fmt: skip
    ema = _averaged(model, 0.7)
    track_average(opt, ema)
    x = torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for _ in range(2):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update_parameters(model)
    before = _links(ema.module)
    assert set(before) == {"experts.w", "router.weight"}
    model(x).square().mean().backward()
    opt.step()  # the knot: rank 2 -> 1
    opt.zero_grad()
    ema.update_parameters(model)
    _assert_one_averaging_step(ema, before, model, 0.3)
    copied = {r.name: r.link.lora_A.shape for r in find_adapted(ema.module)}
    assert copied == {r.name: r.link.lora_A.shape for r in opt.chain.records}
