"""Experiment 5: the COLA paper's classification protocol on SmolLM2-135M (issue 21).

The design is pre-registered in ``docs/results.md`` (section 5.1): four BIG-bench tasks (and BBC
News as a fifth candidate), 1000 training / 500 validation / up to 1000 test examples, AdamW,
batch 8, 5 epochs, one linear decay, label-word loss, LoRA r=8 alpha=16 on q, v of the top 4
layers (the frozen layers below are cached), validation after every epoch, the test accuracy of
the final and of the best-validation model. One resumable driver runs the stages in order, each
stage applying the pre-registered rule to the previous stage's results:

1. **gate**: LoRA on seed 0 at each LR; keep up to 3 tasks where it beats the validation majority
   class by >= 5 points and stays <= 95%;
2. **lr**: each method's LR from {1e-3, 5e-4, 1e-4} (+2e-3 if 1e-3 wins) on seed 0;
3. **primary**: LoRA vs COLA-3 (knots after epochs 2 and 4), seeds 1-6, paired;
4. **secondary**: COLA-2 (knot after epoch 3) and step-down COLA-2 (ranks 8, 4), seeds 1-3;
5. **extension**: seeds 7-12 of the primary pair, only if the decision rule says so.

Every run checkpoints with :func:`chainopt.save_checkpoint` after every epoch and writes
``runs/<run>.json`` when done; several drivers may share ``--out`` (runs are claimed with file
locks), and a stopped driver resumes where the last finished epoch ended.

Run (from the repository root):
    python experiments/paper_protocol.py prepare            # tokenize the tasks (seconds)
    python experiments/paper_protocol.py estimate           # time steps here, print the budget
    python experiments/paper_protocol.py run --threads 1    # the plan, resumable
    python experiments/paper_protocol.py report             # tables and plots of what finished
    python experiments/paper_protocol.py run --quick --out /tmp/pp   # smoke test, real model
    python experiments/paper_protocol.py run --tiny --out /tmp/pp    # tiny random Llama
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from _runs import (
    REPO_ROOT,
    claim,
    finished,
    mean_std,
    run_stamp,
    with_overrides,
    write_json_atomic,
    write_text_atomic,
)
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from chainopt import ChainLoRAOptimizer, load_checkpoint, save_checkpoint

DEFAULT_OUT = REPO_ROOT / "experiments" / "results" / "paper_protocol"
TARGETS = ["q_proj", "v_proj"]

# --------------------------------------------------------------------------------- the design

#: name -> (ranks per link, epochs after which a knot is tied)
METHODS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "lora": ((8,), ()),
    "cola3": ((8,), (2, 4)),
    "cola2": ((8,), (3,)),
    "cola2_down": ((8, 4), (3,)),
}
PRIMARY = ("lora", "cola3")
SECONDARY = ("cola2", "cola2_down")


@dataclass(frozen=True)
class Design:
    """Everything that fixes the experiment; stored in every run's JSON and checked on resume."""

    tasks: tuple[str, ...] = (
        "epistemic_reasoning",
        "presuppositions_as_nli",
        "strategyqa",
        "winowhy",
    )
    fifth: str = "bbc_news"  # gated only when fewer than max_tasks of ``tasks`` pass
    n_train: int = 1000
    n_val: int = 500
    n_test: int = 1000
    # task, train pool, validation, test: where the task is too small for the rule above
    split_overrides: tuple[tuple[str, int, int, int], ...] = (
        ("presuppositions_as_nli", 400, 100, 235),
    )
    max_tokens: int = 256
    max_tokens_overrides: tuple[tuple[str, int], ...] = (("bbc_news", 128),)
    epochs: int = 5
    batch_size: int = 8
    alpha: float = 16.0
    adapt_layers: int = 4
    lrs: tuple[float, ...] = (1e-3, 5e-4, 1e-4)
    lr_up: float = 2e-3  # added to a method's grid when its largest LR wins (0: never)
    gate_margin: float = 0.05
    gate_ceiling: float = 0.95
    max_tasks: int = 3
    lr_seed: int = 0
    primary_seeds: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    secondary_seeds: tuple[int, ...] = (1, 2, 3)
    extension_seeds: tuple[int, ...] = (7, 8, 9, 10, 11, 12)
    data_seed: int = 0
    model: str = "smollm2"  # or "tiny": a random Llama and synthetic tasks (tests)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def split_sizes(self, task: str, n: int) -> tuple[int, int, int]:
        """``(train pool, validation, test)`` sizes of a task with ``n`` examples."""
        for name, pool, val, test in self.split_overrides:
            if name == task:
                return pool, val, test
        test = min(self.n_test, n - self.n_train - self.n_val)
        if test <= 0:
            raise ValueError(f"{task} has {n} examples: too few for the split, add an override")
        return n - self.n_val - test, self.n_val, test

    def tokens_of(self, task: str) -> int:
        return dict(self.max_tokens_overrides).get(task, self.max_tokens)


QUICK = Design(
    tasks=("strategyqa",),
    fifth="",
    n_train=16,
    n_val=16,
    n_test=16,
    split_overrides=(("strategyqa", 24, 16, 16),),
    lrs=(1e-3,),
    lr_up=0.0,
    primary_seeds=(1,),
    secondary_seeds=(1,),
    extension_seeds=(2,),
    max_tasks=1,
    adapt_layers=2,
    max_tokens=48,
    gate_margin=-1.0,  # the smoke test runs every stage whatever accuracy 16 examples give
    gate_ceiling=1.0,
)

