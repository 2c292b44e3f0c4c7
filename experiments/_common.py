"""Shared pieces of the COLA experiments: chains, schedules, statistics, output, plots.

The experiment scripts train with a plain loop and set the learning rate by hand every step
(:func:`linear_lr`), so the same loop serves LoRA (one link), COLA (several links) and rank
step-down. :class:`Chain` builds the chain with :class:`chainopt.ChainLoRAOptimizer`; when the
installed chainopt does not take a list of ranks yet, a step-down chain is run as a relay of
single-rank optimizers (merge, then wrap again with the next rank), which is the same algorithm
with a full optimizer-state reset at each knot.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> chain = Chain(model, ChainSpec("cola3", (4, 2), 3), ["0"], total_steps=9, lr=1e-2)
    >>> for _ in range(9):
    ...     model(torch.randn(4, 8)).pow(2).mean().backward()
    ...     chain.step()
    >>> chain.links_started
    3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from chainopt import ChainLoRAOptimizer, KnotSchedule

__all__ = [
    "REPO_ROOT",
    "Chain",
    "ChainSpec",
    "add_common_args",
    "delta_effective_rank",
    "examples_common",
    "linear_lr",
    "mean_std",
    "parse_specs",
    "run_metadata",
    "seed_everything",
    "write_json",
]

REPO_ROOT: Path = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- setup


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def examples_common() -> ModuleType:
    """Import ``examples/_common.py`` (model and data loaders) under its own module name.

    Both folders have a ``_common.py``, so it is loaded by path rather than by ``import``.
    """
    name = "chainopt_examples_common"
    if name in sys.modules:
        return sys.modules[name]
    path = REPO_ROOT / "examples" / "_common.py"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def add_common_args(parser: argparse.ArgumentParser, out_default: str) -> None:
    """Arguments every experiment script takes: ``--quick``, ``--seeds``, ``--out``, threads."""
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test run (< 1 minute)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / out_default, help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--no-progress", action="store_true", help="hide tqdm progress bars")


def run_metadata(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """Where, when and how a run happened (stored in every results JSON)."""
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
    """Write ``payload`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"wrote {path}")


# ------------------------------------------------------------------------- statistics


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    xs = [float(v) for v in values]
    if not xs:
        return float("nan"), float("nan")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)
    return mean, math.sqrt(var)


def delta_effective_rank(delta: torch.Tensor, tol: float = 1e-3) -> int:
    """Rank of an update ``ΔW``: singular values above ``tol·σ_max`` (the chainopt convention)."""
    s = torch.linalg.svdvals(delta.double())
    if s.numel() == 0 or s[0] == 0:
        return 0
    return int((s > tol * s[0]).sum())


# ------------------------------------------------------------------------------ chains


@dataclass(frozen=True)
class ChainSpec:
    """One method of a comparison.

    Attributes:
        name: label in tables and plots (``"lora"``, ``"cola3"``, ``"cola3_down"``).
        ranks: rank per link; the last one repeats (``(8, 4)`` with 3 links is 8, 4, 4).
        links: number of links (1 is plain LoRA); knots are evenly spaced over the run.
        options: extra ``ChainLoRAOptimizer`` keyword arguments as ``(key, value)`` pairs, e.g.
            ``(("reset", "none"),)`` or ``(("init", "gradient"),)``.
    """

    name: str
    ranks: tuple[int, ...]
    links: int
    options: tuple[tuple[str, Any], ...] = ()

    def rank_of(self, link: int) -> int:
        """Rank of link ``link`` (0-based)."""
        return self.ranks[min(link, len(self.ranks) - 1)]

    def knots(self, total_steps: int) -> list[int]:
        """Optimizer steps after which knots are tied (``links - 1`` of them)."""
        if self.links == 1:
            return []
        return list(KnotSchedule.even(num_links=self.links, total_steps=total_steps).knots or ())


def _option_value(text: str) -> Any:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        return text


def parse_specs(texts: Sequence[str]) -> list[ChainSpec]:
    """Parse ``NAME:LINKS:R1,R2,...[:KEY=VALUE,...]`` strings.

    Examples: ``cola3_down:3:8,4,2`` (rank step-down), ``cola3_grad:3:4:init=gradient``,
    ``cola3_prune:3:4:reset=prune,prune_ratio=0.9``.
    """
    specs = []
    for text in texts:
        name, links, ranks, *rest = text.split(":")
        options = tuple(
            (k, _option_value(v))
            for k, v in (kv.split("=") for kv in ",".join(rest).split(",") if kv)
        )
        specs.append(ChainSpec(name, tuple(int(r) for r in ranks.split(",")), int(links), options))
    return specs


def linear_lr(step: int, total_steps: int, lr: float, warmup: int = 0) -> float:
    """Linear warm-up for ``warmup`` steps, then linear decay to 0 (HF ``linear`` schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def _adamw(lr: float, weight_decay: float) -> OptimizerFactory:
    def build(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    return build


class Chain:
    """A LoRA/COLA chain on ``model`` driven by a linear LR schedule set every step.

    Uses chainopt's native rank list when the installed version takes one; otherwise a chain
    whose rank changes runs as a relay (one single-rank ``ChainLoRAOptimizer`` per link, the
    previous one merged and unloaded at each knot), which resets the optimizer state exactly as
    a knot does.

    Args:
        model: the model (its adapted modules become plain ``nn.Linear`` after :meth:`finish`).
        spec: ranks and number of links.
        targets: PEFT-style suffixes of the modules to adapt.
        total_steps: optimizer steps of the whole run.
        lr: peak learning rate of AdamW.
        alpha: LoRA alpha (``s = alpha / r`` per link).
        weight_decay: AdamW weight decay.
        warmup: linear warm-up steps at the start of the run.
        seed: seed of the factors' generator.
        trainable_modules: extra modules to keep trainable (a head), passed to chainopt.
        native_step_down: use chainopt's ``rank=[...]`` for a step-down chain when available
            (off by default: the relay is the same algorithm and works with every version).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: ChainSpec,
        targets: Sequence[str],
        *,
        total_steps: int,
        lr: float,
        alpha: float = 16.0,
        weight_decay: float = 0.0,
        warmup: int = 0,
        seed: int = 0,
        trainable_modules: Sequence[str] | None = None,
        native_step_down: bool = False,
    ) -> None:
        self.model, self.spec, self.targets = model, spec, list(targets)
        self.total_steps, self.lr, self.warmup = total_steps, lr, warmup
        self.alpha, self.seed, self.trainable_modules = alpha, seed, trainable_modules
        self._factory = _adamw(lr, weight_decay)
        self.knots = spec.knots(total_steps)
        self.steps = 0
        self.links_started = 1
        self.native = (
            len(set(spec.ranks)) == 1
            or bool(spec.options)
            or (native_step_down and self._native_rank_list())
        )
        self.opt = self._build(0)

    def _native_rank_list(self) -> bool:
        probe = nn.Sequential(nn.Linear(4, 4))
        try:
            ChainLoRAOptimizer(
                probe, _adamw(1e-3, 0.0), target_modules=["0"], rank=[2, 1], knots=[1]
            )
        except (TypeError, ValueError):
            return False
        return True

    def _build(self, link: int) -> ChainLoRAOptimizer:
        kwargs: dict[str, Any] = {
            "target_modules": self.targets,
            "alpha": self.alpha,
            "seed": self.seed + 1000 * link,
            "trainable_modules": self.trainable_modules,
            **dict(self.spec.options),
        }
        if self.native:
            ranks = list(self.spec.ranks)
            kwargs["rank"] = ranks[0] if len(set(ranks)) == 1 else ranks
            kwargs["knots"] = self.knots or [self.total_steps + 1]
        else:  # relay: this optimizer never ties a knot itself
            kwargs["rank"] = self.spec.rank_of(link)
            kwargs["knots"] = [self.total_steps + 1]
        return ChainLoRAOptimizer(self.model, self._factory, **kwargs)

    def step(self) -> None:
        """Set the LR, take one optimizer step (tying a knot when due), clear the gradients."""
        lr = linear_lr(self.steps, self.total_steps, self.lr, self.warmup)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        if self.steps in self.knots and self.steps < self.total_steps:
            self.links_started += 1
            if not self.native:
                self.opt.merge_and_unload()
                self.opt = self._build(self.links_started - 1)

    def trainable_parameters(self) -> int:
        """Number of trainable scalars in the current link (factors plus extra modules)."""
        return sum(p.numel() for g in self.opt.param_groups for p in g["params"])

    def finish(self) -> nn.Module:
        """Merge the last link and return the model with plain ``nn.Linear`` modules."""
        return self.opt.merge_and_unload()
