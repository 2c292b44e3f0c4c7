"""What every experiment run does around its training: seeds, flags, metadata, JSON, statistics.

Example:
    >>> mean_std([1.0, 2.0, 3.0])
    (2.0, 1.0)
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import gzip
import io
import json
import math
import os
import platform
import random
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "REPO_ROOT",
    "add_common_args",
    "claim",
    "git_commit",
    "mean_ci",
    "mean_std",
    "read_jsonl",
    "run_metadata",
    "run_stamp",
    "seed_everything",
    "utc_now",
    "write_json",
    "write_json_atomic",
    "write_text_atomic",
]

#: Root of the chainopt repository (the parent of ``experiments/``).
REPO_ROOT: Path = Path(__file__).resolve().parent.parent


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch.

    Args:
        seed: The seed of all three.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def add_common_args(parser: argparse.ArgumentParser, out_default: str) -> None:
    """Add the flags every experiment script takes: ``--quick``, ``--seeds``, ``--out``, threads.

    Args:
        parser: The script's parser.
        out_default: ``--out``'s default, relative to the repository root.
    """
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test run (< 1 minute)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / out_default, help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true", help="hide tqdm progress bars")


def run_metadata(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """Where, when and how a run happened (stored in every results JSON).

    Args:
        args: The script's flags.
        started: ``time.time()`` when the run started.

    Returns:
        Command, flags, date, wall time, git commit, machine and versions.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": round(time.time() - started, 1),
        "git_commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating the folder.

    Args:
        path: The file to write.
        payload: What to write (non-JSON numbers such as tensors' floats go through ``float``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"wrote {path}")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value, NaN for none).

    Args:
        values: The numbers.

    Returns:
        ``(mean, std)``.
    """
    xs = [float(v) for v in values]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var)


# ------------------------------------------- resumable plans (several drivers, one folder)

#: Two-sided 95% t quantiles by degrees of freedom (1.96 beyond the table).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def mean_ci(xs: Iterable[float]) -> dict[str, float]:
    """Mean, sample std, standard error and the 95% t-interval half-width (NaN for one value).

    Args:
        xs: The numbers (at least one).

    Returns:
        ``{"mean", "std", "se", "ci95", "n"}``.
    """
    v = [float(x) for x in xs]
    n = len(v)
    mean = sum(v) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    se = sd / math.sqrt(n) if n > 1 else float("nan")
    half = T_975.get(n - 1, 1.96) * se if n > 1 else float("nan")
    return {"mean": mean, "std": sd, "se": se, "ci95": half, "n": n}


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write ``payload`` as JSON through a temporary file and a rename (never half a file).

    Args:
        path: The file to write (its folder is created).
        payload: What to write.
    """
    write_text_atomic(path, json.dumps(payload, indent=1, default=float) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (``[]`` when it does not exist; a torn last line dropped).

    Args:
        path: The file.

    Returns:
        One dict per complete line.
    """
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line a killed writer did not finish: what follows it cannot be trusted
    return rows


def claim(folder: Path, key: str) -> Any:
    """An exclusive lock on ``folder/key.lock`` (held until closed), or None if another has it.

    Several drivers sharing one results folder each take the first runnable run that no other
    driver holds; the lock is released when the handle is closed or the process dies.

    Args:
        folder: Where the lock files live (created).
        key: The run's key.

    Returns:
        The open lock file (use it as a context manager), or None.
    """
    path = folder / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def git_commit(short: int = 12) -> str:
    """The repository's HEAD commit (``"unknown"`` outside git).

    Args:
        short: How many hex digits to keep.
    """
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()[:short]
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------- finished runs, design overrides, packed curves

__all__ += ["finished", "pack_curves", "read_curve", "with_overrides"]

#: The archive that holds a results folder's per-run curves once packed (``curves/*.jsonl``).
CURVES_ARCHIVE = "curves.tar.gz"


def finished(out: Path) -> dict[str, dict[str, Any]]:
    """The finished runs of a results folder: every ``out/runs/*.json``, by its ``"key"``.

    Args:
        out: The results folder.

    Returns:
        ``{key: run}`` in file-name order.
    """
    runs = {}
    for p in sorted((out / "runs").glob("*.json")):
        r = json.loads(p.read_text())
        runs[r["key"]] = r
    return runs


def with_overrides(design: Any, pairs: Iterable[str]) -> Any:
    """A frozen dataclass ``design`` with ``KEY=VALUE`` fields replaced (tuples comma-separated).

    Args:
        design: The dataclass instance.
        pairs: ``"KEY=VALUE"`` strings; a value takes the type of the field's current value.

    Returns:
        A new instance.

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass(frozen=True)
        ... class D:
        ...     n: int = 1
        ...     lrs: tuple[float, ...] = (0.1,)
        >>> with_overrides(D(), ["n=3", "lrs=0.1,0.2"])
        D(n=3, lrs=(0.1, 0.2))
    """
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        current = getattr(design, key)
        if isinstance(current, tuple):
            kind = type(current[0]) if current else str
            changes[key] = tuple(kind(v) for v in value.split(",") if v)
        else:
            changes[key] = type(current)(value)
    return dataclasses.replace(design, **changes)


def read_curve(out: Path, key: str) -> list[dict[str, Any]]:
    """The per-step rows of run ``key``: ``out/curves/<key>.jsonl``, or its copy in the archive.

    A results folder whose curves were packed by :func:`pack_curves` reads the same.

    Args:
        out: The results folder.
        key: The run's key.

    Returns:
        One dict per step (``[]`` when the run has no curve).
    """
    loose = out / "curves" / f"{key}.jsonl"
    if loose.exists() or not (out / CURVES_ARCHIVE).exists():
        return read_jsonl(loose)
    with tarfile.open(out / CURVES_ARCHIVE, "r:gz") as tar:
        try:
            member = tar.extractfile(f"curves/{key}.jsonl")
        except KeyError:
            return []
        assert member is not None
        text = member.read().decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def pack_curves(out: Path) -> Path:
    """Pack ``out/curves/*.jsonl`` into one ``out/curves.tar.gz`` and remove the loose files.

    The archive is reproducible (sorted, no times or owners) and is read back and compared with
    every loose file before any of them is removed.

    Args:
        out: The results folder.

    Returns:
        The archive's path.

    Raises:
        FileNotFoundError: ``out/curves`` has no ``.jsonl`` file.
    """
    files = sorted((out / "curves").glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no curves/*.jsonl under {out}")
    archive = out / CURVES_ARCHIVE
    tmp = archive.with_name(f".{archive.name}.{os.getpid()}.tmp")
    with (
        tmp.open("wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(f"curves/{path.name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(tmp, "r:gz") as tar:
        for path in files:
            member = tar.extractfile(f"curves/{path.name}")
            if member is None or member.read() != path.read_bytes():
                tmp.unlink()
                raise RuntimeError(f"{path.name} did not read back from the archive")
    os.replace(tmp, archive)
    for path in files:
        path.unlink()
    if not any((out / "curves").iterdir()):
        (out / "curves").rmdir()
    return archive


def utc_now() -> str:
    """The current date and time as results record it (``"2026-12-05 21:40 UTC"``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def run_stamp() -> dict[str, str]:
    """The commit, date and machine a finished run records beside its numbers.

    Returns:
        ``git_commit``, ``date_utc`` and ``machine`` (architecture, CPUs, torch and its threads).
    """
    return {
        "git_commit": git_commit(),
        "date_utc": utc_now(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
    }


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` through a per-process temporary file and a rename (never half a file;
    several drivers may write into one folder).

    Args:
        path: The file to write (its folder is created).
        text: What to write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
