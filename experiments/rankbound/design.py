"""The experiment's design (everything that fixes it) and its methods (LoRA, chains, full FT).

Example:
    >>> d = Design()
    >>> [m.name for m in search_methods(d)]
    ['lora1', 'lora2', 'lora4', 'lora8', 'full']
    >>> compare_methods(2, d)[1].total_rank()
    8
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TARGETS",
    "TINY",
    "Design",
    "Method",
    "compare_methods",
    "full",
    "lora",
    "method_by_name",
    "search_methods",
]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Design:
    """Everything that fixes the experiment; stored in every run's JSON and checked on resume."""

    n_people: int = 160  # 4 facts each
    steps: int = 360
    batch_size: int = 8
    seeds: tuple[int, ...] = (0, 1, 2)
    lora_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    full_lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4)
    search_ranks: tuple[int, ...] = (1, 2, 4, 8)
    base_ranks: tuple[int, ...] = (1, 2, 4)
    # alpha = 2·√r for base rank r, so a rank-r link has scale s = alpha / r = 2/√r (rsLoRA):
    # the size of the update per step no longer grows with the rank, and one LR grid fits all
    alpha_scale: float = 2.0
    ckpt_every: int = 60
    probe_files: tuple[str, ...] = (
        "textwrap.py",
        "heapq.py",
        "bisect.py",
        "fractions.py",
        "shlex.py",
        "colorsys.py",
        "graphlib.py",
        "string.py",
    )
    probe_tokens: int = 128  # per file
    model: str = "smollm2"  # or "tiny"
    fact_seed: int = 1234
    only: tuple[str, ...] = ()  # pilots: run just these search methods, no compare phase

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


TINY = Design(
    n_people=8,
    steps=16,
    batch_size=4,
    seeds=(0, 1),
    lora_lrs=(1e-2, 3e-2),
    full_lrs=(3e-3, 1e-2),
    search_ranks=(1, 2, 4, 8),
    base_ranks=(1, 2),
    ckpt_every=4,
    probe_files=("textwrap.py", "heapq.py"),
    probe_tokens=32,
    model="tiny",
)


@dataclass(frozen=True)
class Method:
    """One training configuration. ``kind`` is "lora" (a chainopt chain) or "full"."""

    name: str
    kind: str
    ranks: tuple[int, ...] = ()
    links: int = 1
    knot_fracs: tuple[float, ...] | None = None  # None: even knots (num_links/total_steps)
    reset: str = "full"
    init: str = "kaiming"
    alpha: float = 0.0

    def knots(self, steps: int) -> list[int] | None:
        if self.knot_fracs is None:
            return None
        return [round(f * steps) for f in self.knot_fracs]

    def total_rank(self) -> int | None:
        if self.kind == "full":
            return None
        return sum(self.ranks[min(i, len(self.ranks) - 1)] for i in range(self.links))


def lora(rank: int, d: Design) -> Method:
    return Method(f"lora{rank}", "lora", (rank,), 1, alpha=d.alpha_scale * math.sqrt(rank))


def full() -> Method:
    return Method("full", "full")


def search_methods(d: Design) -> list[Method]:
    methods = [lora(r, d) for r in d.search_ranks] + [full()]
    return [m for m in methods if not d.only or m.name in d.only]


def compare_methods(r: int, d: Design) -> list[Method]:
    """Chains at base rank r, then the LoRA references the search did not already run."""
    a = d.alpha_scale * math.sqrt(r)
    chains = [
        Method(f"cola2x{r}", "lora", (r,), 2, alpha=a),
        Method(f"cola4x{r}", "lora", (r,), 4, alpha=a),
        Method(f"cola8x{r}", "lora", (r,), 8, alpha=a),
        Method(f"cola4x{r}_down", "lora", (2 * r, r), 4, alpha=a),
        Method(f"cola4x{r}_keep", "lora", (r,), 4, reset="none", alpha=a),
        Method(f"cola4x{r}_grad", "lora", (r,), 4, init="gradient", alpha=a),
        # links of growing length 1:2:3:4 (knots after 10%, 30%, 60% of the steps)
        Method(f"cola4x{r}_grow", "lora", (r,), 4, knot_fracs=(0.1, 0.3, 0.6), alpha=a),
    ]
    refs = [lora(k * r, d) for k in (2, 4, 8) if k * r not in d.search_ranks]
    return chains + refs


def method_by_name(name: str, d: Design) -> Method:
    for m in search_methods(d):
        if m.name == name:
            return m
    for r in d.base_ranks:
        for m in compare_methods(r, d):
            if m.name == name:
                return m
    raise KeyError(name)
