"""chainopt.checkpoint: atomic files, bitwise resume, refusal before anything loads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from models import mlp, snapshot
from torch import nn

import chainopt.checkpoint as ckpt_mod
from chainopt import ChainLoRAOptimizer
from chainopt.checkpoint import load_checkpoint, save_checkpoint


def _build(
    dtype: torch.dtype = torch.float32, seed: int = 3, targets: tuple[str, ...] = ("0", "2")
) -> tuple[nn.Module, ChainLoRAOptimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(11)
    model = mlp(dtype=dtype)
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01),
        target_modules=list(targets),
        trainable_modules=["4"],
        rank=3,
        knot_every=3,
        lora_bias=True,
        seed=seed,
    )
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.1, total_iters=20)
    return model, opt, sched


def _train(model: nn.Module, opt: Any, sched: Any, steps: range) -> None:
    for step in steps:
        x = torch.randn(8, 12, generator=torch.Generator().manual_seed(step))
        model(x.to(next(model.parameters()).dtype)).float().square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_continue_equals_never_stopping(tmp_path: Path, dtype: torch.dtype) -> None:
    model, opt, sched = _build(dtype)
    _train(model, opt, sched, range(10))

    model1, opt1, sched1 = _build(dtype)
    _train(model1, opt1, sched1, range(4))  # mid-link: knot after 3, next after 6
    path = save_checkpoint(
        tmp_path / "ckpt.pt", model1, opt1, scheduler=sched1.state_dict(), step=4
    )
    assert path == tmp_path / "ckpt.pt" and _files(tmp_path) == ["ckpt.pt"]
    del model1, opt1, sched1

    model2, opt2, sched2 = _build(dtype)
    extra = load_checkpoint(tmp_path / "ckpt.pt", model2, opt2)
    assert set(extra) == {"scheduler", "step"}
    sched2.load_state_dict(extra["scheduler"])
    _train(model2, opt2, sched2, range(extra["step"], 10))

    assert (opt2.optimizer_steps, opt2.knots_tied) == (opt.optimizer_steps, opt.knots_tied)
    a, b = snapshot(model), snapshot(model2)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_writes_a_temp_file_in_the_same_directory_syncs_and_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt, _ = _build()
    calls: list[tuple[str, Any]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", fd)), real_fsync(fd))[1])

    def replace(src: Any, dst: Any) -> None:
        calls.append(("replace", (Path(src), Path(dst))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path / "ckpt.pt", model, opt)
    kinds = [c[0] for c in calls]
    assert kinds[:2] == ["fsync", "replace"]  # the data is on disk before the rename
    src, dst = calls[1][1]
    assert (
        src.parent == tmp_path and src.name.startswith(".ckpt.pt.") and dst == tmp_path / "ckpt.pt"
    )
    assert "fsync" in kinds[2:]  # and the directory entry after it (POSIX)


@pytest.mark.parametrize("where", ["torch.save", "fsync", "replace"])
def test_a_failed_save_leaves_the_previous_checkpoint_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    model, opt, sched = _build()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, opt, step=0)
    before = path.read_bytes()
    _train(model, opt, sched, range(2))

    def torn_save(obj: Any, f: Any) -> None:
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    def fail(*args: Any) -> None:
        raise OSError("I/O error")

    if where == "torch.save":
        monkeypatch.setattr(ckpt_mod.torch, "save", torn_save)
    else:
        monkeypatch.setattr(os, where, fail)
    with pytest.raises(OSError, match=r"disk full|I/O error"):
        save_checkpoint(path, model, opt, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["ckpt.pt"]
    model2, opt2, _ = _build()
    assert load_checkpoint(path, model2, opt2) == {"step": 0}


def test_a_stray_temp_file_from_a_killed_writer_is_ignored_then_removed(tmp_path: Path) -> None:
    model, opt, sched = _build()
    save_checkpoint(tmp_path / "ckpt.pt", model, opt)
    (tmp_path / ".ckpt.pt.0123456789ab.tmp").write_bytes(b"torn")
    (tmp_path / ".other.pt.0123456789ab.tmp").write_bytes(b"not ours to remove")
    model2, opt2, _ = _build()
    load_checkpoint(tmp_path / "ckpt.pt", model2, opt2)
    _train(model, opt, sched, range(2))
    save_checkpoint(tmp_path / "ckpt.pt", model, opt)
    assert _files(tmp_path) == [".other.pt.0123456789ab.tmp", "ckpt.pt"]
    load_checkpoint(tmp_path / "ckpt.pt", model2, opt2)
    assert opt2.optimizer_steps == 2


def test_model_only_and_plain_optimizers(tmp_path: Path) -> None:
    model, opt, sched = _build()
    _train(model, opt, sched, range(4))
    save_checkpoint(tmp_path / "model.pt", model)
    model2, opt2, _ = _build()
    load_checkpoint(tmp_path / "model.pt", model2)
    for k, v in snapshot(model).items():
        assert torch.equal(v, snapshot(model2)[k]), k
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(tmp_path / "model.pt", model2, opt2)

    plain = nn.Linear(3, 2)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    plain(torch.ones(1, 3)).sum().backward()
    sgd.step()
    save_checkpoint(tmp_path / "plain.pt", plain, sgd)
    plain2 = nn.Linear(3, 2)
    sgd2 = torch.optim.SGD(plain2.parameters(), lr=0.1, momentum=0.9)
    load_checkpoint(tmp_path / "plain.pt", plain2, sgd2)
    assert torch.equal(plain2.weight, plain.weight)
    assert torch.equal(
        sgd2.state[plain2.weight]["momentum_buffer"], sgd.state[plain.weight]["momentum_buffer"]
    )


def test_a_ddp_wrapped_model_saves_and_loads_bare_keys(tmp_path: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model, opt, sched = _build()
        ddp = nn.parallel.DistributedDataParallel(model)
        _train(ddp, opt, sched, range(2))
        save_checkpoint(tmp_path / "ckpt.pt", ddp, opt)
        saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
        assert saved["model"].keys() == model.state_dict().keys()  # no "module." prefix
        model2, opt2, _ = _build()
        load_checkpoint(tmp_path / "ckpt.pt", model2, opt2)  # into a bare model
        model3, opt3, _ = _build()
        load_checkpoint(tmp_path / "ckpt.pt", nn.parallel.DistributedDataParallel(model3), opt3)
        for k, v in snapshot(model).items():
            assert torch.equal(v, snapshot(model2)[k]) and torch.equal(v, snapshot(model3)[k]), k
    finally:
        dist.destroy_process_group()


# --- refusals: a clear error, and nothing loaded ---


def _assert_untouched(model: nn.Module, opt: ChainLoRAOptimizer, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert opt.optimizer_steps == 0 and len(opt.state) == 0


def test_a_file_that_is_not_a_chainopt_checkpoint_is_refused(tmp_path: Path) -> None:
    model, opt, _ = _build()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "other.pt")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"not a checkpoint written by chainopt\.save_checkpoint"):
        load_checkpoint(tmp_path / "other.pt", model, opt)
    _assert_untouched(model, opt, before)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"targets": ("0",)}, r"does not fit the model: missing keys \['2.weight', '2.bias'\]"),
        ({"seed": 4}, r"different chain config.*seed=3 vs 4"),
    ],
)
def test_a_checkpoint_of_another_setup_is_refused_before_anything_loads(
    tmp_path: Path, change: dict[str, Any], match: str
) -> None:
    model, opt, sched = _build()
    _train(model, opt, sched, range(4))
    save_checkpoint(tmp_path / "ckpt.pt", model, opt)
    model2, opt2, _ = _build(**change)
    before = snapshot(model2)
    with pytest.raises(ValueError, match=match):
        load_checkpoint(tmp_path / "ckpt.pt", model2, opt2)
    _assert_untouched(model2, opt2, before)


def test_a_shape_mismatch_is_refused_before_anything_loads(tmp_path: Path) -> None:
    model, opt, _ = _build()
    save_checkpoint(tmp_path / "ckpt.pt", model, opt)
    torch.manual_seed(11)
    other = nn.Sequential(
        nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 7)
    )
    opt2 = ChainLoRAOptimizer(
        other,
        torch.optim.AdamW(other.parameters()),
        target_modules=["0", "2"],
        trainable_modules=["4"],
        rank=3,
        knot_every=3,
        lora_bias=True,
        seed=3,
    )
    before = snapshot(other)
    with pytest.raises(ValueError, match=r"'4.weight' has shape \(6, 12\) there and \(7, 12\)"):
        load_checkpoint(tmp_path / "ckpt.pt", other, opt2)
    _assert_untouched(other, opt2, before)


# --- what a hostile user or a hostile machine does ---


def _saved(tmp_path: Path) -> tuple[Path, nn.Module, ChainLoRAOptimizer]:
    model, opt, sched = _build()
    _train(model, opt, sched, range(4))
    return save_checkpoint(tmp_path / "ckpt.pt", model, opt), model, opt


def test_a_truncated_file_is_a_value_error_naming_it(tmp_path: Path) -> None:
    path, _, _ = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model, opt, _ = _build()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"ckpt.pt' cannot be read as a checkpoint"):
        load_checkpoint(path, model, opt)
    assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", model, opt)


@pytest.mark.parametrize(
    ("args", "match"),
    [(("ckpt.pt", "model"), "model must be a torch.nn.Module"), ((3, None), "path must be")],
)
def test_wrong_argument_types_are_type_errors(
    tmp_path: Path, args: tuple[Any, Any], match: str
) -> None:
    path, model, opt = _saved(tmp_path)
    first, second = args
    target = model if second is None else second
    with pytest.raises(TypeError, match=match):
        save_checkpoint(first if first != "ckpt.pt" else path, target, opt)
    with pytest.raises(TypeError, match=match):
        load_checkpoint(first if first != "ckpt.pt" else path, target, opt)
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer or None"):
        save_checkpoint(path, model, "adam")  # type: ignore[arg-type]


def test_factors_of_a_rank_the_chain_cannot_take_are_refused_before_anything_loads(
    tmp_path: Path,
) -> None:
    path, _, _ = _saved(tmp_path)
    payload = torch.load(path, weights_only=True)
    key = "0.parametrizations.weight.0.lora_A"
    bad_factors = (torch.zeros(3, 9), torch.zeros(3), torch.zeros(2, 12), torch.empty(3, 12))
    for bad in (*bad_factors[:3], bad_factors[3].to("meta")):
        payload["model"][key] = bad
        torch.save(payload, path)
        model, opt, _ = _build()
        before, state = snapshot(model), opt.state_dict()
        with pytest.raises(ValueError, match="does not fit the model"):
            load_checkpoint(path, model, opt)
        assert all(torch.equal(before[k], v) for k, v in snapshot(model).items())
        assert opt.optimizer_steps == 0 and opt.state_dict()["state"] == state["state"]


def _save_many(directory: str, count: int) -> None:
    torch.set_num_threads(1)
    model = mlp()
    for i in range(count):
        save_checkpoint(Path(directory) / "ckpt.pt", model, step=i)


def test_concurrent_savers_never_remove_each_others_files(tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_save_many, args=(str(tmp_path), 60)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert _files(tmp_path) == ["ckpt.pt"]
    assert load_checkpoint(tmp_path / "ckpt.pt", mlp())["step"] == 59


def test_a_resave_keeps_the_files_mode(tmp_path: Path) -> None:
    path, model, opt = _saved(tmp_path)
    os.chmod(path, 0o600)
    save_checkpoint(path, model, opt)
    assert (os.stat(path).st_mode & 0o777) == 0o600


def test_the_new_weights_are_never_in_a_file_others_can_read(tmp_path: Path) -> None:
    """The temporary file is 0600 while written; the new file then takes the old file's mode,
    or the umask's for a new one."""
    from chainopt._atomic import write_atomically

    seen: list[int] = []

    def write(f: Any) -> None:
        seen.append(os.fstat(f.fileno()).st_mode & 0o777)
        f.write(b"secret")

    path = tmp_path / "ckpt.pt"
    old = os.umask(0o027)
    try:
        write_atomically(path, write)
        assert (os.stat(path).st_mode & 0o777) == 0o640  # 0666 & ~umask, as open() gives
        os.chmod(path, 0o600)
        write_atomically(path, write)
    finally:
        os.umask(old)
    assert seen == [0o600, 0o600] and (os.stat(path).st_mode & 0o777) == 0o600


