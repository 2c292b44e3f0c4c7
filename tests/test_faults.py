"""Faults: NaN/Inf never reaches a weight; a crash anywhere resumes to the same final weights.

* A NaN/Inf loss or gradient injected mid-link: ``non_finite="raise"`` stops at the knot with no
  weight changed (and the last checkpoint resumes to the clean run); ``"skip"`` drops the bad
  links, merges the rest and trains on; a ``GradScaler`` skips the step before any of that.
* A knot that fails half-way (an exception raised from inside the merge or the new-link draw):
  the in-memory chain is partial, the last checkpoint is not, and resuming from it matches an
  uninterrupted run bitwise.
* Real processes killed with SIGKILL at random steps, inside a knot and inside a checkpoint write,
  then resumed from the last checkpoint, again and again: the final weights and optimizer state
  equal an uninterrupted run's bitwise.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from models import mlp, snapshot
from torch import nn

import chainopt.knot as knot_mod
from chainopt import ChainLoRAOptimizer, NonFiniteUpdateError
from chainopt._attach import lora_parametrization
from chainopt._record import ModuleRecord
from chainopt.checkpoint import load_checkpoint, save_checkpoint

KNOT_EVERY = 4


WEIGHTS = ("0.parametrizations.weight.original", "2.parametrizations.weight.original")
FROZEN = (*WEIGHTS, "0.parametrizations.bias.original", "2.parametrizations.bias.original")


def _build(non_finite: str = "raise", head: bool = True) -> tuple[nn.Module, ChainLoRAOptimizer]:
    torch.manual_seed(5)
    model = mlp()
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01),
        target_modules=["0", "2"],
        trainable_modules=["4"] if head else None,
        rank=3,
        knot_every=KNOT_EVERY,
        lora_bias=True,
        seed=9,
        non_finite=non_finite,  # type: ignore[arg-type]
        keep_history=True,
    )
    return model, opt


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(500 + step)
    x, y = torch.randn(8, 12, generator=gen), torch.randn(8, 6, generator=gen)
    return nn.functional.mse_loss(model(x), y)


def _step(model: nn.Module, opt: ChainLoRAOptimizer, step: int, poison: float = 0.0) -> None:
    loss = _loss(model, step)
    (loss * poison if poison else loss).backward()  # poison: nan or inf times the loss
    opt.step()
    opt.zero_grad()


def _assert_equal_states(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- NaN / Inf in the loss or a gradient ---


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_raise_policy_stops_at_the_knot_and_the_checkpoint_recovers(
    tmp_path: Path, bad: float
) -> None:
    clean, clean_opt = _build()
    for step in range(8):
        _step(clean, clean_opt, step)

    model, opt = _build()
    _step(model, opt, 0)
    save_checkpoint(tmp_path / "ckpt.pt", model, opt)
    frozen = {k: snapshot(model)[k] for k in FROZEN}
    _step(model, opt, 1, poison=bad)  # mid-link: the knot is after step 4
    assert not torch.isfinite(lora_parametrization(model[0]).lora_B).all()
    _step(model, opt, 2)
    with pytest.raises(NonFiniteUpdateError, match=r"\['0', '2'\] at knot 1 .*no weight"):
        _step(model, opt, 3)
    for k in FROZEN:  # the frozen weights and biases never saw the bad link
        assert torch.equal(snapshot(model)[k], frozen[k]), k
    assert opt.knots_tied == 0

    model, opt = _build()
    load_checkpoint(tmp_path / "ckpt.pt", model, opt)
    for step in range(1, 8):
        _step(model, opt, step)
    _assert_equal_states(snapshot(model), snapshot(clean))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_skip_policy_drops_a_bad_loss_and_trains_on(bad: float) -> None:
    model, opt = _build("skip", head=False)
    _step(model, opt, 0)
    frozen = {k: snapshot(model)[k] for k in FROZEN}
    _step(model, opt, 1, poison=bad)
    _step(model, opt, 2)
    with pytest.warns(RuntimeWarning, match=r"\['0', '2'\].*dropped those links unmerged"):
        _step(model, opt, 3)
    for k in FROZEN:
        assert torch.equal(snapshot(model)[k], frozen[k]), k
    assert opt.knots_tied == 1 and opt.history.knots[-1].skipped == ("0", "2")
    for step in range(4, 12):  # the next links train and merge normally
        _step(model, opt, step)
    assert opt.knots_tied == 3 and opt.history.knots[-1].skipped == ()
    assert all(torch.isfinite(v).all() for v in snapshot(model).values())
    assert not torch.equal(snapshot(model)[WEIGHTS[0]], frozen[WEIGHTS[0]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_skip_policy_drops_only_the_link_whose_gradient_went_bad(bad: float) -> None:
    model, opt = _build("skip")
    for step in range(3):
        _step(model, opt, step)
    before = snapshot(model)
    # a bad gradient for one factor on the step that ends the link (earlier, the NaN factor
    # would spread to every link through the next forward and backward)
    hook = lora_parametrization(model[2]).lora_B.register_hook(lambda g: torch.full_like(g, bad))
    with pytest.warns(RuntimeWarning, match=r"\['2'\].*dropped those links unmerged"):
        _step(model, opt, 3)
    hook.remove()
    after, record = snapshot(model), opt.history.knots[-1]
    assert record.skipped == ("2",)
    assert torch.equal(after[WEIGHTS[1]], before[WEIGHTS[1]])  # the bad link never merged
    good = record.links["0"]  # the finite link of module "0" merged, exactly
    expected = before[WEIGHTS[0]].addmm(good.B, good.A, alpha=good.scale)
    torch.testing.assert_close(after[WEIGHTS[0]], expected, rtol=0, atol=1e-7)
    for step in range(4, 8):
        _step(model, opt, step)
    assert opt.history.knots[-1].skipped == ()
    assert all(torch.isfinite(v).all() for v in snapshot(model).values())


def test_a_grad_scaler_skips_the_step_before_anything_reaches_the_chain() -> None:
    model, opt = _build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(3):
        scaler.scale(_loss(model, step) * (float("inf") if step == 1 else 1.0)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    # the inf step was skipped: it is no optimizer step, so the knot schedule does not see it
    assert opt.optimizer_steps == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


# --- a knot that fails half-way ---


@pytest.mark.parametrize("where", ["merge of the second module", "drawing the new links"])
def test_resuming_after_a_knot_failed_half_way_matches_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    total = 11
    straight, straight_opt = _build()
    for step in range(total):
        _step(straight, straight_opt, step)

    model, opt = _build()
    for step in range(3):
        _step(model, opt, step)
        save_checkpoint(tmp_path / "ckpt.pt", model, opt, step=step + 1)
    on_disk = (tmp_path / "ckpt.pt").read_bytes()

    if where == "merge of the second module":
        real_merge = knot_mod.merge_

        def merge(record: ModuleRecord) -> None:
            if record.module is model[2]:
                raise RuntimeError("crash inside the knot")
            real_merge(record)

        monkeypatch.setattr(knot_mod, "merge_", merge)
    else:

        def draw(*args: Any) -> None:
            raise RuntimeError("crash inside the knot")

        monkeypatch.setattr(knot_mod, "restart_links", draw)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="crash inside the knot"):
        _step(model, opt, 3)  # the knot after step 4
    monkeypatch.undo()
    # in memory the chain is partial: module "0" merged, the knot not counted ...
    after = snapshot(model)
    assert not torch.equal(after[WEIGHTS[0]], before[WEIGHTS[0]])
    assert opt.knots_tied == 0 and opt.optimizer_steps == 4
    # ... the checkpoint is whole, and resuming from it gives the uninterrupted result
    assert (tmp_path / "ckpt.pt").read_bytes() == on_disk
    model, opt = _build()
    extra = load_checkpoint(tmp_path / "ckpt.pt", model, opt)
    for step in range(extra["step"], total):
        _step(model, opt, step)
    _assert_equal_states(snapshot(model), snapshot(straight))
    assert opt.knots_tied == straight_opt.knots_tied


# --- real processes killed with SIGKILL ---

TOTAL, SAVE_EVERY = 26, 3  # knots after 4, 8, ...; checkpoints after 3, 6, ... (mid-link)


def _worker(
    directory: str, conn: multiprocessing.connection.Connection, stall: tuple[str, int] | None
) -> None:
    """Train to TOTAL steps from the last checkpoint (if any), one step per "go" from ``conn``.

    Each step is reported. ``stall=(where, step)`` freezes the process from ``step`` on just
    inside a knot (after the first module merged) or a checkpoint write (the temporary file
    written, not yet renamed), and says so.
    """
    torch.set_num_threads(1)
    path = Path(directory) / "ckpt.pt"
    model, opt = _build()

    def freeze(where: str) -> None:
        if stall is not None and stall[0] == where and opt.optimizer_steps >= stall[1]:
            conn.send(("stalled", opt.optimizer_steps))
            time.sleep(120)

    if stall is not None and stall[0] == "knot":
        real_merge = knot_mod.merge_

        def merge(record: ModuleRecord) -> None:
            real_merge(record)
            if record.module is model[0]:
                freeze("knot")

        knot_mod.merge_ = merge  # type: ignore[assignment]  # in this forked process only
    if stall is not None and stall[0] == "save":
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            freeze("save")
            real_replace(src, dst)

        os.replace = replace  # type: ignore[assignment]
    if path.exists():
        load_checkpoint(path, model, opt)
    for step in range(opt.optimizer_steps, TOTAL):
        conn.recv()
        _step(model, opt, step)
        if (step + 1) % SAVE_EVERY == 0:
            save_checkpoint(path, model, opt)
        conn.send(("step", step + 1))
    save_checkpoint(Path(directory) / "final.pt", model, opt)
    conn.send(("done", TOTAL))


def _run(
    directory: Path,
    kill_after: int | None = None,
    delay: float = 0.0,
    stall: tuple[str, int] | None = None,
) -> bool:
    """Run a worker in lockstep; SIGKILL it. True if it finished instead.

    The kill comes ``delay`` seconds into the step after step ``kill_after`` (anywhere in the
    forward, backward, optimizer step, knot or checkpoint write; the worker cannot run ahead), or
    as soon as the worker stalls.
    """
    ctx = torch.multiprocessing.get_context("fork")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(str(directory), child, stall), daemon=True)
    proc.start()
    child.close()
    try:
        conn.send("go")
        while True:
            if not conn.poll(60):
                pytest.fail("the worker made no progress for 60s")
            try:
                kind, step = conn.recv()
            except (EOFError, OSError):
                pytest.fail(f"the worker died on its own (exit code {proc.exitcode})")
            if kind == "done":
                return True
            if kind == "step" and (kill_after is None or step < kill_after):
                conn.send("go")
                continue
            if kind == "step":
                conn.send("go")
                time.sleep(delay)
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
            return False
    finally:
        proc.join(10)
        conn.close()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    _build()  # import what building imports once here, not in every forked worker
    directory = tmp_path_factory.mktemp("straight")
    assert _run(directory)
    return torch.load(directory / "final.pt", weights_only=True)


@pytest.mark.skipif(
    not hasattr(signal, "SIGKILL") or "fork" not in multiprocessing.get_all_start_methods(),
    reason="needs SIGKILL and fork",
)
@pytest.mark.parametrize(
    "kills",
    [
        pytest.param(("random", 0), id="3-random-points-seed0"),
        pytest.param(("random", 1), id="3-random-points-seed1"),
        pytest.param(("random", 2), id="3-random-points-seed2"),
        pytest.param((("knot", 8), ("knot", 17)), id="inside-knots"),
        pytest.param((("save", 5), ("save", 13)), id="inside-checkpoint-writes"),
    ],
)
def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(
    tmp_path: Path, uninterrupted: dict[str, Any], kills: tuple[Any, ...]
) -> None:
    if kills[0] == "random":
        rng = random.Random(kills[1])
        steps = sorted(rng.sample(range(1, TOTAL), 3))
        for kill_after in steps:
            assert not _run(tmp_path, kill_after, delay=rng.uniform(0, 0.004))
    else:
        for stall in kills:
            assert not _run(tmp_path, stall=stall)
        if kills[0][0] == "save":  # a write killed before its rename leaves a temp file behind
            assert len(list(tmp_path.glob(".ckpt.pt.*.tmp"))) == 1
    assert _run(tmp_path)
    assert not list(tmp_path.glob(".ckpt.pt.*.tmp"))  # the next saves cleaned them up
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    _assert_equal_states(final["model"], uninterrupted["model"])
    ours, theirs = final["optimizer"], uninterrupted["optimizer"]
    assert ours["chainopt"]["knots_tied"] == theirs["chainopt"]["knots_tied"] == TOTAL // 4
    assert torch.equal(ours["chainopt"]["generator"], theirs["chainopt"]["generator"])
    for i, entry in theirs["state"].items():
        for k, v in entry.items():
            assert torch.equal(ours["state"][i][k], v), (i, k)
