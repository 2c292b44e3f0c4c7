"""DDP and FSDP2 with 2 ranks on CPU (gloo), started by the test; tiny models.

Workers are forked (no second import of torch) and write what they hold to files; the test
compares them: across ranks (bitwise), against a single process on the same global batch (float
tolerance) and against a resumed run (bitwise).
"""

from __future__ import annotations

import copy
import functools
import gc
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spawn import spawn
from torch import nn

from chainopt import ChainLoRAOptimizer, merged_state_dict
from chainopt._dtensor import full_tensor, is_sharded
from chainopt.checkpoint import load_checkpoint, save_checkpoint

WORLD = 2
STEPS, SAVE_AT = 9, 5  # knots after steps 2, 4, 6, 8; the checkpoint is mid-link
IN, OUT = 8, 5

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available())
    or "fork" not in mp.get_all_start_methods(),
    reason="needs torch.distributed with gloo, and fork",
)


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(IN, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, OUT)]
    return nn.Sequential(*layers).to(dtype)


def _build(
    seed: int = 7, dtype: torch.dtype = torch.float32, **policies: Any
) -> tuple[nn.Module, Any]:
    model = _mlp(dtype)
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01),
        target_modules=["0", "2"],
        trainable_modules=["4"],
        rank=2,
        alpha=4,
        knot_every=2,
        lora_bias=True,
        seed=seed,
        **policies,
    )
    return model, opt


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (8 rows); rank r takes rows 4r..4r+3."""
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, IN, generator=gen), torch.randn(8, OUT, generator=gen)


def _train(
    model: nn.Module, opt: Any, steps: range, rank: int | None = None, dtype: Any = None
) -> None:
    for step in steps:
        x, y = _batch(step)
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        out = model(x if dtype is None else x.to(dtype))
        nn.functional.mse_loss(out.float(), y).backward()
        opt.step()
        opt.zero_grad()


def _whole(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, gathered whole when sharded (collective under FSDP2)."""
    bare = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {k: full_tensor(v).detach().clone() for k, v in bare.state_dict().items()}


def _spawn(fn: Callable[..., None], *args: Any, timeout: float = 120.0) -> None:
    """Run ``fn(rank, *args)`` on ``WORLD`` forked processes (:func:`spawn.spawn`)."""
    spawn(fn, WORLD, *args, timeout=timeout, what="distributed workers")


def _init(rank: int, out: str, backend: str = "gloo") -> None:
    torch.set_num_threads(1)  # forked: keep OpenMP out of the children
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{out}/pg",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )


def _in_group(body: Callable[..., None]) -> Callable[..., None]:
    """A worker that runs ``body(rank, out, *args)`` inside the process group.

    The body's DDP/FSDP objects are freed (its frame returns, then a collection) before the group
    is destroyed: torch's teardown of a DDP reducer after ``destroy_process_group`` can hang the
    exiting process, or abort it ("terminate called without an active exception").
    """

    @functools.wraps(body)
    def worker(rank: int, out: str, *args: Any) -> None:
        _init(rank, out, "nccl" if args[:1] == ("cuda",) else "gloo")  # FSDP: (device, dtype)
        try:
            body(rank, out, *args)
            gc.collect()
            dist.barrier()
        finally:
            dist.destroy_process_group()

    return worker


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


# --- DDP ---