def test_what_is_no_regular_file_under_a_temporary_name_is_never_opened_nor_removed(
    tmp_path: Path,
) -> None:
    """A FIFO named like a stale temporary file used to block the save forever (in open())."""
    import threading

    path, model, opt = _saved(tmp_path)
    fifo = tmp_path / ".ckpt.pt.0123456789ab.tmp"
    os.mkfifo(fifo)
    (tmp_path / ".ckpt.pt.0123456789ac.tmp").mkdir()
    (tmp_path / "elsewhere").write_bytes(b"keep")
    os.symlink(tmp_path / "elsewhere", tmp_path / ".ckpt.pt.0123456789ad.tmp")
    done: list[bool] = []
    saver = threading.Thread(target=lambda: done.append(bool(save_checkpoint(path, model, opt))))
    saver.daemon = True
    saver.start()
    saver.join(20)
    if saver.is_alive():  # release the blocked open() before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        saver.join(5)
    assert done == [True]
    assert _files(tmp_path) == [
        ".ckpt.pt.0123456789ab.tmp",
        ".ckpt.pt.0123456789ac.tmp",
        ".ckpt.pt.0123456789ad.tmp",
        "ckpt.pt",
        "elsewhere",
    ]
    assert (tmp_path / "elsewhere").read_bytes() == b"keep"


