"""Experiment 4: COLA against LoRA on SmolLM2-135M where rank is the bottleneck.

Task: knowledge injection. A deterministic set of fictional people, each with four random
attributes (city, job, favourite colour, instrument), is taught to SmolLM2-135M-Instruct (real
weights) as one-line facts ("Velrin Ostavik lives in" → " Oslo"); the loss is the cross-entropy
of the answer tokens. Metric: exact recall (every answer token is the argmax given the prompt,
i.e. greedy decoding reproduces the answer), and the answer NLL. A forgetting probe measures the
token loss on a fixed slice of CPython standard-library source before and after training.

Two phases, run by one resumable driver:

1. **search**: LoRA at ranks 1, 2, 4, 8 and full fine-tuning (every attention and MLP projection
   of all 30 layers adapted), each with its best LR of a fixed grid (seed 0), then more seeds at
   that LR. A base rank r in (1, 2, 4) *qualifies* when LoRA 2r beats LoRA r in recall by more
   than three standard errors of the difference of the seed means. The smallest qualifying r is
   used (the largest standardised gap when none qualifies).
2. **compare** at that r and the same steps: COLA L×r for L = 2, 4, 8 (even knots), rank
   step-down (2r, r, r, r), ``reset="none"``, ``init="gradient"``, a 4-link chain with links of
   growing length (1:2:3:4), against LoRA r, LoRA 2r/4r/8r and full fine-tuning.

Every run checkpoints with :func:`chainopt.save_checkpoint` every ``--ckpt-every`` steps, appends
its per-step losses to ``curves/<run>.jsonl`` and writes ``runs/<run>.json`` when done; a new
invocation skips finished runs and resumes unfinished ones from their checkpoint (bitwise the
same result on the same machine). ``python experiments/report.py`` builds the tables and plots
from whatever has finished.

Modules: :mod:`.design` (the design and the methods), :mod:`.facts` (the data), :mod:`.train`
(one run), :mod:`.plan` (LR selection, qualification, what runs next, the driver), :mod:`.cli`.

Run (from the repository root):
    python experiments/rank_bound.py --estimate-only       # time a few steps, print the budget
    nohup nice -n 10 python experiments/rank_bound.py --threads 1 > rank_bound.log 2>&1 &
    python experiments/rank_bound.py --tiny --out /tmp/rb  # tiny random Llama, a few seconds
"""

from __future__ import annotations

from _runs import finished, mean_ci, read_curve, with_overrides

from .cli import DEFAULT_OUT, main
from .design import (
    TARGETS,
    TINY,
    Design,
    Method,
    compare_methods,
    full,
    lora,
    method_by_name,
    search_methods,
)
from .plan import best_lr, drive, grid_of, method_runs, next_runs, qualification, run_order
from .train import Context, run_key, train_run

__all__ = [
    "DEFAULT_OUT",
    "TARGETS",
    "TINY",
    "Context",
    "Design",
    "Method",
    "best_lr",
    "compare_methods",
    "drive",
    "finished",
    "full",
    "grid_of",
    "lora",
    "main",
    "mean_ci",
    "method_by_name",
    "method_runs",
    "next_runs",
    "qualification",
    "read_curve",
    "run_key",
    "run_order",
    "search_methods",
    "train_run",
    "with_overrides",
]
