"""Lightning: a chain built in ``configure_optimizers()`` (or ``__init__``) resumes bitwise.

Every test trains a tiny ``nn.Sequential`` for ``STEPS`` optimizer steps with a knot every
``KNOT_EVERY`` steps and a ``ModelCheckpoint`` every ``SAVE_EVERY`` steps (mid-link, at an
epoch's end: Lightning warns that a plain ``DataLoader`` does not resume mid-epoch), then
resumes a fresh module from a checkpoint and compares every model tensor and the whole optimizer
state with the uninterrupted run.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from chainopt import ChainLoRAOptimizer
from chainopt.integrations.lightning import ChainLoRACheckpoint

STEPS, KNOT_EVERY, SAVE_EVERY = 8, 3, 4  # 4 batches an epoch; knots after 3 and 6
DATA = TensorDataset(
    torch.randn(12, 8, generator=torch.Generator().manual_seed(1)),
    torch.randn(12, 4, generator=torch.Generator().manual_seed(2)),
)


class Tiny(LightningModule):
    """Two adapted Linears (with bias deltas), a trainable head, AdamW and a step-wise LR."""

    def __init__(
        self,
        chain_in: str = "configure",
        wrap: str = "module",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
        ).to(dtype)
        self.wrap = wrap
        self.chain = self.build_chain() if chain_in == "init" else None

    def build_chain(self) -> ChainLoRAOptimizer:
        model = self if self.wrap == "module" else self.net
        prefix = "net." if self.wrap == "module" else ""
        return ChainLoRAOptimizer(
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-2),
            target_modules=[prefix + "0", prefix + "2"],
            trainable_modules=[prefix + "4"],
            rank=2,
            knot_every=KNOT_EVERY,
            lora_bias=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x.to(self.net[4].weight.dtype)).float()
        return out

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self(batch[0]), batch[1])

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> Any:
        opt = self.chain if self.chain is not None else self.build_chain()
        sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=STEPS)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class PlainAdamW(Tiny):
    """Builds no chain: a checkpoint of a chain has nowhere to go."""

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class SelfContained(Tiny):
    """Brings the callback along itself."""

    def configure_callbacks(self) -> list[Callback]:
        return [ChainLoRACheckpoint(merged=False)]


class Poison(Callback):
    """Puts a NaN into a link after the last step, before ModelCheckpoint saves."""

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == SAVE_EVERY:
            with torch.no_grad():
                pl_module.net[0].parametrizations.weight[0].lora_B[0, 0] = float("nan")


@pytest.fixture(autouse=True)
def _restore_determinism() -> Iterator[None]:
    # Trainer(deterministic=True) switches torch to deterministic algorithms for the process.
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def loader() -> DataLoader[Any]:
    return DataLoader(DATA, batch_size=3, shuffle=False)


def trainer(
    root: Path, *callbacks: Callback, steps: int = STEPS, checkpoints: bool = True
) -> Trainer:
    saving = [
        ModelCheckpoint(
            dirpath=root / "ckpts", every_n_train_steps=SAVE_EVERY, save_top_k=-1, save_last=True
        )
    ]
    return Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        max_steps=steps,
        default_root_dir=root,
        enable_checkpointing=checkpoints,
        callbacks=[*(saving if checkpoints else []), *callbacks],
    )


def fit(
    root: Path, module: Tiny, *callbacks: Callback, ckpt_path: Any = None, **kw: Any
) -> Trainer:
    t = trainer(root, *callbacks, **kw)
    t.fit(module, loader(), ckpt_path=ckpt_path)
    return t


def chain_of(t: Trainer) -> ChainLoRAOptimizer:
    opt = t.optimizers[0]
    assert isinstance(opt, ChainLoRAOptimizer)
    return opt


def mid(root: Path) -> Path:
    return root / "ckpts" / f"epoch=0-step={SAVE_EVERY}.ckpt"


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested state (tensors: dtype, shape and every bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def state_of(opt: ChainLoRAOptimizer) -> dict[str, Any]:
    """``opt.state_dict()`` without the chain tensors a merged save since the last step adds."""
    state = opt.state_dict()
    state["chainopt"].pop("model", None)
    return state


def assert_resumed(reference: Trainer, resumed: Trainer) -> None:
    ref, res = chain_of(reference), chain_of(resumed)
    assert (res.optimizer_steps, res.knots_tied) == (STEPS, STEPS // KNOT_EVERY)
    assert resumed.global_step == reference.global_step == STEPS
    assert_same(reference.lightning_module.state_dict(), resumed.lightning_module.state_dict())
    assert_same(state_of(ref), state_of(res), "optimizer")
    assert_same(
        reference.lr_scheduler_configs[0].scheduler.state_dict(),
        resumed.lr_scheduler_configs[0].scheduler.state_dict(),
    )


@pytest.mark.parametrize(
    ("merged", "wrap", "dtype"),
    [
        (True, "module", torch.float32),
        (False, "module", torch.float32),
        (True, "net", torch.bfloat16),  # merge residuals travel too
        (False, "net", torch.bfloat16),
    ],
)
def test_chain_in_configure_optimizers_resumes_bitwise(
    tmp_path: Path, merged: bool, wrap: str, dtype: torch.dtype
) -> None:
    reference = fit(tmp_path, Tiny("configure", wrap, dtype), ChainLoRACheckpoint(merged=merged))
    saved = torch.load(mid(tmp_path), weights_only=False)["state_dict"]
    assert any(".parametrizations." in k for k in saved) is not merged
    resumed = fit(
        tmp_path / "again",
        Tiny("configure", wrap, dtype),
        ChainLoRACheckpoint(merged=merged),
        ckpt_path=mid(tmp_path),
    )
    assert_resumed(reference, resumed)


@pytest.mark.parametrize("callback", [True, False])
def test_chain_in_init_resumes_bitwise(tmp_path: Path, callback: bool) -> None:
    extra = [ChainLoRACheckpoint()] if callback else []
    reference = fit(tmp_path, Tiny("init"), *extra)
    resumed = fit(tmp_path / "again", Tiny("init"), *extra, ckpt_path=mid(tmp_path))
    assert_resumed(reference, resumed)


def test_merged_checkpoint_resumes_without_the_callback(tmp_path: Path) -> None:
    # The plain keys fit the unchained module; the optimizer state puts the chain back.
    reference = fit(tmp_path, Tiny("configure"), ChainLoRACheckpoint())
    resumed = fit(tmp_path / "again", Tiny("configure"), ckpt_path=mid(tmp_path))
    assert_resumed(reference, resumed)


def test_parametrized_checkpoint_resumes_into_either_pattern(tmp_path: Path) -> None:
    # Saved by a module chained in __init__ with no callback; resumed with configure_optimizers.
    reference = fit(tmp_path, Tiny("init"))
    resumed = fit(
        tmp_path / "again", Tiny("configure"), ChainLoRACheckpoint(), ckpt_path=mid(tmp_path)
    )
    assert_resumed(reference, resumed)


@pytest.mark.parametrize("wrap", ["module", "net"])
def test_without_the_callback_a_chain_in_configure_optimizers_resumes_bitwise(
    tmp_path: Path, wrap: str
) -> None:
    """The natural pattern, no callback: it used to fail with torch's raw missing/unexpected-key
    error (Lightning loads the weights, strictly, before configure_optimizers() builds the chain).
    Lightning's checkpoint now holds the merged model and the chain's tensors travel with the
    optimizer state, as ChainLoRACheckpoint writes them."""
    reference = fit(tmp_path, Tiny("configure", wrap))
    saved = torch.load(mid(tmp_path), weights_only=False)
    assert not any(".parametrizations." in k for k in saved["state_dict"])
    assert saved["optimizer_states"][0]["chainopt"]["model"]  # the originals and factors
    resumed = fit(tmp_path / "again", Tiny("configure", wrap), ckpt_path=mid(tmp_path))
    assert_resumed(reference, resumed)
    x = DATA.tensors[0]
    reference.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    for name in ("ckpts/last.ckpt", "weights.ckpt"):  # each loads as the fine-tuned model
        loaded = Tiny.load_from_checkpoint(tmp_path / name, wrap=wrap)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), reference.lightning_module(x))


def test_ckpt_path_last(tmp_path: Path) -> None:
    reference = fit(tmp_path / "ref", Tiny("configure"), ChainLoRACheckpoint(), checkpoints=False)
    fit(tmp_path, Tiny("configure"), ChainLoRACheckpoint(), steps=SAVE_EVERY + 1)  # past it
    assert torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=False)["global_step"] == 4
    resumed = fit(tmp_path, Tiny("configure"), ChainLoRACheckpoint(), ckpt_path="last")
    assert_resumed(reference, resumed)


def test_strict_loading_false(tmp_path: Path) -> None:
    def lenient() -> Tiny:
        module = Tiny("configure")
        module.strict_loading = False
        return module

    reference = fit(tmp_path, lenient(), ChainLoRACheckpoint(merged=False))
    resumed = fit(
        tmp_path / "again", lenient(), ChainLoRACheckpoint(merged=False), ckpt_path=mid(tmp_path)
    )
    assert_resumed(reference, resumed)


def test_no_checkpoint_trains_as_without_the_callback(tmp_path: Path) -> None:
    plain = fit(tmp_path / "a", Tiny("configure"), checkpoints=False)
    with_callback = fit(tmp_path / "b", Tiny("configure"), ChainLoRACheckpoint(), checkpoints=False)
    assert_same(plain.lightning_module.state_dict(), with_callback.lightning_module.state_dict())
    assert_same(state_of(chain_of(plain)), state_of(chain_of(with_callback)))


@pytest.mark.parametrize("chain_in", ["configure", "init"])
def test_load_from_checkpoint_gives_the_fine_tuned_model(tmp_path: Path, chain_in: str) -> None:
    t = fit(tmp_path, Tiny(chain_in), ChainLoRACheckpoint())
    x = DATA.tensors[0]
    with torch.no_grad():
        expected = t.lightning_module(x)
    loaded = Tiny.load_from_checkpoint(tmp_path / "ckpts" / "last.ckpt", chain_in=chain_in)
    if chain_in == "configure":
        assert all(type(m) is nn.Linear for m in loaded.net if isinstance(m, nn.Linear))
        assert not any(".parametrizations." in k for k in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected)


def test_load_from_checkpoint_of_a_parametrized_checkpoint_raises(tmp_path: Path) -> None:
    # merged=False (or save_weights_only) keeps the chain's keys: Lightning refuses them loudly.
    fit(tmp_path, Tiny("configure"), ChainLoRACheckpoint(merged=False))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        Tiny.load_from_checkpoint(mid(tmp_path), chain_in="configure")


def test_validate_from_checkpoint(tmp_path: Path) -> None:
    t = fit(tmp_path, Tiny("configure"), ChainLoRACheckpoint())
    with torch.no_grad():
        expected = nn.functional.mse_loss(t.lightning_module(DATA.tensors[0]), DATA.tensors[1])
    last = tmp_path / "ckpts" / "last.ckpt"
    metrics = trainer(tmp_path, ChainLoRACheckpoint()).validate(
        Tiny("configure"), DataLoader(DATA, batch_size=12), ckpt_path=last, verbose=False
    )
    assert metrics[0]["val_loss"] == pytest.approx(float(expected), rel=1e-5)


def test_validate_refuses_an_unmerged_chain(tmp_path: Path) -> None:
    fit(tmp_path, Tiny("configure"), ChainLoRACheckpoint(merged=False))
    with pytest.raises(ValueError, match=r"unmerged chain on \['net\.0', 'net\.2'\]"):
        trainer(tmp_path, ChainLoRACheckpoint()).validate(
            Tiny("configure"), loader(), ckpt_path=mid(tmp_path), verbose=False
        )


def test_a_chain_configure_optimizers_does_not_build_raises(tmp_path: Path) -> None:
    fit(tmp_path, Tiny("configure"), ChainLoRACheckpoint(merged=False))
    with pytest.raises(RuntimeError, match="configure_optimizers\\(\\) did not build"):
        fit(tmp_path / "again", PlainAdamW(), ChainLoRACheckpoint(), ckpt_path=mid(tmp_path))


def test_configure_callbacks_brings_the_callback(tmp_path: Path) -> None:
    reference = fit(tmp_path, SelfContained("configure"))
    resumed = fit(tmp_path / "again", SelfContained("configure"), ckpt_path=mid(tmp_path))
    assert_resumed(reference, resumed)


def test_a_non_finite_link_keeps_the_parametrized_keys(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="keeps the parametrized state dict"):
        fit(tmp_path, Tiny("configure"), Poison(), ChainLoRACheckpoint(), steps=SAVE_EVERY)
    saved = torch.load(mid(tmp_path), weights_only=False)
    assert "net.0.parametrizations.weight.original" in saved["state_dict"]
    assert "model" not in saved["optimizer_states"][0]["chainopt"]


def test_without_lightning_the_import_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # "not installed"
    monkeypatch.delitem(sys.modules, "chainopt.integrations.lightning")
    with pytest.raises(ImportError, match="pip install lightning"):
        importlib.import_module("chainopt.integrations.lightning")


# --- KnotWarmup as the module's LR scheduler ---


class Warmed(Tiny):
    """``configure_optimizers`` returns a KnotWarmup (over LinearLR, or ReduceLROnPlateau)."""

    def __init__(self, plateau: bool = False, **config: Any) -> None:
        super().__init__()
        self.plateau, self.config = plateau, config

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        from chainopt import KnotWarmup

        opt = self.build_chain()
        inner: Any = (
            torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
            if self.plateau
            else torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=STEPS)
        )
        sched = KnotWarmup(inner, opt, warmup_steps=2)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, **self.config}}


class Rates(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("callback", [True, False])
def test_knot_warmup_from_configure_optimizers_trains_and_resumes_bitwise(
    tmp_path: Path, callback: bool
) -> None:
    """Before: Lightning refused it ("doesn't follow PyTorch's LRScheduler API")."""
    extra = [ChainLoRACheckpoint()] if callback else []
    rates = Rates()
    reference = fit(tmp_path, Warmed(interval="step"), rates, *extra)
    # LinearLR 1 -> 0.1 over STEPS, re-warmed over 2 steps after the knots after 3 and 6
    linear = [1e-2 * (1.0 - 0.9 * s / STEPS) for s in range(1, STEPS + 1)]
    warm = [1.0, 1.0, 0.5, 1.0, 1.0, 0.5, 1.0, 1.0]
    assert rates.lrs == [pytest.approx(a * b) for a, b in zip(linear, warm, strict=True)]
    resumed = fit(tmp_path / "again", Warmed(interval="step"), *extra, ckpt_path=mid(tmp_path))
    assert_resumed(reference, resumed)
    assert resumed.lr_scheduler_configs[0].scheduler.last_epoch == STEPS


def test_knot_warmup_over_reduce_lr_on_plateau_gets_the_monitored_metric(tmp_path: Path) -> None:
    config = {"interval": "step", "monitor": "train_loss", "reduce_on_plateau": True}
    reference = fit(tmp_path, Warmed(plateau=True, **config))
    sched = reference.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == STEPS and sched.scheduler.last_epoch == STEPS  # one metric a step
    # Lightning saves a step's checkpoint before it steps plateau schedulers: a resume from it
    # misses that step's metric (as for any ReduceLROnPlateau) and goes on from the next one
    resumed = fit(tmp_path / "again", Warmed(plateau=True, **config), ckpt_path=mid(tmp_path))
    assert resumed.lr_scheduler_configs[0].scheduler.last_epoch == STEPS - 1
    assert chain_of(resumed).optimizer_steps == STEPS
    # without "reduce_on_plateau": Lightning steps it with no metric; it says what to add
    with pytest.raises(TypeError, match='"reduce_on_plateau": True'):
        fit(tmp_path / "bare", Warmed(plateau=True, interval="step", monitor="train_loss"))


def test_knot_warmup_stepped_once_an_epoch_is_refused(tmp_path: Path) -> None:
    """Lightning's default interval is "epoch": the warm-up would be skipped silently."""
    with pytest.raises(RuntimeError, match=r"optimizer steps passed.*\"interval\": \"step\""):
        fit(tmp_path, Warmed(), checkpoints=False)