@pytest.mark.parametrize("length", [236, 237, 238, 255])
def test_a_file_name_of_any_legal_length_can_be_saved(tmp_path: Path, length: int) -> None:
    """The temporary name is the file's own plus 18 bytes, or a short hash of it where that
    would pass the file system's 255."""
    from chainopt import _atomic

    _, model, opt = _saved(tmp_path)
    long = tmp_path / ("c" * (length - 3) + ".pt")
    stem = _atomic._temporary_stem(long)
    stale = tmp_path / f".{stem}.0123456789ab.tmp"
    stale.write_bytes(b"torn")  # a killed writer's file: removed by the next save
    save_checkpoint(long, model, opt, step=3)
    assert _files(tmp_path) == sorted(["ckpt.pt", long.name])
    model2, opt2, _ = _build()
    assert load_checkpoint(long, model2, opt2)["step"] == 3 and opt2.optimizer_steps == 4
    assert (stem == long.name) == (length <= 237)


class _FillingFile:
    """A real file that runs out of space after ``room`` bytes, as a full disk does."""

    def __init__(self, f: Any, room: int) -> None:
        self._f, self._room = f, room

    def write(self, data: Any) -> int:
        import errno

        self._room -= len(data)
        if self._room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return int(self._f.write(data))

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def test_a_full_disk_is_an_os_error_and_the_old_checkpoint_survives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import chainopt._atomic as atomic

    path, model, opt = _saved(tmp_path)
    on_disk = path.read_bytes()
    real_open = open
    monkeypatch.setattr(atomic, "open", lambda *a, **k: _FillingFile(real_open(*a, **k), 4096),
                        raising=False)  # fmt: skip
    with pytest.raises(OSError, match="No space left on device") as err:
        save_checkpoint(path, model, opt)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert path.read_bytes() == on_disk and _files(tmp_path) == ["ckpt.pt"]


def test_a_directory_is_no_checkpoint_path_and_nothing_is_written(tmp_path: Path) -> None:
    model = mlp()
    with pytest.raises(ValueError, match="is a directory: give the checkpoint file's path"):
        save_checkpoint(tmp_path, model)
    with pytest.raises(ValueError, match="is a directory"):
        load_checkpoint(tmp_path, model)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_an_extra_entry_that_cannot_be_saved_is_a_type_error_and_writes_nothing(
    tmp_path: Path,
) -> None:
    model = mlp()
    save_checkpoint(tmp_path / "c.pt", model, step=1)
    before = (tmp_path / "c.pt").read_bytes()
    with pytest.raises(
        TypeError, match=r"cannot be saved .*check the extra entries \['fn', 'step'\]"
    ):
        save_checkpoint(tmp_path / "c.pt", model, step=2, fn=lambda: 1)
    assert (tmp_path / "c.pt").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["c.pt"]
    with pytest.raises(TypeError, match="weights_only must be a bool"):
        load_checkpoint(tmp_path / "c.pt", model, weights_only="no")  # type: ignore[arg-type]