TINY = Design(
    tasks=("tiny_parity", "tiny_first"),
    fifth="tiny_three",
    n_train=24,
    n_val=16,
    n_test=16,
    split_overrides=(),
    max_tokens=16,
    max_tokens_overrides=(),
    epochs=5,
    batch_size=8,
    adapt_layers=1,
    lrs=(1e-2, 3e-3),
    lr_up=3e-2,
    primary_seeds=(1, 2),
    secondary_seeds=(1,),
    extension_seeds=(3,),
    max_tasks=2,
    gate_margin=-1.0,
    gate_ceiling=1.0,
    model="tiny",
)


def run_key(task: str, method: str, lr: float, seed: int) -> str:
    return f"{task}__{method}__lr{lr:g}__s{seed}"


# -------------------------------------------------------------------------------------- data


def stratified_split(labels: Sequence[int], sizes: Sequence[int], seed: int) -> list[list[int]]:
    """Indices of consecutive parts of the given sizes, each with the label mix of the whole.

    Each label's examples are shuffled (seeded) and dealt to the parts in proportion to their
    sizes (largest remainders), so every part keeps the label proportions up to one example.
    """
    if sum(sizes) > len(labels):
        raise ValueError(f"sizes {list(sizes)} exceed the {len(labels)} examples")
    rng = random.Random(seed)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    for idx in by_label.values():
        rng.shuffle(idx)
    total = sum(sizes)
    # how many of each label go to the parts altogether, then to each part
    quota = {y: len(v) * total / len(labels) for y, v in by_label.items()}
    take = {y: math.floor(q) for y, q in quota.items()}
    for y in sorted(quota, key=lambda y: quota[y] - take[y], reverse=True)[
        : total - sum(take.values())
    ]:
        take[y] += 1
    parts: list[list[int]] = [[] for _ in sizes]
    for y, idx in sorted(by_label.items()):
        chosen = idx[: take[y]]
        share = [len(chosen) * s / total for s in sizes]
        counts = [math.floor(x) for x in share]
        order = sorted(range(len(sizes)), key=lambda k: share[k] - counts[k], reverse=True)
        for k in order[: len(chosen) - sum(counts)]:
            counts[k] += 1
        start = 0
        for k, c in enumerate(counts):
            parts[k].extend(chosen[start : start + c])
            start += c
    # fix the part sizes (rounding per label can move an example between parts)
    flat = [i for p in parts for i in p]
    out, start = [], 0
    for s in sizes:
        out.append(sorted(flat[start : start + s]))
        start += s
    for p in out:
        rng.shuffle(p)
    return out


def _examples_helpers() -> None:
    examples = str(REPO_ROOT / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)


def tiny_task(name: str, n: int = 80) -> tuple[list[list[int]], list[int], list[int], list[str]]:
    """A synthetic task for the tiny model: ``(token ids, labels, label token ids, words)``."""
    rng = random.Random(name)
    seqs, labels = [], []
    for _ in range(n):
        seq = [rng.randrange(10, 250) for _ in range(rng.randrange(4, 12))]
        if name == "tiny_parity":
            y = sum(seq) % 2
        elif name == "tiny_first":
            y = int(seq[0] > 130)
        else:
            y = seq[-1] % 3
        seqs.append(seq)
        labels.append(y)
    k = 3 if name == "tiny_three" else 2
    return seqs, labels, list(range(3, 3 + k)), [f"w{i}" for i in range(k)]


def prepare_task(task: str, d: Design, tokenizer: Any = None) -> dict[str, Any]:
    """Tokenize a task and split it (fixed, stratified): train pool, validation, test."""
    if d.model == "tiny":
        seqs, labels, label_ids, words = tiny_task(task)
        template, cut = "tiny", 0
    else:
        _examples_helpers()
        from chainopt_examples.prompts import encode_prompt, label_word_token_ids
        from chainopt_examples.tasks import TASKS, load_task

        spec = TASKS[task]
        ds = load_task(task, test_size=0.3, seed=d.data_seed)  # train + test = every example
        texts = list(ds["train"]["text"]) + list(ds["test"]["text"])
        labels = list(ds["train"]["label"]) + list(ds["test"]["label"])
        ids = label_word_token_ids(tokenizer, spec.label_words)
        if any(len(w) != 1 for w in ids):
            raise ValueError(f"{task}: every label word must be one token, got {ids}")
        label_ids, words, template = [w[0] for w in ids], list(spec.label_words), spec.template
        limit = d.tokens_of(task)
        seqs = [encode_prompt(tokenizer, template, t, limit) for t in texts]
        full = [len(tokenizer(template.format(text=t))["input_ids"]) for t in texts]
        cut = sum(f > limit for f in full)
    pool, val, test = stratified_split(labels, d.split_sizes(task, len(labels)), d.data_seed)

    def part(idx: list[int]) -> dict[str, list[Any]]:
        return {"ids": [seqs[i] for i in idx], "y": [labels[i] for i in idx]}

    def majority(idx: list[int]) -> float:
        ys = [labels[i] for i in idx]
        return max(ys.count(k) for k in range(len(label_ids))) / len(ys)

    return {
        "task": task,
        "template": template,
        "label_words": words,
        "label_ids": label_ids,
        "n_examples": len(labels),
        "max_tokens": d.tokens_of(task),
        "prompts_cut": cut,
        "mean_tokens": statistics.fmean(len(s) for s in seqs),
        "pool": part(pool),
        "val": part(val),
        "test": part(test),
        "val_majority": majority(val),
        "test_majority": majority(test),
        "design": d.to_json(),
    }


def train_indices(data: dict[str, Any], d: Design, seed: int) -> list[int]:
    """The seed's training sample: ``min(n_train, pool)`` pool examples (all of a small pool)."""
    n = len(data["pool"]["y"])
    if n <= d.n_train:
        return list(range(n))
    return sorted(random.Random(1_000 + seed).sample(range(n), d.n_train))