@_in_group
def _ddp_worker(rank: int, out: str) -> None:
    ddp = nn.parallel.DistributedDataParallel
    model, opt = _build()
    wrapped = ddp(model)
    _train(wrapped, opt, range(SAVE_AT), rank)
    save_checkpoint(f"{out}/mid.pt", wrapped, opt)  # collective; rank 0 writes
    _train(wrapped, opt, range(SAVE_AT, STEPS), rank)
    assert opt.knots_tied == STEPS // 2
    try:  # rank 0 cannot write: every rank hears of it, none hangs
        save_checkpoint(f"{out}/no/such/dir/ckpt.pt", wrapped, opt)
        failed = ""
    except OSError as err:
        failed = f"{type(err).__name__}: {err}"
    torch.save(
        {"model": _whole(wrapped), "opt": opt.state_dict(), "failed": failed},
        f"{out}/final{rank}.pt",
    )

    # resume from the checkpoint on both ranks
    model2, opt2 = _build()
    wrapped2 = ddp(model2)
    load_checkpoint(f"{out}/mid.pt", wrapped2, opt2)
    _train(wrapped2, opt2, range(SAVE_AT, STEPS), rank)
    torch.save(_whole(wrapped2), f"{out}/resumed{rank}.pt")

    # control: each rank draws new links from its own generator (seed=rank)
    model3, opt3 = _build(seed=rank)
    _train(ddp(model3), opt3, range(3), rank)
    torch.save(_whole(model3), f"{out}/control{rank}.pt")