@pytest.mark.parametrize("merged", [True, False])
def test_a_weights_only_checkpoint_follows_the_callbacks_choice(
    tmp_path: Path, merged: bool
) -> None:
    """Lightning calls no callback's ``on_save_checkpoint`` for a weights-only checkpoint
    (``save_weights_only``, ``save_checkpoint(weights_only=True)``): with
    ``ChainLoRACheckpoint()`` it kept the parametrized keys, which ``load_from_checkpoint``
    refuses, where the docs (and the run without the callback) give the merged model."""
    t = fit(tmp_path, Tiny("configure"), ChainLoRACheckpoint(merged=merged), checkpoints=False)
    t.save_checkpoint(tmp_path / "weights.ckpt", weights_only=True)
    saved = torch.load(tmp_path / "weights.ckpt", weights_only=False)["state_dict"]
    assert any(".parametrizations." in k for k in saved) is not merged
    if merged:
        loaded = Tiny.load_from_checkpoint(tmp_path / "weights.ckpt")
        x = DATA.tensors[0]
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), t.lightning_module(x))


class BuiltOnce(Tiny):
    """Builds the chain at the first ``configure_optimizers()``, returns it at every later one."""

    def configure_optimizers(self) -> Any:
        if self.chain is None:
            self.chain = self.build_chain()
        return super().configure_optimizers()


