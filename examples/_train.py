"""The fine-tuning loop the examples share: LoRA vs COLA at equal steps on a prompt task.

One plain PyTorch loop (``backward()``, ``step()``, ``zero_grad()``) drives a
:class:`chainopt.ChainLoRAOptimizer`; plain LoRA is the same chain with one link
(``num_links=1``), so both runs cost the same per step. :func:`compare` trains both from the
same pretrained weights on the same batches, evaluates them, plots the losses with the knots
marked, and exports the COLA model (merged checkpoint and PEFT adapter).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import TASKS, PromptCollator, build_prompt_dataset, evaluate_label_words, load_task
from torch import nn
from tqdm.auto import tqdm

import chainopt
from chainopt import ChainLoRAOptimizer

__all__ = ["RunResult", "add_arguments", "compare", "train_chain"]


@dataclass
class RunResult:
    """What one run did: its losses, its knots and its test accuracy."""

    name: str
    losses: list[float] = field(default_factory=list)
    knot_steps: list[int] = field(default_factory=list)
    accuracy: float = math.nan
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser, default_model: str) -> None:
    """The flags both examples take."""
    parser.add_argument("--model", default=default_model, help="smollm2, tiny-opt, or a hub id")
    parser.add_argument("--task", default="bbc_news", choices=sorted(TASKS))
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--links", type=int, default=3, help="COLA links (LoRA is 1)")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--quick", action="store_true", help="a tiny run, for CI (< 2 min)")


def _loader(ds: Any, collate: PromptCollator, batch: int, seed: int) -> list[dict[str, Any]]:
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    rows = [ds[i] for i in order]
    return [collate(rows[i : i + batch]) for i in range(0, len(rows), batch)]


def train_chain(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    *,
    name: str,
    num_links: int,
    epochs: int,
    lr: float,
    rank: int,
    alpha: float,
    seed: int,
) -> tuple[RunResult, ChainLoRAOptimizer]:
    """Fine-tune ``model`` with a chain of ``num_links`` links over ``epochs`` passes."""
    total = epochs * len(batches)
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0),
        target_modules=["q_proj", "v_proj"],
        rank=rank,
        alpha=alpha,
        num_links=num_links,
        total_steps=total,
        seed=seed,
        keep_history=True,  # the merged links, for the effective rank and the exact adapter
    )
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=total)
    result = RunResult(name)
    model.train()
    start = time.perf_counter()
    with tqdm(total=total, desc=name, unit="step") as bar:
        for _epoch in range(epochs):
            for batch in batches:
                inputs = {k: v for k, v in batch.items() if k != "label"}
                loss = model(**inputs).loss
                loss.backward()
                opt.step()  # ties a knot when the schedule says so
                sched.step()
                opt.zero_grad()
                result.losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}", knots=opt.knots_tied)
                bar.update()
    result.seconds = time.perf_counter() - start
    result.knot_steps = [k.step for k in opt.history.knots]
    summary = opt.chain_summary()
    result.summary = {
        "links": summary["links"],
        "effective_rank": {n: m["effective_rank"] for n, m in summary["modules"].items()},
    }
    return result, opt


def _plot(results: list[RunResult], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        steps = range(1, len(r.losses) + 1)
        window = max(1, len(r.losses) // 20)
        smooth = [
            sum(r.losses[max(0, i - window + 1) : i + 1])
            / len(r.losses[max(0, i - window + 1) : i + 1])
            for i in range(len(r.losses))
        ]
        (line,) = ax.plot(steps, smooth, label=f"{r.name} (acc {r.accuracy:.1%})")
        for k in r.knot_steps:
            ax.axvline(k, color=line.get_color(), linestyle=":", alpha=0.7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss (moving mean of {window})")
    ax.set_title(title + "  (dotted: knots)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(
    args: argparse.Namespace, model: nn.Module, tokenizer: Any, label: str
) -> list[RunResult]:
    """Train LoRA and COLA from the same weights on the same batches; evaluate, plot, export."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:  # 2 × 4 steps of 4 short sequences: the mechanics, not the accuracy
        args.n_train, args.n_test, args.epochs, args.batch_size = 16, 24, 1, 4
        args.max_length = args.max_length or 64
    task = TASKS[args.task]
    max_length = args.max_length or task.max_length
    data = load_task(args.task, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    train = build_prompt_dataset(
        data["train"], tokenizer, task.template, task.label_words, max_length
    )
    batches = _loader(train, PromptCollator(tokenizer.pad_token_id), args.batch_size, args.seed)
    print(
        f"{label} on {args.task}: {len(data['train'])} train / {len(data['test'])} test examples, "
        f"{len(batches)} steps per epoch, {args.epochs} epochs"
    )

    def accuracy(m: nn.Module) -> float:
        return evaluate_label_words(
            m, tokenizer, data["test"], task.template, task.label_words, max_length=max_length
        )

    zero_shot = accuracy(model)
    print(f"zero-shot accuracy: {zero_shot:.1%}")
    args.out.mkdir(parents=True, exist_ok=True)
    results, chains = [], {}
    for name, links in (("LoRA", 1), (f"COLA ({args.links} links)", args.links)):
        run_model = copy.deepcopy(model)
        result, opt = train_chain(
            run_model, batches, name=name, num_links=links, epochs=args.epochs, lr=args.lr,
            rank=args.rank, alpha=args.alpha, seed=args.seed,
        )  # fmt: skip
        result.accuracy = accuracy(run_model)
        print(f"{name}: accuracy {result.accuracy:.1%}, knots after steps {result.knot_steps}")
        results.append(result)
        chains[name] = opt

    cola = chains[results[1].name]
    report = chainopt.export_peft_adapter(cola, args.out / "cola-adapter")
    chainopt.save_merged(cola, args.out / "cola-merged")
    tokenizer.save_pretrained(args.out / "cola-merged")
    print(
        f"exported: {args.out / 'cola-merged'} (merged model), {args.out / 'cola-adapter'} "
        f"(PEFT adapter of rank {report.rank} = the whole chain)"
    )
    plot = args.out / f"loss_{args.task}.png"
    _plot(results, plot, f"{label}, {args.task}: LoRA vs COLA, r={args.rank}")
    payload = {
        "model": label,
        "task": args.task,
        "zero_shot_accuracy": zero_shot,
        "runs": [r.__dict__ for r in results],
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / f"results_{args.task}.json").write_text(json.dumps(payload, indent=2))
    print(f"plot: {plot}")
    print("| run | accuracy | final loss (mean of last 10) | knots | seconds |")
    print("|---|---|---|---|---|")
    for r in results:
        tail = r.losses[-10:]
        print(
            f"| {r.name} | {r.accuracy:.1%} | {sum(tail) / len(tail):.3f} | {r.knot_steps} "
            f"| {r.seconds:.0f} |"
        )
    return results