def test_ddp_ranks_stay_identical_match_one_process_and_resume(tmp_path: Path) -> None:
    # one process on the global batch; first, so the forked workers inherit what it imported
    model, opt = _build()
    _train(model, opt, range(STEPS))
    single = _whole(model)

    _spawn(_ddp_worker, str(tmp_path))
    final = [torch.load(tmp_path / f"final{r}.pt", weights_only=True) for r in range(WORLD)]
    # every parameter (frozen weights, factors, head) and the optimizer state, bitwise
    _assert_same(final[0]["model"], final[1]["model"], "rank 0 vs rank 1")
    s0, s1 = final[0]["opt"], final[1]["opt"]
    assert s0["chainopt"]["knots_tied"] == s1["chainopt"]["knots_tied"] == STEPS // 2
    assert torch.equal(s0["chainopt"]["generator"], s1["chainopt"]["generator"])
    for i in s0["state"]:
        for k, v in s0["state"][i].items():
            assert torch.equal(v, s1["state"][i][k]), (i, k)

    assert final[0]["failed"].startswith("FileNotFoundError")
    assert final[1]["failed"].startswith("OSError: rank 0 could not write the checkpoint")

    # equal to one process on the global batch (DDP averages the per-rank mean gradients)
    for k, v in single.items():
        torch.testing.assert_close(final[0]["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)

    # checkpoint on rank 0, resumed on 2 ranks: the same continuation, bitwise
    for r in range(WORLD):
        resumed = torch.load(tmp_path / f"resumed{r}.pt", weights_only=True)
        _assert_same(resumed, final[r]["model"], f"resumed rank {r}")

    # the control shows why the shared seeded generator matters: new links desync the ranks
    c0, c1 = (torch.load(tmp_path / f"control{r}.pt", weights_only=True) for r in range(WORLD))
    key = "0.parametrizations.weight.0.lora_A"
    assert (c0[key] - c1[key]).abs().max() > 0.05


# --- FSDP2 ---

_fsdp_support = pytest.mark.skipif(
    not hasattr(ChainLoRAOptimizer, "rebind_parameters"),
    reason="FSDP2 needs ChainLoRAOptimizer.rebind_parameters() and whole factors in knot records "
    "(the optimizer.py change proposed with issue #5)",
)


def _shard(model: nn.Module, device: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, (WORLD,))
    for i in (0, 2, 4):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)


@_in_group
def _fsdp_worker(rank: int, out: str, device: str, dtype: torch.dtype) -> None:
    model, opt = _build(dtype=dtype)
    model.to(device)
    _shard(model, device)
    opt.rebind_parameters()
    assert all(is_sharded(p) for p in model.parameters())
    residuals = [b for n, b in model.named_buffers() if n.endswith("merge_residual")]
    assert len(residuals) == (4 if dtype == torch.bfloat16 else 0)
    assert all(is_sharded(b) for b in residuals)  # sharded like their weights
    _train(model, opt, range(SAVE_AT), rank, dtype)
    save_checkpoint(f"{out}/mid.pt", model, opt)  # gathers, rank 0 writes
    _train(model, opt, range(SAVE_AT, STEPS), rank, dtype)
    assert opt.knots_tied == STEPS // 2
    final = _whole(model)
    for name, link in opt.history.knots[-1].links.items():  # whole, the same on every rank
        assert not is_sharded(link.A) and not is_sharded(link.B)
        final[f"history.{name}.A"], final[f"history.{name}.B"] = link.A, link.B
    torch.save(final, f"{out}/final{rank}.pt")
    torch.save(merged_state_dict(model), f"{out}/merged{rank}.pt")  # gathered, on every rank

    model2, opt2 = _build(dtype=dtype)
    model2.to(device)
    _shard(model2, device)
    opt2.rebind_parameters()
    load_checkpoint(f"{out}/mid.pt", model2, opt2)
    _train(model2, opt2, range(SAVE_AT, STEPS), rank, dtype)
    torch.save(_whole(model2), f"{out}/resumed{rank}.pt")

    # unloading sharded modules broke their forward: refused, nothing changed, training goes on
    before = _whole(model2)
    try:
        opt2.merge_and_unload()
    except ValueError as err:
        assert "FSDP2-sharded" in str(err) and "save_checkpoint" in str(err)
    else:
        raise AssertionError("merge_and_unload of FSDP2-sharded modules was not refused")
    _assert_same(_whole(model2), before, "after the refused unload")
    _train(model2, opt2, range(STEPS, STEPS + 1), rank, dtype)

    # wrapping a model that is already sharded is refused with advice
    late = _mlp().to(device)
    _shard(late, device)
    try:
        ChainLoRAOptimizer(
            late, torch.optim.SGD(late.parameters(), lr=1), target_modules=["0"], knot_every=2
        )
    except ValueError as err:
        assert "wrap the bare model with ChainLoRAOptimizer first" in str(err)
    else:
        raise AssertionError("wrapping an FSDP2-sharded model was not refused")


@_fsdp_support
@pytest.mark.parametrize(
    ("device", "dtype"),
    [
        ("cpu", torch.float32),
        ("cpu", torch.bfloat16),
        pytest.param(
            "cuda",
            torch.bfloat16,
            marks=pytest.mark.skipif(
                torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)"
            ),
        ),
    ],
)
def test_fsdp2_knots_on_sharded_weights(tmp_path: Path, device: str, dtype: torch.dtype) -> None:
    import torch.distributed.fsdp  # imported once here, not in each forked worker

    model, opt = _build(dtype=dtype)
    _train(model, opt, range(STEPS), dtype=dtype)
    single = _whole(model)

    _spawn(_fsdp_worker, str(tmp_path), device, dtype, timeout=180)
    final = [
        torch.load(tmp_path / f"final{r}.pt", weights_only=True, map_location="cpu")
        for r in range(WORLD)
    ]
    _assert_same(final[0], final[1], "rank 0 vs rank 1")
    for r in range(WORLD):
        resumed = torch.load(tmp_path / f"resumed{r}.pt", weights_only=True, map_location="cpu")
        _assert_same(resumed, {k: v for k, v in final[r].items() if k in resumed}, "resumed")

    assert {k for k in final[0] if not k.startswith("history.")} == single.keys()
    twin, _ = _build(dtype=dtype)  # the export of the same state, unsharded: bitwise the same
    twin.load_state_dict({k: v for k, v in final[0].items() if k in single})
    unsharded = merged_state_dict(twin)
    for r in range(WORLD):
        merged = torch.load(tmp_path / f"merged{r}.pt", weights_only=True, map_location="cpu")
        _assert_same(merged, unsharded, f"merged_state_dict on rank {r}")
    if dtype == torch.float32:
        for k, v in single.items():
            torch.testing.assert_close(final[0][k], v, rtol=1e-5, atol=1e-6, msg=k)
    else:  # bf16 activations round differently per batch split; compare the adapted weights
        for k, v in single.items():
            if k.endswith("original"):
                torch.testing.assert_close(final[0][k], v, rtol=2e-2, atol=2e-2, msg=k)


