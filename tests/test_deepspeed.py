"""DeepSpeed through ``chainopt.integrations.deepspeed``: DeepSpeed's CPU accelerator, gloo.

Workers are forked (2 ranks, or 1) and import DeepSpeed themselves: this process never imports
it or initialises a process group, so the forked workers of later tests start clean. Each worker
runs several engines in turn (one DeepSpeed import per process) and writes what it holds; the
tests compare across ranks (bitwise), against one process without DeepSpeed on the global batch
(float tolerance), and a resumed run against an uninterrupted one (bitwise).

On its first ``init_distributed`` DeepSpeed JIT-compiles a shared-memory comm op that only its
inference all-reduce uses (two minutes on two cores); the workers turn it off.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spawn import spawn
from torch import nn

from chainopt import ChainLoRAOptimizer
from chainopt._attach import lora_parametrization
from chainopt._layers import record_of
from chainopt.merge import merged_bias, merged_weight

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="needs DeepSpeed (pip install deepspeed)",
    ),
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available())
        or "fork" not in mp.get_all_start_methods(),
        reason="needs torch.distributed with gloo, and fork",
    ),
]

ROOT = Path(__file__).resolve().parents[1]
IN, HID, OUT = 8, 6, 5
STEPS, SAVE_AT = 9, 5  # knots after steps 2, 4, 6, 8; the checkpoint is mid-link
KNOT_STEPS = (2, 4, 6, 8)
STAGES = (0, 1, 2, 3)


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, HID), nn.Tanh(), nn.Linear(HID, OUT)]
    return nn.Sequential(*layers).to(dtype)


def _build(dtype: torch.dtype = torch.float32, **kwargs: Any) -> tuple[nn.Module, Any]:
    """Two adapted layers with bias deltas, a trainable head in a param group of its own."""
    model = _mlp(dtype)
    head = list(model[4].parameters())
    rest = [p for p in model.parameters() if all(p is not h for h in head)]
    base = torch.optim.AdamW([{"params": head}, {"params": rest}], lr=1e-2, weight_decay=0.01)
    options: dict[str, Any] = {"rank": 2, "knot_every": 2, "lora_bias": True, "seed": 7, **kwargs}
    opt = ChainLoRAOptimizer(
        model, base, target_modules=["0", "2"], trainable_modules=["4"], alpha=4, **options
    )
    return model, opt


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (8 rows); of 2 ranks, rank r takes rows 4r..4r+3."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, IN, generator=gen), torch.randn(8, OUT, generator=gen)


PROBE = torch.randn(3, IN, generator=torch.Generator().manual_seed(5))


def _single(dtype: torch.dtype = torch.float32, reset: str = "full") -> dict[str, torch.Tensor]:
    """One process, no DeepSpeed, the global batch: what every run should end near (with the
    factors' first moments under ``"exp_avg.<i>"``)."""
    model, opt = _build(dtype, reset=reset)
    for step in range(STEPS):
        x, y = _batch(step)
        nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        opt.step()
        opt.zero_grad()
    out = {k: v.detach().float().clone() for k, v in model.state_dict().items()}
    moments = {f"exp_avg.{i}": opt.state[p]["exp_avg"].clone() for i, p in enumerate(opt.factors())}
    return {**out, **moments}


# --- workers -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(fn: Callable[..., None], world: int, *args: Any, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world, port, *args)`` on ``world`` forked processes (:func:`spawn.spawn`)."""
    spawn(fn, world, world, _free_port(), *args, timeout=timeout, what="DeepSpeed workers")


def _init(rank: int, world: int, port: int, out: str) -> Any:
    """The process group, and DeepSpeed on its CPU accelerator over it."""
    torch.set_num_threads(1)  # forked: keep OpenMP out of the children
    os.environ.update(
        DS_ACCELERATOR="cpu",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/pg",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # inference-only; skip its build
    deepspeed.init_distributed("gloo")
    return deepspeed


def _config(stage: int, world: int, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 8 // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**6,
        "bf16": {"enabled": dtype == torch.bfloat16},
        # every parameter partitioned under ZeRO-3, however small
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    }


def _shape_of(p: torch.Tensor) -> torch.Size:
    return getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps only a partition in p


def _gathered(deepspeed: Any, params: list[nn.Parameter]) -> Any:
    return deepspeed.zero.GatheredParameters(params)  # a no-op below ZeRO-3


def _function(deepspeed: Any, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's function at ``x`` from its adapted weights, in float32 (gathered)."""
    with _gathered(deepspeed, list(model.parameters())), torch.no_grad():
        h = x
        for i in (0, 2, 4):
            module = model[i]
            if lora_parametrization(module) is None:
                w, b = module.weight.float(), module.bias.float()
            else:
                record = record_of(str(i), module)
                w, b = merged_weight(record, torch.float32), merged_bias(record, torch.float32)
            h = nn.functional.linear(h, w, b)
            h = torch.tanh(h) if i < 4 else h
        return h


def _whole(deepspeed: Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, whole (gathered under ZeRO-3), as float32 copies."""
    with _gathered(deepspeed, list(model.parameters())):
        return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def _masters(deepspeed: Any, opt: Any) -> list[torch.Tensor | None]:
    """DeepSpeed's fp32 master of every trainable parameter, flat (``None`` at stage 0)."""
    out = []
    for p in opt.model.parameters():
        if p.requires_grad:
            master = deepspeed.utils.safe_get_full_fp32_param(p)  # collective
            out.append(None if master is None else master.detach().reshape(-1).clone())
    return out


def _moments(handle: Any, opt: Any) -> list[torch.Tensor]:
    """The factors' first moments, whole, gathered from DeepSpeed's masters' state (collective).

    Not ``deepspeed.utils.safe_get_full_optimizer_state``: in DeepSpeed 0.19.8 it raises for the
    parameters of every ZeRO-1/2 param group after the first (DeepSpeed links each parameter to
    its state once, after the first group's step, before the later groups have any state).
    """
    factors = opt.factors()
    if handle._layout is None:  # stage 0: the optimizer's own state, per factor
        return [opt.optimizer.state[p]["exp_avg"].detach().clone() for p in factors]
    entries: dict[Any, dict[str, Any]] = {p: {} for p in factors}
    handle._gather_state(handle._layout, factors, entries)
    return [entries[p]["exp_avg"].float().clone() for p in factors]


def _train_and_watch(
    deepspeed: Any, engine: Any, opt: Any, steps: range, rank: int, world: int, log: dict[str, Any]
) -> None:
    dtype = next(engine.module.parameters()).dtype
    for step in steps:
        x, y = _batch(step)
        if world > 1:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        engine.backward(nn.functional.mse_loss(engine(x.to(dtype)).float(), y))
        engine.step()
        state = opt.optimizer.state
        log["steps"].append(sorted({float(v["step"]) for v in state.values() if "step" in v}))


def _watch_knots(deepspeed: Any, model: nn.Module, opt: Any, log: dict[str, Any]) -> None:
    """Record the function just before and after every knot, and the factors and masters after."""

    @contextmanager
    def around(chain: Any) -> Iterator[None]:
        before = _function(deepspeed, model, PROBE)
        yield
        log["function"].append((before, _function(deepspeed, model, PROBE)))

    # contexts are entered in the order they were added: this one outside the integration's
    opt.chain.contexts[-100] = around

    def after(o: Any, record: Any) -> None:
        with _gathered(deepspeed, o.factors()):
            values = [p.detach().float().clone() for p in o.factors()]
        masters = [deepspeed.utils.safe_get_full_fp32_param(p) for p in o.factors()]
        log["factors"].append((values, masters))

    opt.register_knot_hook(after)


def _run_then_destroy(body: Callable[[], None]) -> None:
    """Run ``body`` (which holds the engines), free what it held, then destroy the group.

    Tearing a DeepSpeed/DDP engine down after ``destroy_process_group`` can hang the exiting
    worker or abort it ("terminate called without an active exception").
    """
    try:
        body()
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _engine_worker(
    rank: int,
    world: int,
    port: int,
    out: str,
    dtype_name: str,
    via: str,
    runs: tuple[tuple[int, str, str], ...],
) -> None:
    deepspeed = _init(rank, world, port, out)
    import chainopt.integrations.deepspeed as chain_ds

    dtype = getattr(torch, dtype_name)

    def body() -> None:  # its engines are freed before the group is destroyed
        for stage, reset, accumulate in runs:
            model, opt = _build(dtype, reset=reset)
            log: dict[str, Any] = {"steps": [], "function": [], "factors": []}
            _watch_knots(deepspeed, model, opt, log)
            config = _config(stage, world, dtype)
            if accumulate:  # bf16 ZeRO-1 with fp32 gradient accumulation: BF16_Optimizer
                config["data_types"] = {"grad_accum_dtype": accumulate}
            name = f"{via}{stage}{reset}{accumulate}"
            if via == "accelerate":
                from accelerate import Accelerator
                from accelerate.state import AcceleratorState
                from accelerate.utils import DeepSpeedPlugin

                AcceleratorState._reset_state(True)  # a fresh plugin for each stage
                accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
                engine, _ = accelerator.prepare(model, opt)
                handle = chain_ds.deepspeed_knots(opt, engine)
            else:
                engine, *_ = chain_ds.initialize(model=model, optimizer=opt, config=config)
                handle = chain_ds._ATTACHED[opt]
            log["mode"] = handle.mode
            if via == "deepspeed":
                _train_and_watch(deepspeed, engine, opt, range(SAVE_AT), rank, world, log)
                ckpt = f"{out}/ckpt_{name}"
                chain_ds.save_checkpoint(engine, opt, ckpt, tag="mid", client_state={"epoch": 3})
                _train_and_watch(deepspeed, engine, opt, range(SAVE_AT, STEPS), rank, world, log)
            else:
                _train_and_watch(deepspeed, engine, opt, range(STEPS), rank, world, log)
            log["counts"] = (opt.optimizer_steps, opt.knots_tied)
            log["whole"] = _whole(deepspeed, model)
            log["masters"] = _masters(deepspeed, opt)
            log["norms"] = [dict(k.norms) for k in opt.history.knots]
            log["exp_avg"] = _moments(handle, opt)
            if via == "deepspeed":  # a new engine resumes from the mid-link checkpoint
                model2, opt2 = _build(dtype, reset=reset)
                engine2, *_ = chain_ds.initialize(model=model2, optimizer=opt2, config=config)
                _, client = chain_ds.load_checkpoint(engine2, opt2, ckpt, tag="mid")
                log["client"] = (client.get("epoch"), opt2.optimizer_steps, opt2.knots_tied)
                rest: dict[str, Any] = {"steps": []}
                _train_and_watch(deepspeed, engine2, opt2, range(SAVE_AT, STEPS), rank, world, rest)
                log["resumed"] = _whole(deepspeed, model2)
                log["resumed_masters"] = _masters(deepspeed, opt2)
            torch.save(log, f"{out}/{name}_{rank}.pt")

    _run_then_destroy(body)


def _results(
    out: Path, via: str, stage: int, reset: str = "full", accumulate: str = "", world: int = 2
) -> list[dict[str, Any]]:
    name = f"{via}{stage}{reset}{accumulate}"
    return [torch.load(out / f"{name}_{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks, fp32: every stage with the default reset, ZeRO-2/3 with reset="prune"."""
    out = tmp_path_factory.mktemp("ds_fp32")
    runs = (*((s, "full", "") for s in STAGES), (2, "prune", ""), (3, "prune", ""))
    _spawn(_engine_worker, 2, str(out), "float32", "deepspeed", runs)
    return out


@pytest.fixture(scope="module")
def bf16_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks, a bfloat16 model (chained in bf16: merge residuals), every stage."""
    out = tmp_path_factory.mktemp("ds_bf16")
    runs = (*((s, "full", "") for s in STAGES), (1, "full", "fp32"))
    _spawn(_engine_worker, 2, str(out), "bfloat16", "deepspeed", runs)
    return out


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks through Accelerate's DeepSpeed plugin, fp32, ZeRO-2 and ZeRO-3."""
    out = tmp_path_factory.mktemp("ds_accelerate")
    _spawn(_engine_worker, 2, str(out), "float32", "accelerate", ((2, "full", ""), (3, "full", "")))
    return out


@pytest.fixture(scope="module")
def single_fp32() -> dict[str, torch.Tensor]:
    return _single()


def _expected_steps(step: int) -> list[float]:
    """AdamW's step counters after optimizer step ``step`` (distinct values): the head's, and the
    factors' since the last knot (a knot drops their state: the next step is AdamW's first)."""
    since = step - max([k for k in KNOT_STEPS if k <= step], default=0)
    return sorted({float(step), float(since)}) if since else [float(step)]


def _assert_ranks_identical(runs: list[dict[str, Any]]) -> None:
    a, b = runs
    assert a["whole"].keys() == b["whole"].keys()
    for k in a["whole"]:
        assert torch.equal(a["whole"][k], b["whole"][k]), f"rank 0 vs rank 1: {k}"
    for m0, m1 in zip(a["masters"], b["masters"], strict=True):
        assert (m0 is None and m1 is None) or torch.equal(m0, m1)
    assert a["norms"] == b["norms"] and a["counts"] == b["counts"]


def _assert_close_to(run: dict[str, Any], single: dict[str, torch.Tensor]) -> None:
    moments = {f"exp_avg.{i}": m for i, m in enumerate(run["exp_avg"])}
    assert {**run["whole"], **moments}.keys() == single.keys()
    for k, v in single.items():
        got = moments[k] if k in moments else run["whole"][k]
        torch.testing.assert_close(got, v, rtol=1e-5, atol=1e-6, msg=k)


def _assert_knots_exact(run: dict[str, Any], atol: float) -> None:
    assert len(run["function"]) == len(KNOT_STEPS)
    for before, after in run["function"]:  # the knot does not change the function
        torch.testing.assert_close(after, before, rtol=0, atol=atol)
    for values, masters in run["factors"]:  # A restarted, B zero, in the model and the masters
        for i, v in enumerate(values):
            if i % 3 == 1:  # (A, B, bias delta) per module
                assert not v.any(), "B is not zero after the knot"
            if i % 3 == 2:
                assert not v.any(), "the bias delta is not zero after the knot"
        for v, m in zip(values, masters, strict=True):
            if m is not None:
                assert torch.equal(m.reshape(v.shape), v), "the master differs from the model"


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_fp32_knots_exact_identical_and_as_one_process(
    fp32_runs: Path, single_fp32: dict[str, torch.Tensor], stage: int
) -> None:
    runs = _results(fp32_runs, "deepspeed", stage)
    assert runs[0]["mode"] == ("stage 0" if stage == 0 else f"ZeRO-{stage}")
    assert runs[0]["counts"] == (STEPS, len(KNOT_STEPS))
    _assert_ranks_identical(runs)
    _assert_knots_exact(runs[0], atol=1e-6)
    # the factors' optimizer state restarts at every knot, the head's does not
    assert runs[0]["steps"] == [_expected_steps(s) for s in range(1, STEPS + 1)]
    # as one process without DeepSpeed on the global batch (DeepSpeed averages the ranks); the
    # factors' moments as DeepSpeed reports them too (its views follow the state a knot drops)
    _assert_close_to(runs[0], single_fp32)


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_resume_from_a_deepspeed_checkpoint_bitwise(fp32_runs: Path, stage: int) -> None:
    for run in _results(fp32_runs, "deepspeed", stage):
        assert run["client"] == (3, SAVE_AT, SAVE_AT // 2)  # the user's client_state, and the chain
        for k, v in run["whole"].items():
            assert torch.equal(run["resumed"][k], v), f"resumed: {k}"
        for m, r in zip(run["masters"], run["resumed_masters"], strict=True):
            assert (m is None and r is None) or torch.equal(m, r)


def test_two_ranks_fp32_prune_reset_gathers_each_moment_whole(fp32_runs: Path) -> None:
    single = _single(reset="prune")  # ReLoRA-style: the smallest 90% of each moment zeroed
    for stage in (2, 3):
        runs = _results(fp32_runs, "deepspeed", stage, reset="prune")
        _assert_ranks_identical(runs)
        _assert_knots_exact(runs[0], atol=1e-6)
        assert runs[0]["steps"] == [[float(s)] for s in range(1, STEPS + 1)]  # counters kept
        _assert_close_to(runs[0], single)


@pytest.mark.parametrize(
    ("stage", "accumulate", "mode"),
    [
        (0, "", "FP16_UnfusedOptimizer"),
        (1, "", "ZeRO-1"),
        (1, "fp32", "BF16_Optimizer"),
        (2, "", "ZeRO-2"),
        (3, "", "ZeRO-3"),
    ],
)
def test_two_ranks_bf16_knots_exact_in_the_weights_precision(
    bf16_runs: Path, stage: int, accumulate: str, mode: str
) -> None:
    runs = _results(bf16_runs, "deepspeed", stage, accumulate=accumulate)
    assert runs[0]["mode"] == mode
    assert runs[0]["counts"] == (STEPS, len(KNOT_STEPS))  # stage 0: its construction step uncounted
    _assert_ranks_identical(runs)
    # weight + merge residual hold W + s·B·A: rounded once, up to the residual's own rounding
    _assert_knots_exact(runs[0], atol=1e-4)
    assert any(k.endswith("merge_residual") and v.any() for k, v in runs[0]["whole"].items())
    assert runs[0]["steps"] == [_expected_steps(s) for s in range(1, STEPS + 1)]
    for run in runs:
        for k, v in run["whole"].items():
            assert torch.equal(run["resumed"][k], v), f"resumed: {k}"
    single = _single(torch.bfloat16)  # bf16 activations, fp32 factors: near, not equal
    for k, v in single.items():
        if k.endswith("original"):
            torch.testing.assert_close(runs[0]["whole"][k], v, rtol=2e-2, atol=2e-2, msg=k)


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_through_accelerate_as_through_deepspeed_initialize(
    accelerate_runs: Path, fp32_runs: Path, stage: int
) -> None:
    runs = _results(accelerate_runs, "accelerate", stage)
    direct = _results(fp32_runs, "deepspeed", stage)[0]
    assert runs[0]["counts"] == (STEPS, len(KNOT_STEPS))
    _assert_ranks_identical(runs)
    _assert_knots_exact(runs[0], atol=1e-6)
    for k, v in direct["whole"].items():
        assert torch.equal(runs[0]["whole"][k], v), k


# --- one process: as without DeepSpeed, bitwise; refusals; the docs' blocks --------------------


@pytest.fixture(scope="module")
def one_rank_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds_one")
    runs = (*((s, "full", "") for s in STAGES), (2, "moments", ""), (3, "moments", ""))
    _spawn(_engine_worker, 1, str(out), "float32", "deepspeed", runs)
    return out


@pytest.mark.parametrize(
    ("stage", "reset"), [*((s, "full") for s in STAGES), (2, "moments"), (3, "moments")]
)
def test_one_rank_is_bitwise_what_training_without_deepspeed_is(
    one_rank_runs: Path, stage: int, reset: str
) -> None:
    (run,) = _results(one_rank_runs, "deepspeed", stage, reset=reset, world=1)
    single = _single(reset=reset)
    moments = {f"exp_avg.{i}": m for i, m in enumerate(run["exp_avg"])}
    assert {**run["whole"], **moments}.keys() == single.keys()
    for k, v in single.items():
        assert torch.equal(moments[k] if k in moments else run["whole"][k], v), k
    for k, v in run["whole"].items():
        assert torch.equal(run["resumed"][k], v), f"resumed: {k}"


def _outcome(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as err:  # what each case raised is the result
        return f"{type(err).__name__}: {err}"
    return "ok"


def _checks_worker(rank: int, world: int, port: int, out: str) -> None:
    deepspeed = _init(rank, world, port, out)
    import chainopt.integrations.deepspeed as chain_ds

    def body() -> None:  # its engines are freed before the group is destroyed
        results: dict[str, Any] = {}

        def start(stage: int = 2, extra: dict[str, Any] | None = None, **kwargs: Any) -> Any:
            model, opt = _build(**kwargs)
            config = {**_config(stage, 1, torch.float32), **(extra or {})}
            return chain_ds.initialize(model=model, optimizer=opt, config=config)[0], opt

        results["step-down"] = _outcome(lambda: start(rank=[2, 1]))
        results["gradient"] = _outcome(lambda: start(init="gradient"))
        results["skip"] = _outcome(lambda: start(non_finite="skip", reset="moments"))
        offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                   "zero_force_ds_cpu_optimizer": False}  # fmt: skip
        results["offload"] = _outcome(lambda: start(extra=offload))

        def one_group(reset: str) -> None:  # the head shares the factors' param group
            model = _mlp()
            opt = ChainLoRAOptimizer(
                model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules=["0"],
                trainable_modules=["4"], rank=2, knot_every=2, reset=reset,
            )  # fmt: skip
            chain_ds.initialize(model=model, optimizer=opt, config=_config(2, 1, torch.float32))

        results["one-group-full"] = _outcome(lambda: one_group("full"))
        results["one-group-moments"] = _outcome(lambda: one_group("moments"))

        class Eager(torch.optim.SGD):  # builds its state at construction, as Adagrad once did
            def __init__(self, params: Any) -> None:
                super().__init__(params, lr=0.1, momentum=0.9)
                for group in self.param_groups:
                    for p in group["params"]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)

        def optimizer(factory: Callable[[Any], Any]) -> None:
            model = _mlp()
            opt = ChainLoRAOptimizer(model, factory, target_modules=["0"], rank=2, knot_every=2)
            chain_ds.initialize(model=model, optimizer=opt, config=_config(2, 1, torch.float32))

        results["eager-state"] = _outcome(lambda: optimizer(Eager))
        results["adagrad"] = _outcome(lambda: optimizer(lambda ps: torch.optim.Adagrad(ps, lr=0.1)))
        import schedulefree

        results["schedule-free"] = _outcome(
            lambda: optimizer(lambda ps: schedulefree.AdamWScheduleFree(ps, lr=1e-2))
        )

        # gradient accumulation: DeepSpeed steps at its boundaries, knots count those steps
        counts = []
        for stage in (2, 3):
            engine, opt = start(stage, {"gradient_accumulation_steps": 2})
            for step in range(8):
                x, y = _batch(step)
                engine.backward(nn.functional.mse_loss(engine(x), y))
                engine.step()
            counts.append((opt.optimizer_steps, opt.knots_tied))
        results["accumulate"] = counts

        # a step DeepSpeed skips (its gradient norm is not finite) is not counted; a link that
        # went NaN is refused by the knot on every stage, and no weight changes
        refused = []
        for stage in (2, 3):
            engine, opt = start(stage)
            model = opt.model
            x, y = _batch(0)
            engine.backward(nn.functional.mse_loss(engine(torch.full_like(x, float("nan"))), y))
            engine.step()
            skipped = (engine.was_step_applied(), opt.optimizer_steps)
            engine.backward(nn.functional.mse_loss(engine(x), y))
            engine.step()
            b = model[0].parametrizations.weight[0].lora_B
            deepspeed.utils.safe_set_full_fp32_param(b, torch.full(_shape_of(b), float("nan")))
            frozen = {k: v for k, v in _whole(deepspeed, model).items() if "original" in k}
            engine.backward(nn.functional.mse_loss(engine(x), y))
            outcome = _outcome(engine.step)  # the second optimizer step: a knot is due
            after = _whole(deepspeed, model)  # gathers: the knot's context was left cleanly
            same = all(torch.equal(after[k], v) for k, v in frozen.items())
            refused.append((skipped, outcome.split(":")[0], same, opt.knots_tied))
        results["nan"] = refused

        engine, opt = start()
        results["twice"] = _outcome(lambda: chain_ds.deepspeed_knots(opt, engine))

        def other_optimizer() -> None:
            model, opt = _build()
            engine, *_ = deepspeed.initialize(
                model=model, optimizer=opt.optimizer,
                config={**_config(2, 1, torch.float32), "zero_allow_untested_optimizer": True},
            )  # fmt: skip
            chain_ds.deepspeed_knots(opt, engine)

        results["other-optimizer"] = _outcome(other_optimizer)

        # the control: the chain handed to ZeRO-2 as it is, without deepspeed_knots
        model, opt = _build()
        config = {**_config(2, 1, torch.float32), "zero_allow_untested_optimizer": True}
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        x, y = _batch(0)
        engine.backward(nn.functional.mse_loss(engine(x), y))
        before = {k: v.clone() for k, v in model.state_dict().items()}

        def plain_step() -> None:
            engine.step()

        outcome = _outcome(plain_step)
        b = model[0].parametrizations.weight[0].lora_B
        unchanged = all(
            torch.equal(before[k], v) for k, v in model.state_dict().items() if "original" in k
        )
        results["control"] = (outcome, opt.knots_tied, float(b.abs().max()), unchanged)

        # the docs' blocks: the page's setup, then the DeepSpeed section's blocks
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
        page = (ROOT / "docs" / "integrations.md").read_text()
        section = page[page.index("## DeepSpeed") :]
        code = [re.findall(r"```python\n(.*?)```", page, re.DOTALL)[0]]
        code += re.findall(r"```python\n(.*?)```", section, re.DOTALL)
        os.chdir(out)
        namespace: dict[str, Any] = {"__name__": "docs_integrations"}
        docs = []
        for i, block in enumerate(code):
            docs.append(
                _outcome(
                    lambda block=block, i=i: exec(compile(block, f"block {i}", "exec"), namespace)
                )
            )
        results["docs"] = (len(code), docs)
        torch.save(results, f"{out}/checks.pt")

    _run_then_destroy(body)


@pytest.fixture(scope="module")
def checks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("ds_checks")
    _spawn(_checks_worker, 1, str(out))
    return dict(torch.load(out / "checks.pt", weights_only=False))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("step-down", "ValueError: rank step-down (rank=[2, 1]) is not supported under DeepSpeed"),
        ("gradient", 'ValueError: init="gradient" is not supported under DeepSpeed'),
        ("skip", 'ValueError: non_finite="skip" needs reset="full" under DeepSpeed'),
        ("offload", "NotImplementedError: chainopt does not support ZeRO-Offload"),
        (
            "one-group-full",
            'ValueError: reset="full" is not supported under DeepSpeed (ZeRO-2) when',
        ),
        ("one-group-moments", "ok"),
        ("adagrad", "ValueError: Adagrad built optimizer state for the factors at construction"),
        ("twice", "RuntimeError: deepspeed_knots was already called for this chain"),
        (
            "other-optimizer",
            "ValueError: this engine was not initialised with this ChainLoRAOptimizer",
        ),
    ],
)
def test_modes_that_cannot_be_exact_are_refused(
    checks: dict[str, Any], case: str, expected: str
) -> None:
    assert checks[case].startswith(expected), checks[case]


def test_without_the_integration_a_zero2_knot_is_refused_not_undone(
    checks: dict[str, Any],
) -> None:
    outcome, knots, _b, unchanged = checks["control"]
    # ZeRO-2 replaced the wrapped optimizer's groups with its masters: the chain's step is
    # called once per param group and would tie a knot half-way through DeepSpeed's step, that
    # DeepSpeed's stale masters then undo; the knot refuses instead, changing no weight
    assert outcome.startswith("RuntimeError: the wrapped optimizer no longer steps"), outcome
    assert knots == 0 and unchanged


def test_knots_count_deepspeed_optimizer_steps_under_gradient_accumulation(
    checks: dict[str, Any],
) -> None:
    assert checks["accumulate"] == [(4, 2), (4, 2)]  # 8 micro-batches, 2 per step: ZeRO-2, -3


def test_a_skipped_step_is_not_counted_and_a_nan_link_changes_no_weight(
    checks: dict[str, Any],
) -> None:
    skipped = (False, 0)  # not applied, not counted
    assert checks["nan"] == [(skipped, "NonFiniteUpdateError", True, 0)] * 2  # ZeRO-2, ZeRO-3


def test_the_docs_deepspeed_blocks_run(checks: dict[str, Any]) -> None:
    count, outcomes = checks["docs"]
    assert count == 3  # the page's setup block and the two DeepSpeed blocks
    assert outcomes == ["ok"] * count
