"""What an example run records, and how it is reported: the results JSON, a table, a loss plot.

Example:
    >>> run = RunResult("COLA (3 links)", losses=[2.0, 1.5, 1.2], knot_steps=[1, 2], accuracy=0.5)
    >>> print_table([run])
    | run | accuracy | final loss (mean of last 10) | knots | seconds |
    |---|---|---|---|---|
    | COLA (3 links) | 50.0% | 1.567 | [1, 2] | 0 |
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunResult", "plot_losses", "print_table", "write_results"]


@dataclass
class RunResult:
    """What one training run did.

    Attributes:
        name: The run's label (``"LoRA"``, ``"COLA (3 links)"``).
        losses: Training loss of every optimizer step.
        knot_steps: Optimizer steps after which a knot was tied.
        accuracy: Test accuracy after training.
        seconds: Wall time of the training loop.
        summary: What the chain reported at the end (links, effective rank per module).
    """

    name: str
    losses: list[float] = field(default_factory=list)
    knot_steps: list[int] = field(default_factory=list)
    accuracy: float = math.nan
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


def plot_losses(
    runs: Sequence[RunResult], path: Path, title: str, *, show_accuracy: bool = True
) -> None:
    """Plot each run's training loss (a moving mean) with its knots as dotted lines.

    Args:
        runs: The runs, drawn in order.
        path: The PNG to write.
        title: The plot's title.
        show_accuracy: Put each run's test accuracy in the legend (``False`` for a smoke run,
            whose accuracies compare nothing).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    window = 1
    for r in runs:
        steps = range(1, len(r.losses) + 1)
        window = max(1, len(r.losses) // 20)
        smooth = [
            sum(r.losses[max(0, i - window + 1) : i + 1])
            / len(r.losses[max(0, i - window + 1) : i + 1])
            for i in range(len(r.losses))
        ]
        label = f"{r.name} (acc {r.accuracy:.1%})" if show_accuracy else r.name
        (line,) = ax.plot(steps, smooth, label=label)
        for k in r.knot_steps:
            ax.axvline(k, color=line.get_color(), linestyle=":", alpha=0.7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (moving mean of {window})")
    ax.set_title(title + "  (dotted: knots)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(
    path: Path,
    *,
    model: str,
    task: str,
    zero_shot: float,
    runs: Sequence[RunResult],
    args: argparse.Namespace,
) -> None:
    """Write every number of a comparison as JSON.

    Args:
        path: The JSON file to write.
        model: The model's name.
        task: The task's name.
        zero_shot: Test accuracy before training.
        runs: The runs.
        args: The script's flags (stored as strings).
    """
    payload = {
        "model": model,
        "task": task,
        "zero_shot_accuracy": zero_shot,
        "runs": [asdict(r) for r in runs],
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    path.write_text(json.dumps(payload, indent=2))


def print_table(runs: Sequence[RunResult], *, show_accuracy: bool = True) -> None:
    """Print one Markdown row per run: accuracy, final loss, knots, time.

    Args:
        runs: The runs.
        show_accuracy: Include the accuracy column (``False`` for a smoke run).
    """
    acc = "| accuracy " if show_accuracy else ""
    print(f"| run {acc}| final loss (mean of last 10) | knots | seconds |")
    print("|---|---|---|---|" + ("---|" if show_accuracy else ""))
    for r in runs:
        tail = r.losses[-10:]
        cell = f"| {r.accuracy:.1%} " if show_accuracy else ""
        print(
            f"| {r.name} {cell}| {sum(tail) / len(tail):.3f} | {r.knot_steps} | {r.seconds:.0f} |"
        )