_POLICIES = {"init": "gradient", "reset": "prune"}


@_in_group
def _fsdp_policies_worker(rank: int, out: str) -> None:
    def sharded() -> tuple[nn.Module, Any]:
        model, opt = _build(**_POLICIES)
        _shard(model, "cpu")
        opt.rebind_parameters()
        return model, opt

    model, opt = sharded()
    _train(model, opt, range(SAVE_AT), rank)
    # this rank's own state dicts (DTensor shards), mid-link; the next step is a knot's armed one
    saved = {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict())
    _train(model, opt, range(SAVE_AT, STEPS), rank)
    assert opt.knots_tied == STEPS // 2
    torch.save(_whole(model), f"{out}/policies{rank}.pt")

    model2, opt2 = sharded()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    _train(model2, opt2, range(SAVE_AT, STEPS), rank)
    torch.save(_whole(model2), f"{out}/resumed{rank}.pt")


@_fsdp_support
def test_fsdp2_gradient_init_and_prune_reset_match_one_process_and_resume(tmp_path: Path) -> None:
    """init="gradient" (A from the gradient averaged over ranks) and reset="prune" (a mask from
    the k-th smallest first moment over the whole, sharded, state) on sharded factors."""
    import torch.distributed.fsdp  # imported once here, not in each forked worker

    model, opt = _build(**_POLICIES)
    _train(model, opt, range(STEPS))
    single = _whole(model)
    for policy, default in (("init", "kaiming"), ("reset", "full")):  # each changes the result
        model, opt = _build(**{**_POLICIES, policy: default})
        _train(model, opt, range(STEPS))
        other = _whole(model)
        assert max((other[k] - v).abs().max().item() for k, v in single.items()) > 1e-3, policy

    _spawn(_fsdp_policies_worker, str(tmp_path), timeout=180)
    final = [torch.load(tmp_path / f"policies{r}.pt", weights_only=True) for r in range(WORLD)]
    _assert_same(final[0], final[1], "rank 0 vs rank 1")
    assert final[0].keys() == single.keys()
    for k, v in single.items():  # a singular vector takes the gradient's summation order (2
        # ranks, then all-reduced) amplified by 1/gap: A's tolerance is wider than the weights'
        tol = {"rtol": 1e-4, "atol": 1e-5} if k.endswith("lora_A") else {"rtol": 1e-5, "atol": 1e-6}
        torch.testing.assert_close(final[0][k], v, **tol, msg=k)
    for r in range(WORLD):  # opt.state_dict() and model.state_dict() of each rank resume bitwise
        resumed = torch.load(tmp_path / f"resumed{r}.pt", weights_only=True)
        _assert_same(resumed, final[r], f"resumed rank {r}")