def test_a_chain_built_again_at_a_second_fit_is_refused_saying_to_build_it_once(
    tmp_path: Path,
) -> None:
    """Lightning calls ``configure_optimizers()`` at every ``fit`` (and in ``Tuner.lr_find``):
    a chain built there anew finds the module chained by the first. The refusal said to copy the
    optimizer or unload the links, nothing about the code that ran twice."""
    module = Tiny()
    fit(tmp_path, module, checkpoints=False)
    with pytest.raises(ValueError, match=r"configure_optimizers\(\) at every fit.*build the chain"):
        fit(tmp_path, module, checkpoints=False)


@pytest.mark.parametrize("callback", [False, True])
def test_tuner_lr_find_then_fit_of_a_chain_built_once_is_a_plain_fit(
    tmp_path: Path, callback: bool
) -> None:
    """``Tuner.lr_find`` trains through knots, then restores its checkpoint: the chain goes back
    to step 0 and the fit that follows (the second ``configure_optimizers()``) is bitwise a fit
    without the search."""
    from lightning.pytorch.tuner import Tuner

    extra = [ChainLoRACheckpoint()] if callback else []
    module = BuiltOnce()
    tuned = trainer(tmp_path / "tuned", *extra, checkpoints=False)
    Tuner(tuned).lr_find(
        module, loader(), num_training=STEPS, update_attr=False, early_stop_threshold=None
    )
    assert chain_of(tuned).optimizer_steps == 0 and chain_of(tuned).knots_tied == 0
    tuned.fit(module, loader())
    reference = fit(tmp_path / "plain", Tiny(), *extra, checkpoints=False)
    assert chain_of(tuned) is module.chain and chain_of(tuned).knots_tied == STEPS // KNOT_EVERY
    assert_same(reference.lightning_module.state_dict(), module.state_dict())
    assert_same(state_of(chain_of(reference)), state_of(chain_of(tuned)), "optimizer")


class PlainBesideTheChain(Tiny):
    """Builds the chain in ``__init__`` but returns a plain optimizer over the module."""

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def test_a_plain_optimizer_beside_a_chain_built_in_init_is_refused_at_its_first_step(
    tmp_path: Path,
) -> None:
    """It stepped the chain's factors and tied no knot: one LoRA link, silently."""
    module = PlainBesideTheChain("init")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"AdamW is not the chain's optimizer"):
        fit(tmp_path, module, checkpoints=False)
    assert module.chain is not None and module.chain.optimizer_steps == 0
    assert_same(module.state_dict(), before)