def epoch_order(indices: list[int], seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(100_000 * (seed + 1) + epoch)
    return [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]


# ------------------------------------------------------------------------------------- model


class LabelHead:
    """The LM head restricted to the label words' rows: logits over the label words only."""

    def __init__(self, head: nn.Linear, label_ids: Sequence[int]) -> None:
        self.weight = head.weight.detach()[list(label_ids)].clone()

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


def _topstack() -> Any:
    _examples_helpers()
    from smollm2_tasks import TopStack, _pad, lower_hidden

    return TopStack, _pad, lower_hidden


def load_base(d: Design, device: torch.device) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: SmolLM2-135M-Instruct, or a tiny random Llama (no tokenizer)."""
    if d.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        model: nn.Module = LlamaForCausalLM(config).eval()
        tok = None
    else:
        _examples_helpers()
        from chainopt_examples.models import load_smollm2

        model, tok = load_smollm2()
    model.requires_grad_(False)
    return model.to(device), tok


@dataclass
class Context:
    """The loaded model, the prepared tasks and their cached hidden states, per process."""

    d: Design
    out: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    eval_batch: int = 64
    verbose: bool = True
    stop_after: int | None = None  # raise Stop after this many training steps (tests)
    deadline: float | None = None  # time.time() after which a run stops at the next step
    steps_done_here: int = 0
    _model: Any = None
    _tok: Any = None
    _tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def model(self) -> nn.Module:
        if self._model is None:
            self._model, self._tok = load_base(self.d, self.device)
        return self._model

    @property
    def start(self) -> int:
        return int(self.model().config.num_hidden_layers) - self.d.adapt_layers

    def tokens(self, task: str) -> dict[str, Any]:
        """The task's tokenized, split examples (``data/<task>.json``, written once)."""
        path = self.out / "data" / f"{task}.json"
        with _locked(self.out / "data" / f"{task}.lock"):
            if path.exists():
                data: dict[str, Any] = json.loads(path.read_text())
            else:
                self.model()
                data = prepare_task(task, self.d, self._tok)
                write_json_atomic(path, data)
        if data["design"] != self.d.to_json():
            raise SystemExit(f"{path} was prepared for another design; use another --out")
        return data

    def data(self, task: str) -> dict[str, Any]:
        """The task's tokens and the hidden states entering the top layers (cached)."""
        if task in self._tasks:
            return self._tasks[task]
        data = self.tokens(task)
        cache = self.out / "cache" / f"{task}-L{self.start}-{self.device.type}.pt"
        with _locked(cache.with_suffix(".lock")):
            if cache.exists():
                hidden = torch.load(cache)
            else:
                _, _, lower_hidden = _topstack()
                bs = 256 if self.device.type == "cuda" else 16
                hidden = {
                    s: [h.cpu() for h in lower_hidden(self.model(), data[s]["ids"], self.start, bs)]
                    for s in ("pool", "val", "test")
                }
                torch.save(hidden, cache)
        for s in ("pool", "val", "test"):
            data[s]["h"] = hidden[s]
        self._tasks[task] = data
        return data

    def fresh_top(self, data: dict[str, Any]) -> nn.Module:
        """The top ``adapt_layers`` layers, final norm and label-word head, on the device."""
        top_stack, _, _ = _topstack()
        model = self.model()
        top = top_stack(model, self.start)
        norm, rotary, head = top._frozen
        top._frozen = (norm, rotary, LabelHead(head, data["label_ids"]))
        return top


class _locked:
    """An exclusive, blocking file lock (one driver prepares a task; the others wait)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.path.open("a")
        fcntl.flock(self.handle, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        self.handle.close()


@torch.no_grad()
def evaluate(ctx: Context, top: nn.Module, part: dict[str, Any]) -> tuple[float, float]:
    """``(accuracy, mean label-word cross-entropy)`` on a split, in length-sorted batches."""
    _, pad, _ = _topstack()
    top.eval()
    hs, ys = part["h"], part["y"]
    order = sorted(range(len(hs)), key=lambda i: hs[i].shape[0])
    hits, loss = 0, 0.0
    for b in range(0, len(order), ctx.eval_batch):
        idx = order[b : b + ctx.eval_batch]
        h, lengths = pad([hs[i] for i in idx])
        logits = top(h.to(ctx.device), lengths).float()
        y = torch.tensor([ys[i] for i in idx], device=ctx.device)
        hits += int((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    top.train()
    return hits / len(hs), loss / len(hs)


@torch.no_grad()
def check_top(ctx: Context, task: str, n: int = 4) -> float:
    """Assert the cached path (hidden states + top layers + label rows) gives the full model's
    label-word logits on ``n`` validation prompts; return the largest difference."""
    data = ctx.data(task)
    _, pad, _ = _topstack()
    model = ctx.model()
    top = ctx.fresh_top(data).eval()
    h, lengths = pad(data["val"]["h"][:n])
    got = top(h.to(ctx.device), lengths).float().cpu()
    worst = 0.0
    for i, ids in enumerate(data["val"]["ids"][:n]):
        full = model(input_ids=torch.tensor([ids], device=ctx.device)).logits[0, -1]
        want = full[data["label_ids"]].float().cpu()
        torch.testing.assert_close(got[i], want, atol=2e-3, rtol=1e-3)
        worst = max(worst, float((got[i] - want).abs().max()))
    return worst


# ---------------------------------------------------------------------------------------- a run


class Stop(Exception):
    """A run stopped before its end (``--time-limit`` or a test's ``stop_after``)."""


def build_optimizer(
    top: nn.Module, method: str, lr: float, seed: int, steps_per_epoch: int, d: Design
) -> ChainLoRAOptimizer:
    ranks, knot_epochs = METHODS[method]
    total = steps_per_epoch * d.epochs
    schedule: dict[str, Any]
    if knot_epochs:
        schedule = {"knots": [e * steps_per_epoch for e in knot_epochs]}
    else:
        schedule = {"num_links": 1, "total_steps": total}
    return ChainLoRAOptimizer(
        top,
        torch.optim.AdamW(top.parameters(), lr=lr, weight_decay=0.0),
        target_modules=TARGETS,
        rank=list(ranks) if len(ranks) > 1 else ranks[0],
        alpha=d.alpha,
        seed=seed,
        keep_history=True,
        **schedule,
    )


def train_run(
    ctx: Context, task: str, method: str, lr: float, seed: int, stage: str
) -> dict[str, Any]:
    """Train one (task, method, lr, seed) to the end, resuming from its checkpoint if any."""
    d, out = ctx.d, ctx.out
    key = run_key(task, method, lr, seed)
    result_path = out / "runs" / f"{key}.json"
    if result_path.exists():
        return dict(json.loads(result_path.read_text()))
    data = ctx.data(task)
    _, pad, _ = _topstack()
    train = train_indices(data, d, seed)
    spe = math.ceil(len(train) / d.batch_size)
    total = spe * d.epochs
    top = ctx.fresh_top(data)
    top.train()
    opt = build_optimizer(top, method, lr, seed, spe, d)
    ckpt = out / "ckpt" / f"{key}.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    start_epoch, seconds, records, losses = 0, 0.0, [], []
    if ckpt.exists():
        extra = load_checkpoint(ckpt, top, opt, map_location=ctx.device)
        start_epoch, seconds = int(extra["epoch"]), float(extra["seconds"])
        records, losses = list(extra["records"]), list(extra["losses"])
    if ctx.verbose:
        where = f"resuming after epoch {start_epoch}" if start_epoch else "start"
        print(f"[{datetime.now().strftime('%H:%M:%S')}] {stage} {key}: {where}", flush=True)
    hs, ys = data["pool"]["h"], data["pool"]["y"]
    bar = tqdm(
        total=total, initial=start_epoch * spe, desc=key, unit="step", mininterval=10,
        disable=not ctx.verbose, file=sys.stderr, leave=False,
    )  # fmt: skip
    best_val = max((r["val_acc"] for r in records), default=-1.0)
    for epoch in range(start_epoch, d.epochs):
        t0 = time.perf_counter()
        order = epoch_order(train, seed, epoch)
        for b in range(0, len(order), d.batch_size):
            step = epoch * spe + b // d.batch_size
            for group in opt.param_groups:  # one linear decay to 0 over the run, no warm-up
                group["lr"] = lr * (1 - step / total)
            idx = order[b : b + d.batch_size]
            h, lengths = pad([hs[i] for i in idx])
            y = torch.tensor([ys[i] for i in idx], device=ctx.device)  # label indices
            loss = F.cross_entropy(top(h.to(ctx.device), lengths).float(), y)
            loss.backward()
            opt.step()  # ties a knot after the epochs the method says
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(1)
            ctx.steps_done_here += 1
            if (ctx.stop_after is not None and ctx.steps_done_here >= ctx.stop_after) or (
                ctx.deadline is not None and time.time() > ctx.deadline
            ):
                bar.close()
                raise Stop(key)
        seconds += time.perf_counter() - t0
        val_acc, val_loss = evaluate(ctx, top, data["val"])
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": statistics.fmean(losses[-spe:]) if losses[-spe:] else math.nan,
            "val_acc": val_acc,
            "val_loss": val_loss,
            "test_acc": None,
        }
        if val_acc > best_val or epoch + 1 == d.epochs:  # the best-validation and final models
            rec["test_acc"], rec["test_loss"] = evaluate(ctx, top, data["test"])
        best_val = max(best_val, val_acc)
        records.append(rec)
        bar.set_postfix(val=f"{val_acc:.3f}", refresh=False)
        if epoch + 1 < d.epochs:
            save_checkpoint(
                ckpt, top, opt, epoch=epoch + 1, seconds=seconds, records=records, losses=losses
            )
    bar.close()
    best = max(records, key=lambda r: r["val_acc"])  # the first epoch of the highest accuracy
    summary = opt.chain_summary()
    ranks = [m.effective_rank for m in summary.modules.values()]
    result = {
        "key": key,
        "stage": stage,
        "task": task,
        "method": method,
        "lr": lr,
        "seed": seed,
        "design": d.to_json(),
        "n_train": len(train),
        "steps": total,
        "steps_per_epoch": spe,
        "val_majority": data["val_majority"],
        "test_majority": data["test_majority"],
        "epochs": records,
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
        "best_val_loss": best["val_loss"],
        "test_best": best["test_acc"],
        "test_final": records[-1]["test_acc"],
        "final_train_loss": records[-1]["train_loss"],
        "losses": losses,
        "knot_steps": list(summary.knot_steps),
        "links": summary.links,
        "effective_rank_mean": statistics.fmean(ranks) if None not in ranks else None,
        "train_seconds": round(seconds, 1),
        "device": ctx.device.type
        + (f" ({torch.cuda.get_device_name(ctx.device)})" if ctx.device.type == "cuda" else ""),
        **run_stamp(),
    }
    write_json_atomic(result_path, result)
    ckpt.unlink(missing_ok=True)
    if ctx.verbose:
        print(
            f"    done {key}: val {best['val_acc']:.3f} (epoch {best['epoch']}), test best-val "
            f"{best['test_acc']:.3f}, final {records[-1]['test_acc']:.3f}, {seconds:.0f}s",
            flush=True,
        )
    return result


# ------------------------------------------------------------------------------ stage rules

# two-sided 95% t quantiles; between table entries the next smaller df is used (conservative)
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
    10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
    18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
    26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980,
}  # fmt: skip


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (from a table)."""
    if df < 1:
        return math.nan
    return _T975[max(k for k in _T975 if k <= df)]


def score(r: dict[str, Any]) -> tuple[float, float, float]:
    """LR choice: higher best-validation accuracy, then lower validation loss, then smaller LR."""
    return (r["best_val_acc"], -r["best_val_loss"], -r["lr"])


def lr_grid(
    runs: dict[str, dict[str, Any]], d: Design, task: str, method: str
) -> tuple[list[float], float | None]:
    """``(grid LRs still to run on the LR seed, the chosen LR or None until decided)``."""
    grid = list(d.lrs)
    missing = [lr for lr in grid if run_key(task, method, lr, d.lr_seed) not in runs]
    if missing:
        return missing, None
    best = max((runs[run_key(task, method, lr, d.lr_seed)] for lr in grid), key=score)
    if d.lr_up and best["lr"] == max(grid):  # the largest LR won: one step up
        up = runs.get(run_key(task, method, d.lr_up, d.lr_seed))
        if up is None:
            return [d.lr_up], None
        best = max(best, up, key=score)
    return [], float(best["lr"])


def gate(runs: dict[str, dict[str, Any]], d: Design) -> dict[str, Any]:
    """Which tasks pass the gate (LoRA, seed 0, at its LR) and which are kept (up to max_tasks)."""
    table: dict[str, Any] = {}

    def judge(task: str) -> None:
        _, lr = lr_grid(runs, d, task, "lora")
        if lr is None:
            table[task] = None
            return
        r = runs[run_key(task, "lora", lr, d.lr_seed)]
        margin = r["best_val_acc"] - r["val_majority"]
        table[task] = {
            "lr": lr,
            "val_acc": r["best_val_acc"],
            "val_majority": r["val_majority"],
            "margin": margin,
            "passes": margin >= d.gate_margin - 1e-12 and r["best_val_acc"] <= d.gate_ceiling,
        }

    for task in d.tasks:
        judge(task)
    decided = all(table[t] is not None for t in d.tasks)
    kept: list[str] = []
    need_fifth = False
    if decided:
        passing = [t for t in d.tasks if table[t]["passes"]]
        kept = sorted(passing, key=lambda t: -table[t]["margin"])[: d.max_tasks]
        if len(kept) < d.max_tasks and d.fifth:
            need_fifth = True
            judge(d.fifth)
            if table[d.fifth] is None:
                decided = False
            elif table[d.fifth]["passes"]:
                kept.append(d.fifth)
    return {"table": table, "decided": decided, "kept": kept if decided else [],
            "need_fifth": need_fifth}  # fmt: skip


def paired(
    runs: dict[str, dict[str, Any]],
    d: Design,
    a: str,
    b: str,
    seeds: Sequence[int],
    tasks: Sequence[str],
    metric: str = "test_best",
) -> dict[str, Any]:
    """``a − b`` in points per task (same seed) and pooled over tasks (equal weights)."""
    per_task: dict[str, Any] = {}
    for task in tasks:
        _, lr_a = lr_grid(runs, d, task, a)
        _, lr_b = lr_grid(runs, d, task, b)
        diffs = []
        for s in seeds:
            ra = runs.get(run_key(task, a, lr_a, s)) if lr_a is not None else None
            rb = runs.get(run_key(task, b, lr_b, s)) if lr_b is not None else None
            if ra is not None and rb is not None:
                diffs.append(100 * (ra[metric] - rb[metric]))
        if diffs:
            m, sd = mean_std(diffs)
            half = t975(len(diffs) - 1) * sd / math.sqrt(len(diffs))
            per_task[task] = {"diffs": diffs, "mean": m, "std": sd, "n": len(diffs),
                              "ci95": half, "ahead": sum(x > 0 for x in diffs)}  # fmt: skip
    pooled: dict[str, Any] | None = None
    if per_task:
        t = len(per_task)
        mean = statistics.fmean(v["mean"] for v in per_task.values())
        se = math.sqrt(sum(v["std"] ** 2 / v["n"] for v in per_task.values())) / t
        df = sum(v["n"] - 1 for v in per_task.values())
        half = t975(df) * se
        pooled = {"mean": mean, "se": se, "df": df, "ci95": half, "low": mean - half,
                  "high": mean + half}  # fmt: skip
    return {"per_task": per_task, "pooled": pooled}


def decide(runs: dict[str, dict[str, Any]], d: Design, kept: Sequence[str]) -> dict[str, Any]:
    """The pre-registered decision on COLA-3 − LoRA (best-validation test accuracy, points).

    ``pending`` until every kept task has both methods on every seed of the stage; then
    ``confirmed`` / ``refuted`` / ``extend`` (primary seeds) or ``inconclusive`` (after the
    extension seeds).
    """
    stages = [("primary", d.primary_seeds), ("extension", d.primary_seeds + d.extension_seeds)]
    out: dict[str, Any] = {"verdict": "pending", "after": None}
    for name, seeds in stages:
        res = paired(runs, d, "cola3", "lora", seeds, kept)
        complete = bool(kept) and all(
            res["per_task"].get(t, {}).get("n", 0) == len(seeds) for t in kept
        )
        out[name] = res
        if not complete:
            return out
        p = res["pooled"]
        positive = sum(res["per_task"][t]["mean"] > 0 for t in kept)
        need = min(2, len(kept))
        if p["mean"] >= 1.0 and p["low"] > 0 and positive >= need:
            out.update(verdict="confirmed", after=name)
            return out
        if p["high"] < 1.5:
            out.update(verdict="refuted", after=name)
            return out
        out.update(verdict="extend" if name == "primary" else "inconclusive", after=name)
    return out


Todo = tuple[str, str, str, float, int]  # stage, task, method, lr, seed


def next_runs(runs: dict[str, dict[str, Any]], d: Design) -> list[Todo]:
    """What can run now, in priority order, by the pre-registered stage rules."""
    todo: list[Todo] = []
    for task in d.tasks:
        todo += [("gate", task, "lora", lr, d.lr_seed) for lr in lr_grid(runs, d, task, "lora")[0]]
    g = gate(runs, d)
    if g["need_fifth"]:
        missing = lr_grid(runs, d, d.fifth, "lora")[0]
        todo += [("gate", d.fifth, "lora", lr, d.lr_seed) for lr in missing]
    if not g["decided"]:
        return todo
    kept = g["kept"]

    def seeds_of(methods: Sequence[str], seeds: Sequence[int], stage: str) -> None:
        for seed in seeds:
            for task in kept:
                for m in methods:
                    _, lr = lr_grid(runs, d, task, m)
                    if lr is not None and run_key(task, m, lr, seed) not in runs:
                        todo.append((stage, task, m, lr, seed))

    for task in kept:
        todo += [("lr", task, "cola3", lr, d.lr_seed) for lr in lr_grid(runs, d, task, "cola3")[0]]
    seeds_of(PRIMARY, d.primary_seeds, "primary")
    for task in kept:
        for m in SECONDARY:
            todo += [("lr", task, m, lr, d.lr_seed) for lr in lr_grid(runs, d, task, m)[0]]
    seeds_of(SECONDARY, d.secondary_seeds, "secondary")
    if decide(runs, d, kept)["verdict"] == "extend":
        seeds_of(PRIMARY, d.extension_seeds, "extension")
    return todo


def drive(ctx: Context, max_runs: int | None = None, wait_s: float = 20.0) -> None:
    """Run whatever is runnable until nothing is left (or ``max_runs`` runs, or the deadline).

    Several drivers may share one ``--out``: each takes the first runnable run that no other
    holds, and waits while every runnable run is held (the next stage needs their results).
    """
    done_here = 0
    while True:
        if ctx.deadline is not None and time.time() > ctx.deadline:
            raise Stop("time limit")
        runs = finished(ctx.out)
        for r in runs.values():
            if r["design"] != ctx.d.to_json():
                raise SystemExit(f"{r['key']} was run with another design; use another --out")
        todo = next_runs(runs, ctx.d)
        if not todo or (max_runs is not None and done_here >= max_runs):
            return
        for stage, task, method, lr, seed in todo:
            key = run_key(task, method, lr, seed)
            handle = claim(ctx.out / "ckpt", key)
            if handle is None:
                continue
            with handle:
                if not (ctx.out / "runs" / f"{key}.json").exists():
                    train_run(ctx, task, method, lr, seed, stage)
                    done_here += 1
            break
        else:
            time.sleep(wait_s)


# ------------------------------------------------------------------------------------ report


def _lr_table(runs: dict[str, dict[str, Any]], d: Design, tasks: Sequence[str]) -> list[str]:
    grid = (*d.lrs, d.lr_up) if d.lr_up else d.lrs
    lines = ["| task | method | " + " | ".join(f"lr {lr:g}" for lr in grid)
             + " | chosen |", "|---|---|" + "---|" * (len(grid) + 1)]  # fmt: skip
    for task in tasks:
        for m in METHODS:
            cells = []
            for lr in grid:
                r = runs.get(run_key(task, m, lr, d.lr_seed))
                cells.append(f"{100 * r['best_val_acc']:.1f}" if r else "")
            if not any(cells):
                continue
            chosen = lr_grid(runs, d, task, m)[1]
            lines.append(f"| {task} | {m} | " + " | ".join(cells)
                         + f" | {'' if chosen is None else f'{chosen:g}'} |")  # fmt: skip
    return lines


def _interval(low: float, high: float) -> str:
    """``[low, high]``, or ``—`` where one seed gives no interval (NaN)."""
    return "—" if math.isnan(low) or math.isnan(high) else f"[{low:+.2f}, {high:+.2f}]"


def build_report(out: Path, d: Design, plots: bool = True) -> str:
    """Markdown tables (and PNG plots) of whatever has finished in ``out``."""
    runs = finished(out)
    g = gate(runs, d)
    kept = g["kept"]
    lines = [f"# Experiment 5 (paper protocol): {len(runs)} runs finished", ""]
    devices: dict[str, int] = {}
    for r in runs.values():
        devices[r["device"]] = devices.get(r["device"], 0) + 1
    lines += ["Runs per device: " + ", ".join(f"{k} {v}" for k, v in sorted(devices.items())), ""]
    lines += ["## Gate (LoRA, seed 0, validation accuracy at its LR, %)", "",
              "| task | lr | best-val accuracy | validation majority | margin | passes |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for task, row in g["table"].items():
        if row is None:
            lines.append(f"| {task} | pending | | | | |")
        else:
            lines.append(
                f"| {task} | {row['lr']:g} | {100 * row['val_acc']:.1f} | "
                f"{100 * row['val_majority']:.1f} | {100 * row['margin']:+.1f} | {row['passes']} |"
            )
    status = "decided" if g["decided"] else "pending"
    lines += ["", f"Gate {status}; kept tasks: {', '.join(kept) if kept else '(none yet)'}", ""]
    lines += ["## Learning rate (seed 0, best-validation accuracy, %)", ""]
    lines += _lr_table(runs, d, [*d.tasks, d.fifth] if d.fifth else list(d.tasks))
    lines += ["", "## Test accuracy (%), mean ± std over seeds, each method at its LR", "",
              "| task | method | seeds | best-validation model | final model | test majority |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    seeds_all = sorted({*d.primary_seeds, *d.extension_seeds})
    for task in kept:
        for m in METHODS:
            _, lr = lr_grid(runs, d, task, m)
            rs = [runs[k] for s in seeds_all if lr is not None
                  and (k := run_key(task, m, lr, s)) in runs]  # fmt: skip
            if not rs:
                continue
            b = mean_std(100 * r["test_best"] for r in rs)
            f = mean_std(100 * r["test_final"] for r in rs)
            lines.append(
                f"| {task} | {m} | {len(rs)} | {b[0]:.1f} ± {b[1]:.1f} | {f[0]:.1f} ± {f[1]:.1f} "
                f"| {100 * rs[0]['test_majority']:.1f} |"
            )
    dec = decide(runs, d, kept) if kept else {"verdict": "pending"}
    lines += ["", "## COLA − LoRA, paired by seed (test accuracy points, 95% t-interval)", "",
              "| comparison | metric | task | n | mean | 95% interval | seeds ahead |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    comps = [("cola3", "lora", seeds_all), ("cola2", "lora", d.secondary_seeds),
             ("cola2_down", "lora", d.secondary_seeds), ("cola2", "cola3", d.secondary_seeds),
             ("cola2_down", "cola2", d.secondary_seeds)]  # fmt: skip
    pooled_rows = []
    for a, b, seeds in comps:
        for metric in ("test_best", "test_final"):
            res = paired(runs, d, a, b, seeds, kept, metric)
            for task, v in res["per_task"].items():
                lines.append(
                    f"| {a} − {b} | {metric} | {task} | {v['n']} | {v['mean']:+.2f} | "
                    f"{_interval(v['mean'] - v['ci95'], v['mean'] + v['ci95'])} | "
                    f"{v['ahead']}/{v['n']} |"
                )
            if res["pooled"]:
                p = res["pooled"]
                n = sum(v["n"] for v in res["per_task"].values())
                lines.append(f"| {a} − {b} | {metric} | pooled | {n} | {p['mean']:+.2f} | "
                             f"{_interval(p['low'], p['high'])} | |")  # fmt: skip
                if b == "lora":  # the plot shows the comparisons with LoRA
                    pooled_rows.append((f"{a} − {b} ({metric})", res))
    lines += ["", f"**Pre-registered decision: {dec['verdict']}**"
              + (f" (after the {dec['after']} seeds)" if dec.get("after") else ""), ""]  # fmt: skip
    text = "\n".join(lines) + "\n"
    if plots and runs:
        _plot_curves(runs, d, kept or list(d.tasks), out / "val_curves.png")
        if pooled_rows:
            _plot_paired(pooled_rows, out / "paired_differences.png")
    write_text_atomic(out / "report.md", text)
    write_json_atomic(out / "decision.json", {"gate": g, "decision": dec})
    return text


def _plot_curves(
    runs: dict[str, dict[str, Any]], d: Design, tasks: Sequence[str], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for m, (_, knot_epochs) in METHODS.items():
            _, lr = lr_grid(runs, d, task, m)
            rs = [r for r in runs.values() if r["task"] == task and r["method"] == m
                  and r["lr"] == lr and r["seed"] != d.lr_seed]  # fmt: skip
            if not rs:
                continue
            ep = list(range(1, d.epochs + 1))
            mean = [statistics.fmean(100 * r["epochs"][e - 1]["val_acc"] for r in rs) for e in ep]
            (line,) = ax.plot(ep, mean, marker="o", label=f"{m} (lr {lr:g}, {len(rs)} seeds)")
            for k in knot_epochs:
                ax.axvline(k + 0.02 * len(m), color=line.get_color(), linestyle=":", alpha=0.8)
        if rs := [r for r in runs.values() if r["task"] == task]:
            ax.axhline(100 * rs[0]["val_majority"], color="grey", linestyle="--", lw=1)
        ax.set_title(task)
        ax.set_xticks(range(1, d.epochs + 1))
        ax.set_xlabel("epoch (dotted: knots)")
        ax.set_ylabel("validation accuracy (%)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_paired(rows: list[tuple[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, means, halves = [], [], []
    for name, res in rows:
        for task, v in res["per_task"].items():
            labels.append(f"{name}, {task}")
            means.append(v["mean"])
            halves.append(v["ci95"] if math.isfinite(v["ci95"]) else 0.0)
        labels.append(f"{name}, pooled")
        means.append(res["pooled"]["mean"])
        halves.append(res["pooled"]["ci95"] if math.isfinite(res["pooled"]["ci95"]) else 0.0)
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(labels) + 1.2))
    y = list(range(len(labels)))
    ax.errorbar(means, y, xerr=halves, fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=1)
    ax.axvline(1, color="green", lw=1, linestyle=":")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("paired difference, test accuracy points (95% t-interval)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------- estimate


def _train_step(
    top: nn.Module, opt: ChainLoRAOptimizer, h: torch.Tensor, lengths: torch.Tensor, y: torch.Tensor
) -> None:
    F.cross_entropy(top(h, lengths).float(), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def estimate(ctx: Context, n: int = 5) -> dict[str, Any]:
    """Time training steps and evaluation on each task's mean prompt length; the plan's cost.

    On the CPU the times are CPU seconds of this process (``time.process_time``, one thread:
    the cost on one idle core, whatever else shares the machine); on a GPU, wall seconds.
    """
    d = ctx.d
    model = ctx.model()
    hidden = int(model.config.hidden_size)
    cuda = ctx.device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time

    def timed(fn: Callable[..., Any], *args: Any) -> float:
        t0 = clock()
        fn(*args)
        if cuda:
            torch.cuda.synchronize()
        return clock() - t0

    per_task: dict[str, Any] = {}
    for task in [*d.tasks, *([d.fifth] if d.fifth else [])]:
        data = ctx.tokens(task)
        tokens = round(data["mean_tokens"])
        top = ctx.fresh_top(data)
        opt = build_optimizer(top, "cola3", 1e-4, 0, 100, d)
        h = torch.randn(d.batch_size, tokens, hidden, device=ctx.device)
        lengths = torch.full((d.batch_size,), tokens)
        y = torch.zeros(d.batch_size, dtype=torch.long, device=ctx.device)

        step_s = statistics.median(
            [timed(_train_step, top, opt, h, lengths, y) for _ in range(n + 1)][1:]
        )
        he = torch.randn(ctx.eval_batch, tokens, hidden, device=ctx.device)
        le = torch.full((ctx.eval_batch,), tokens)
        with torch.no_grad():
            timed(top, he, le)
            per_example = timed(top, he, le)
        per_example /= ctx.eval_batch
        n_train = min(d.n_train, len(data["pool"]["y"]))
        steps = math.ceil(n_train / d.batch_size) * d.epochs
        evals = len(data["val"]["y"]) * d.epochs + 3 * len(data["test"]["y"])  # ~3 test evals
        run_s = steps * step_s + evals * per_example + 5.0
        # the frozen layers below, once per task: (30 - K) layers over every example
        cache_s = data["n_examples"] * per_example * ctx.start / d.adapt_layers
        per_task[task] = {"mean_tokens": tokens, "step_s": round(step_s, 4),
                          "eval_example_s": round(per_example, 5), "steps": steps,
                          "run_s": round(run_s, 1), "cache_s": round(cache_s)}  # fmt: skip
    k = min(d.max_tasks, len(d.tasks))
    mean_run = statistics.fmean(per_task[t]["run_s"] for t in d.tasks)
    primary = 2 * len(d.primary_seeds) * k + len(d.lrs) * k  # + COLA-3's LR grid
    secondary = 2 * (len(d.lrs) + len(d.secondary_seeds)) * k
    plan = {
        "gate_hours": sum(per_task[t]["run_s"] * len(d.lrs) + per_task[t]["cache_s"]
                          for t in d.tasks) / 3600,
        "primary_hours": primary * mean_run / 3600,
        "secondary_hours": secondary * mean_run / 3600,
        "extension_hours": 2 * len(d.extension_seeds) * k * mean_run / 3600,
        "fifth_task_gate_hours": (len(d.lrs) * per_task[d.fifth]["run_s"]
                                  + per_task[d.fifth]["cache_s"]) / 3600 if d.fifth else 0.0,
    }  # fmt: skip
    plan["total_hours_without_extension"] = (
        plan["gate_hours"] + plan["primary_hours"] + plan["secondary_hours"]
    )
    plan["runs_without_extension"] = len(d.lrs) * len(d.tasks) + primary + secondary
    return {
        "device": ctx.device.type
        + (f" ({torch.cuda.get_device_name(ctx.device)})" if cuda else ""),
        "clock": "wall seconds" if cuda else "CPU seconds of one thread",
        "threads": torch.get_num_threads(),
        "eval_batch": ctx.eval_batch,
        "adapt_layers": d.adapt_layers,
        "per_task": per_task,
        "plan": {k2: round(v, 2) if isinstance(v, float) else v for k2, v in plan.items()},
        "note": "the 3 kept tasks are costed as the mean of the 4 BIG-bench tasks; runs at the "
        "step-up LR (2e-3) are not counted",
    }


# ------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["prepare", "estimate", "run", "report"])
    p.add_argument("--out", type=Path, default=None, help=f"results folder ({DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="smoke test on the real model (minutes)")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, synthetic tasks")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--eval-batch", type=int, default=None, help="64 on cpu, 512 on cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds, then stop cleanly")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=argparse.SUPPRESS)
    p.add_argument("--wait", type=float, default=20.0, help="seconds between looks for work")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    d = with_overrides(TINY if args.tiny else QUICK if args.quick else Design(), args.set)
    out = args.out or DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("ckpt/\ncache/\ndata/\n")
    device = torch.device(args.device)
    ctx = Context(
        d,
        out,
        device=device,
        eval_batch=args.eval_batch or (512 if device.type == "cuda" else 64),
        verbose=not args.quiet,
        stop_after=args.stop_after_steps,
        deadline=started + args.time_limit if args.time_limit is not None else None,
    )
    if args.command == "prepare":
        tasks = [*d.tasks, *([d.fifth] if d.fifth else [])]
        for task in tasks:
            data = ctx.tokens(task)
            print(
                f"{task}: {data['n_examples']} examples, pool {len(data['pool']['y'])} / val "
                f"{len(data['val']['y'])} / test {len(data['test']['y'])}, "
                f"{data['mean_tokens']:.0f} tokens/prompt, {data['prompts_cut']} cut, "
                f"val majority {data['val_majority']:.3f}",
                flush=True,
            )
        return
    if args.command == "estimate":
        est = estimate(ctx)
        write_json_atomic(out / f"estimate_{device.type}.json", est)
        print(json.dumps(est, indent=1), flush=True)
        return
    if args.command == "run":
        if args.quick or args.tiny:
            worst = check_top(ctx, d.tasks[0])
            print(f"cache check: the top stack gives the full model's logits ({worst:.1e})")
        try:
            drive(ctx, args.max_runs, args.wait)
        except Stop as stop:
            print(f"stopped ({stop}); rerun the same command to resume", flush=True)
    text = build_report(out, d, plots=not args.no_plots)
    if not args.quiet:
        print(text, flush=True)


if __name__ == "__main__":
    main()