class _FusedExperts(nn.Module):
    """Three experts ``(6, IN)`` in one 3-D parameter, read one at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 6, IN) / IN**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.w[0].T
        for w in self.w[1:]:
            out = out + x @ w.T
        return out


class _MoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = _FusedExperts()
        self.head = nn.Linear(6, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.experts(x)))
        return out


def _moe_chain() -> tuple[nn.Module, Any]:
    model = _MoE()
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_parameters=["experts.w"],
        trainable_modules=["head"], rank=2, knot_every=2, seed=7,
    )  # fmt: skip
    return model, opt


@_in_group
def _fsdp_experts_worker(rank: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, opt = _moe_chain()
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model.experts, mesh=mesh)  # FSDP2's class over parametrize's
    fully_shard(model, mesh=mesh)
    opt.rebind_parameters()
    _train(model, opt, range(STEPS), rank)
    assert opt.knots_tied == STEPS // 2
    torch.save(_whole(model), f"{out}/experts{rank}.pt")


@_fsdp_support
def test_fsdp2_shards_an_experts_module_with_a_parameter_link(tmp_path: Path) -> None:
    """The cached forward finds the module's own forward under FSDP2's class (it called
    ``FSDPModule.forward``: an AttributeError)."""
    import torch.distributed.fsdp  # imported once here, not in each forked worker

    model, opt = _moe_chain()
    _train(model, opt, range(STEPS))
    single = _whole(model)

    _spawn(_fsdp_experts_worker, str(tmp_path), timeout=180)
    final = [torch.load(tmp_path / f"experts{r}.pt", weights_only=True) for r in range(WORLD)]
    _assert_same(final[0], final[1], "rank 0 vs rank 1")
    assert final[0].keys() == single.keys()
    for k, v in single.items():
        torch.testing.assert_close(final[0][k], v, rtol=1e-5, atol=1e-6, msg=k)


@_in_group
def _fsdp_probe_worker(rank: int, out: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, opt = _build()
    _shard(model, "cpu")
    opt.rebind_parameters()
    assert get_optimizer_state_dict(model, opt)["state"] == {}  # DCP's probe: no step
    assert opt.optimizer_steps == 0
    _train(model, opt, range(2), rank)  # a knot after step 2; step 3 is none
    # a real step that finds no state and every rate 0, whose gradients are zero on rank 1's
    # shards only: a step on every rank
    opt.state.clear()
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
            if rank == 0:
                p.grad.to_local().fill_(1.0)  # type: ignore[attr-defined]
    opt.step()
    torch.save(opt.optimizer_steps, f"{out}/steps{rank}.pt")


@_fsdp_support
def test_fsdp2_ranks_agree_on_what_is_dcps_probe(tmp_path: Path) -> None:
    """DCP's probe (no state, rate 0, zero gradients) is told apart on the whole gradient, not
    this rank's shards: a rank whose shards were all zero took a real step for the probe and
    did not count it, and its knots went apart from the others'."""
    import torch.distributed.fsdp  # imported once here, not in each forked worker

    _spawn(_fsdp_probe_worker, str(tmp_path), timeout=120)
    steps = [torch.load(tmp_path / f"steps{r}.pt", weights_only=True) for r in range(WORLD)]
    assert steps == [3, 3]


def _torchao_chain(reset: str) -> tuple[nn.Module, Any]:
    import torchao.optim as tao

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 4))
    opt = ChainLoRAOptimizer(
        model, lambda ps: tao.AdamW8bit(ps, lr=1e-3, block_size=32), target_modules=["0"],
        rank=32, knot_every=2, reset=reset, prune_ratio=0.5,
    )  # fmt: skip
    return model, opt


def _train_torchao(model: nn.Module, opt: Any) -> None:
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 256, generator=gen), torch.randn(16, 4, generator=gen)
    for _ in range(3):  # a knot after step 2; every rank takes the whole batch
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@_in_group
def _fsdp_torchao_worker(rank: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    for reset in ("moments", "prune"):
        model, opt = _torchao_chain(reset)
        fully_shard(model[0])
        fully_shard(model)
        opt.rebind_parameters()
        _train_torchao(model, opt)
        a = model[0].parametrizations.weight[0].lora_A
        kinds = {type(v.to_local()).__name__ for k, v in opt.state[a].items() if k != "step"}
        assert opt.knots_tied == 1 and kinds == {"OptimState8bit"}, kinds  # quantized shards
        torch.save(_whole(model), f"{out}/torchao_{reset}{rank}.pt")


@_fsdp_support
def test_fsdp2_torchao_low_bit_state_is_restarted_or_pruned(tmp_path: Path) -> None:
    """torchao's AdamW8bit under FSDP2 keeps DTensors of quantized shards: the knot's
    "moments"/"prune" called zero_/abs on them and raised after its merge, at every retry."""
    pytest.importorskip("torchao.optim")
    import torch.distributed.fsdp  # imported once here, not in each forked worker

    _spawn(_fsdp_torchao_worker, str(tmp_path), timeout=120)
    for reset in ("moments", "prune"):
        model, opt = _torchao_chain(reset)
        _train_torchao(model, opt)
        single = _whole(model)
        final = [
            torch.load(tmp_path / f"torchao_{reset}{r}.pt", weights_only=True) for r in range(WORLD)
        ]
        _assert_same(final[0], final[1], f"{reset}: rank 0 vs rank 1")
        for k, v in single.items():  # the same blocks, and one mask over the whole state
            torch.testing.assert_close(final[0][k], v, rtol=1e-5, atol=1e-6, msg=f"{reset} {k}")


# --- FSDP2: exports while sharded, gathered whole, written once ---


def _llama_chain() -> tuple[nn.Module, Any]:
    from models import tiny_llama

    model = tiny_llama()
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules=["q_proj", "v_proj"],
        trainable_modules=["lm_head"], rank=2, knot_every=2, seed=7, keep_history=True,
    )  # fmt: skip
    return model, opt


