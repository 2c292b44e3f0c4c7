"""Stepping the variants in rotation, so that the machine's state hits all of them alike.

Each variant is warmed up first (one after the other); then round ``i`` runs every variant once,
in the order rotated by ``i`` (A B C, B C A, C A B, …), with Python's garbage collector held off
inside a round and run between rounds.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .dynamo import dynamo_counts
from .timing import sync
from .variants import Variant

__all__ = ["run_alternating"]


def run_alternating(
    variants: Sequence[Variant],
    batches: Sequence[dict[str, torch.Tensor]],
    warmup: int,
    steps: int,
    desc: str = "",
    on_warm: Callable[[Variant], None] | None = None,
) -> None:
    """Warm each variant up (one after the other), then time ``steps`` rotations.

    Round ``i`` runs the variants in the order rotated by ``i``, so no variant always follows
    the same one. Python's GC is held off inside a round and run between rounds. For compiled
    variants, any frame dynamo compiles during a timed step is charged to that variant (and,
    if the step follows a knot, to ``compiles_after_knot``).

    Args:
        variants: The variants, each with its own copy of the model.
        batches: The batches, taken in turn (the same for every variant).
        warmup: Untimed steps per variant first (with ``torch.compile``: where it compiles).
        steps: Timed rounds.
        desc: Label of the progress bar.
        on_warm: Called with each variant right after its warm-up.
    """
    n = len(variants)
    for v in variants:
        for w in range(warmup):
            v.step(batches[w % len(batches)])
        sync(v.device)
        if on_warm is not None:
            on_warm(v)
        for xs in (v.step_times, v.cpu_times, v.knot_step_times, v.knot_times, v.knot_cpu_times):
            xs.clear()
        v.compiles_after_warmup = v.compiles_after_knot = 0
        v.opt_state_bytes = v.optimizer_state_bytes()
    gc.collect()
    after_knot = {id(v): False for v in variants}
    for i in tqdm(range(steps), desc=desc or "steps", leave=False, file=sys.stderr):
        batch = batches[(warmup + i) % len(batches)]
        order = [variants[(i + j) % n] for j in range(n)]
        gc.disable()
        try:
            for v in order:
                knots_before = v.chain.knots_tied if v.chain is not None else 0
                frames_before = dynamo_counts()["frames"] if v.compiled else 0
                sync(v.device)
                c0 = time.process_time()
                t0 = time.perf_counter()
                v.step(batch)
                sync(v.device)
                dt = time.perf_counter() - t0
                dc = time.process_time() - c0
                v.step_times.append(dt)
                v.cpu_times.append(dc)
                if v.compiled:
                    new = dynamo_counts()["frames"] - frames_before
                    v.compiles_after_warmup += new
                    if after_knot[id(v)]:
                        v.compiles_after_knot += new
                knotted = v.chain is not None and v.chain.knots_tied != knots_before
                if knotted:
                    v.knot_step_times.append(dt)
                after_knot[id(v)] = knotted
                if not knotted:
                    v.opt_state_bytes = max(v.opt_state_bytes, v.optimizer_state_bytes())
        finally:
            gc.enable()
        gc.collect()