def _tokens(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(300 + step))


def _train_llama(model: nn.Module, opt: Any, steps: range, rank: int | None = None) -> None:
    for step in steps:
        ids = _tokens(step) if rank is None else _tokens(step).chunk(WORLD)[rank]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@_in_group
def _fsdp_export_worker(rank: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from chainopt import save_merged
    from chainopt.peft_export import export_peft_adapter, peft_adapter_state_dict

    model, opt = _llama_chain()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt.rebind_parameters()
    _train_llama(model, opt, range(5), rank)  # knots after steps 1 and 3; a link pending
    before = _whole(model)
    merged = merged_state_dict(model)  # a collective: every rank gets the whole tensors
    save_merged(opt, f"{out}/merged")  # every rank calls; rank 0 writes
    model.save_pretrained(f"{out}/pretrained")  # the guarded save (what a Trainer calls)
    model.save_pretrained(f"{out}/given", state_dict=model.state_dict())  # shards given
    export_peft_adapter(opt, f"{out}/adapter")
    adapter, _config = peft_adapter_state_dict(opt)  # every rank: the whole tensors
    Path(f"{out}/file").touch()
    failed = []
    exports = (save_merged, lambda _opt, path: model.save_pretrained(path), export_peft_adapter)
    for export in exports:  # rank 0 cannot write: every rank hears of it, none hangs
        try:
            export(opt, f"{out}/file/under")
            failed.append("")
        except OSError as err:
            failed.append(f"{type(err).__name__}: {err}")
    _assert_same(_whole(model), before, "after the exports")  # the model is left as it was
    torch.save(
        {"merged": merged, "kinds": {k: type(v).__name__ for k, v in merged.items()},
         "failed": failed, "adapter": adapter,
         "adapter_kinds": {type(v).__name__ for v in adapter.values()}},
        f"{out}/export{rank}.pt",
    )  # fmt: skip


@_fsdp_support
def test_fsdp2_exports_the_whole_merged_model_written_once(tmp_path: Path) -> None:
    """merged_state_dict gave the trainable head as DTensor shards; save_merged and the guarded
    save_pretrained then raised from safetensors on rank 0 only (after it wrote config.json),
    while rank 1 returned as if the model were saved; export_peft_adapter raised on both."""
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import torch.distributed.fsdp  # imported once here, not in each forked worker
    from transformers import LlamaForCausalLM

    model, opt = _llama_chain()
    _train_llama(model, opt, range(5))
    single = merged_state_dict(model)
    probe = _tokens(99)
    with torch.no_grad():
        want = model(input_ids=probe).logits

    _spawn(_fsdp_export_worker, str(tmp_path), timeout=180)
    seen = [torch.load(tmp_path / f"export{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, s in enumerate(seen):  # whole plain tensors on every rank, equal to one process
        assert set(s["kinds"].values()) == {"Tensor"}, (r, s["kinds"])
        assert s["merged"].keys() == single.keys()
        for k, v in single.items():
            torch.testing.assert_close(s["merged"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    _assert_same(seen[0]["merged"], seen[1]["merged"], "rank 0 vs rank 1")
    for failed in seen[0]["failed"]:  # rank 0's own error; the others were told
        assert failed.startswith(("FileExistsError", "NotADirectoryError")), failed
    assert [f.split(" to ")[0] for f in seen[1]["failed"]] == [
        "OSError: rank 0 could not write the merged model",
        "OSError: rank 0 could not write the merged model",
        "OSError: rank 0 could not write the adapter",
    ]

    for folder in ("merged", "pretrained", "given"):  # from_pretrained: the fine-tuned function
        plain = LlamaForCausalLM.from_pretrained(tmp_path / folder)
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=probe).logits, want, rtol=1e-4, atol=1e-5)
    from models import tiny_llama
    from safetensors.torch import load_file

    written = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for r, s in enumerate(seen):  # the adapter in memory: what was written, whole on every rank
        assert s["adapter_kinds"] == {"Tensor"} and s["adapter"].keys() == written.keys(), r
        assert all(torch.equal(s["adapter"][k], v) for k, v in written.items()), r
    adapted = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=probe).logits, want, rtol=1e-4, atol=1e-5)


# --- one rank goes bad: the verdict is agreed ---


@_in_group
def _one_bad_rank_worker(rank: int, out: str, policy: str) -> None:
    model = _mlp()
    opt = ChainLoRAOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), target_modules=["0", "2"],
        rank=2, knot_every=100, seed=7, non_finite=policy,
    )  # fmt: skip
    with torch.no_grad():
        model[2].parametrizations.weight[0].lora_B.fill_(0.1)
    if rank == 1:  # only this rank's factor holds a NaN
        with torch.no_grad():
            model[0].parametrizations.weight[0].lora_B[0, 0] = float("nan")
    outcome = "merged"
    try:
        record = opt.tie_knot()
        outcome = f"skipped {list(record.skipped)}"
    except Exception as err:  # what each rank saw is the result
        outcome = f"raised {type(err).__name__}"
    torch.save(
        {"outcome": outcome, "w2": model[2].parametrizations.weight.original.clone()},
        f"{out}/rank{rank}.pt",
    )


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_a_nan_on_one_rank_gets_the_same_verdict_on_every_rank(tmp_path: Path, policy: str) -> None:
    _spawn(_one_bad_rank_worker, str(tmp_path), policy)
    seen = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    expected = "raised NonFiniteUpdateError" if policy == "raise" else "skipped ['0']"
    assert [s["outcome"] for s in seen] == [expected] * WORLD
    assert torch.equal(seen[0]["w2"], seen[1]["w2"])  # the good module merged alike


# --- DDP with 4-bit targets (bitsandbytes on CPU) ---


def _bnb_build(seed: int = 7) -> tuple[nn.Module, Any]:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = nn.Sequential(
        nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, OUT)
    )
    model = nn.Sequential(*dense)
    for i in (0, 2):
        q = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(
            dense[i].weight.data.clone(), requires_grad=False, quant_type="nf4"
        )
        q.bias = nn.Parameter(dense[i].bias.data.clone())
        model[i] = q.to("cpu")
    opt = ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), target_modules=["0", "2"],
        trainable_modules=["4"], rank=4, knot_every=2, seed=seed,
    )  # fmt: skip
    return model, opt


def _bnb_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2000 + step)
    x, y = torch.randn(8, 64, generator=gen), torch.randn(8, OUT, generator=gen)
    return x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]


def _bnb_state(model: nn.Module, opt: Any) -> dict[str, torch.Tensor]:
    """The 4-bit weights' bytes and absmax, the masters, the factors and the head."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype != torch.uint8}
    for i in (0, 2):
        w = model[i].weight
        out[f"{i}.weight.bytes"] = w.data.clone()
        out[f"{i}.weight.absmax"] = w.quant_state.absmax.clone()
    for name, master in opt.state_dict()["chainopt"].get("masters", {}).items():
        out[f"master.{name}"] = master.clone()
    return out


@_in_group
def _bnb_ddp_worker(rank: int, out: str) -> None:
    model, opt = _bnb_build()
    wrapped = nn.parallel.DistributedDataParallel(model)
    for step in range(6):
        if step == 3:
            save_checkpoint(f"{out}/mid.pt", wrapped, opt)
        x, y = _bnb_batch(step, rank)
        nn.functional.mse_loss(wrapped(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert opt.knots_tied == 3
    torch.save(_bnb_state(model, opt), f"{out}/final{rank}.pt")

    model2, opt2 = _bnb_build()
    wrapped2 = nn.parallel.DistributedDataParallel(model2)
    load_checkpoint(f"{out}/mid.pt", wrapped2, opt2)
    for step in range(3, 6):
        x, y = _bnb_batch(step, rank)
        nn.functional.mse_loss(wrapped2(x), y).backward()
        opt2.step()
        opt2.zero_grad()
    torch.save(_bnb_state(model2, opt2), f"{out}/resumed{rank}.pt")


def test_ddp_with_4bit_targets_keeps_ranks_identical_exact_and_resumable(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    bnbf = pytest.importorskip("bitsandbytes.functional")
    _spawn(_bnb_ddp_worker, str(tmp_path))
    final = [torch.load(tmp_path / f"final{r}.pt", weights_only=True) for r in range(WORLD)]
    _assert_same(final[0], final[1], "rank 0 vs rank 1")  # weights, masters, factors, head
    for i in ("0", "2"):  # every knot rounded the exact master once: W = quantize(M)
        q, _ = bnbf.quantize_4bit(final[0][f"master.{i}"], blocksize=64, quant_type="nf4")
        assert torch.equal(q.flatten(), final[0][f"{i}.weight.bytes"].flatten()), i
    assert not torch.equal(final[0]["master.0"], _bnb_state(*_bnb_build())["master.0"])
    for r in range(WORLD):  # a rank-0 checkpoint resumed on both ranks continues bitwise
        resumed = torch.load(tmp_path / f"resumed{r}.pt", weights_only=True)
        _assert_same(resumed, final[r], f"resumed rank {r}")


@_in_group
def _bnb_fsdp_worker(rank: int, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    model, opt = _bnb_build()
    fully_shard(model)  # shards the 4-bit weights too: refused, with advice
    try:
        opt.rebind_parameters()
        refused = ""
    except RuntimeError as err:
        refused = str(err)

    model2, opt2 = _bnb_build()
    fully_shard(model2, ignored_params={model2[0].weight, model2[2].weight})  # 4-bit: whole
    opt2.rebind_parameters()
    assert all(is_sharded(p) for p in opt2.factors())  # the factors are sharded
    for step in range(4):
        x, y = _bnb_batch(step, rank)
        nn.functional.mse_loss(model2(x), y).backward()
        opt2.step()
        opt2.zero_grad()
    state = {k: full_tensor(v) for k, v in _bnb_state(model2, opt2).items()}
    torch.save({"refused": refused, "knots": opt2.knots_tied, "state": state}, f"{out}/r{rank}.pt")


@_fsdp_support
def test_fsdp2_keeps_4bit_weights_whole_and_shards_the_rest(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    bnbf = pytest.importorskip("bitsandbytes.functional")
    _spawn(_bnb_fsdp_worker, str(tmp_path))
    seen = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(WORLD)]
    for s in seen:  # sharding a 4-bit weight is refused before anything changes, with advice
        assert "loses its quantization state when sharded" in s["refused"]
        assert "ignored_params" in s["refused"]
        assert s["knots"] == 2
    _assert_same(seen[0]["state"], seen[1]["state"], "rank 0 vs rank 1")
    for i in ("0", "2"):  # the knots stayed exact: W = quantize(M)
        q, _ = bnbf.quantize_4bit(seen[0]["state"][f"master.{i}"], blocksize=64, quant_type="nf4")
        assert torch.equal(q.flatten(), seen[0]["state"][f"{i}.weight.bytes"].flatten()), i
