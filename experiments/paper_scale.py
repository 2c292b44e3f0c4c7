"""Experiment 3: LoRA vs COLA at the paper's scale (OPT-1.3B, Llama-2-7B on SST-2/RTE/BoolQ/…).

For a machine with a GPU and internet access: models from the Hugging Face hub, data from the
hub's GLUE/SuperGLUE copies, the COLA/MeZO setup (1000 training examples, prompt-based
fine-tuning with label words, r=8, alpha=16 on q_proj/v_proj, AdamW, linear LR, 5 epochs,
batch 8), several seeds, mean ± std per task and method.

``--tiny`` runs the same code path end to end on CPU and offline: a small randomly initialised
OPT (built from ``OPTConfig`` with the SmolLM2 tokenizer of ``chainopt_examples.models``) on a
synthetic sentiment task. It checks the script, not COLA.

Run:
    python experiments/paper_scale.py --tiny --quick                         # CPU smoke test
    python experiments/paper_scale.py --model facebook/opt-1.3b --tasks sst2 rte boolq wsc \\
        --seeds 0 1 2 --bf16                                                   # GPU, online
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _chains import ChainSpec, build_chain, parse_specs
from _plots import bar_by_task
from _runs import add_common_args, mean_std, run_metadata, seed_everything, write_json
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from chainopt_examples.models import load_tokenizer, tiny_opt
from chainopt_examples.prompts import PromptCollator, build_prompt_dataset
from chainopt_examples.scoring import evaluate_label_words


@dataclass(frozen=True)
class HubTask:
    """A hub dataset phrased as a prompt with label words (MeZO's templates)."""

    path: str
    config: str
    render: Callable[[dict[str, Any]], str]
    label_words: tuple[str, ...]  # in label-index order
    eval_split: str = "validation"


HUB_TASKS: dict[str, HubTask] = {
    "sst2": HubTask(
        "nyu-mll/glue", "sst2", lambda r: f"{r['sentence'].strip()} It was", (" terrible", " great")
    ),
    "rte": HubTask(
        "aps/super_glue",
        "rte",
        lambda r: (
            f'{r["premise"]}\nDoes this mean that "{r["hypothesis"]}" is true? Yes or No?\nAnswer:'
        ),
        (" Yes", " No"),
    ),
    "boolq": HubTask(
        "aps/super_glue",
        "boolq",
        lambda r: f"{r['passage']} {r['question']}? Yes or No?\nAnswer:",
        (" No", " Yes"),
    ),
    "cb": HubTask(
        "aps/super_glue",
        "cb",
        lambda r: (
            f'Suppose {r["premise"]} Can we infer that "{r["hypothesis"]}"? '
            "Yes, No, or Maybe?\nAnswer:"
        ),
        (" Yes", " No", " Maybe"),
    ),
    "wsc": HubTask(
        "aps/super_glue",
        "wsc.fixed",
        lambda r: (
            f"{r['text']}\nIn the previous sentence, does the pronoun "
            f'"{r["span2_text"].lower()}" refer to {r["span1_text"]}? Yes or No?\n'
            "Answer:"
        ),
        (" No", " Yes"),
    ),
    "wic": HubTask(
        "aps/super_glue",
        "wic",
        lambda r: (
            f'Does the word "{r["word"]}" have the same meaning in these two '
            f"sentences? Yes, No?\n{r['sentence1']}\n{r['sentence2']}\nAnswer:"
        ),
        (" No", " Yes"),
    ),
}

DEFAULT_METHODS = ["lora:1:8", "cola2:2:8", "cola3:3:8"]
TEMPLATE = "{text}"  # tasks are rendered to full prompts before tokenization


def hub_splits(
    name: str, n_train: int, n_test: int, seed: int, tok: Any, field_tokens: int
) -> tuple[Dataset, Dataset]:
    """``(train, test)`` with ``text``/``label``: a seeded sample of the hub's train split and
    of its validation split (the SuperGLUE test labels are hidden), as MeZO does.

    Every text field longer than ``field_tokens`` tokens (a BoolQ passage, say) is cut from its
    end *before* the prompt is rendered, so the question and the answer cue always survive.
    """
    from datasets import load_dataset

    task = HUB_TASKS[name]
    raw = load_dataset(task.path, task.config)

    def cut(row: dict[str, Any]) -> dict[str, Any]:
        out = dict(row)
        for key, value in row.items():
            if isinstance(value, str):
                ids = tok(value, add_special_tokens=False)["input_ids"]
                if len(ids) > field_tokens:
                    out[key] = tok.decode(ids[:field_tokens], skip_special_tokens=True) + " ..."
        return out

    def prep(split: str, n: int) -> Dataset:
        ds = raw[split].shuffle(seed=seed)
        ds = ds.select(range(min(n, len(ds))))
        return Dataset.from_dict(
            {"text": [task.render(cut(r)) for r in ds], "label": [int(r["label"]) for r in ds]}
        )

    return prep("train", n_train), prep(task.eval_split, n_test)


def synthetic_splits(n_train: int, n_test: int, seed: int) -> tuple[Dataset, Dataset]:
    """An offline sentiment task: ``"<filler> <polar word> <filler> It was"`` → terrible/great."""
    rng = random.Random(seed)
    good = ["wonderful", "brilliant", "lovely", "superb", "delightful", "moving"]
    bad = ["awful", "boring", "dreadful", "clumsy", "tedious", "painful"]
    filler = ["the plot", "the cast", "this film", "the music", "the ending", "every scene"]

    def make(n: int) -> Dataset:
        texts, labels = [], []
        for _ in range(n):
            y = rng.randrange(2)
            word = rng.choice(good if y else bad)
            texts.append(f"{rng.choice(filler).capitalize()} was {word}. It was")
            labels.append(y)
        return Dataset.from_dict({"text": texts, "label": labels})

    return make(n_train), make(n_test)


def load_model_and_tokenizer(
    args: argparse.Namespace, device: torch.device, tokenizer_only: bool = False
) -> tuple[Any, Any]:
    """The hub model (or a tiny OPT from config with ``--tiny``) and its tokenizer.

    With ``tokenizer_only`` the model is ``None``.
    """
    if args.tiny:
        tok = load_tokenizer("tiny-opt")
        model = tiny_opt(tok, seed=0)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        if tokenizer_only:
            return None, tok
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    return model.to(device), tok


def train_eval(
    args: argparse.Namespace,
    spec: ChainSpec,
    seed: int,
    task: str,
    train: Dataset,
    test: Dataset,
    label_words: tuple[str, ...],
    device: torch.device,
) -> dict[str, Any]:
    """Fine-tune a fresh model with one method and seed; return test accuracy and timings."""
    seed_everything(seed)
    model, tok = load_model_and_tokenizer(args, device)
    encoded = build_prompt_dataset(train, tok, TEMPLATE, label_words, max_length=args.max_length)
    loader = DataLoader(
        encoded.remove_columns(["label"]),
        batch_size=args.batch_size,
        shuffle=True,
        collate_fn=PromptCollator(tok.pad_token_id),
        generator=torch.Generator().manual_seed(seed),
    )
    total = math.ceil(len(encoded) / args.batch_size) * args.epochs
    opt, sched = build_chain(
        model, spec, args.targets, total_steps=total, lr=args.lr, alpha=args.alpha, seed=seed
    )
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=f"{task} {spec.name} s{seed}", disable=args.no_progress)
    last = float("nan")
    for _ in range(args.epochs):
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                loss = model(**batch).loss
            loss.backward()
            opt.step()  # ties a knot when the schedule says so
            sched.step()
            opt.zero_grad(set_to_none=True)
            last = loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    knots = list(opt.chain_summary().knot_steps)
    opt.merge_and_unload()
    acc = evaluate_label_words(
        model,
        tok,
        test,
        TEMPLATE,
        label_words,
        max_length=args.max_length,
        batch_size=args.eval_batch_size,
    )
    return {
        "task": task,
        "method": spec.name,
        "seed": seed,
        "accuracy": acc,
        "last_train_loss": last,
        "knots": knots,
        "train_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, "experiments/results/paper_scale")
    parser.add_argument("--model", default="facebook/opt-1.3b")
    parser.add_argument("--tiny", action="store_true", help="tiny OPT + synthetic task, offline")
    parser.add_argument(
        "--tasks", nargs="+", default=["sst2", "rte", "boolq", "wsc"], choices=sorted(HUB_TASKS)
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="NAME:LINKS:R1,R2,... (ranks per link, last repeats)",
    )
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 weights and autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.quick:
        args.n_train, args.n_test, args.epochs, args.max_length = 32, 32, 2, 64
        args.methods = ["lora:1:8", "cola2:2:8"]
        args.seeds = args.seeds or [0]
    if args.tiny:
        args.tasks, args.lr = ["synthetic"], max(args.lr, 1e-3)
        args.model = "tiny-opt (OPTConfig, random init)"
    args.seeds = args.seeds or [0, 1, 2]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.time()
    specs = parse_specs(args.methods)
    runs: list[dict[str, Any]] = []
    for task in args.tasks:
        if args.tiny:
            train, test = synthetic_splits(args.n_train, args.n_test, seed=0)
            words: tuple[str, ...] = (" terrible", " great")
        else:
            tok = load_model_and_tokenizer(args, device, tokenizer_only=True)[1]
            train, test = hub_splits(
                task, args.n_train, args.n_test, seed=0, tok=tok, field_tokens=args.max_length - 64
            )
            words = HUB_TASKS[task].label_words
        for seed in args.seeds:
            for spec in specs:
                r = train_eval(args, spec, seed, task, train, test, words, device)
                runs.append(r)
                print(f"{task} {spec.name} seed {seed}: accuracy {r['accuracy']:.4f}", flush=True)
    summary: dict[str, Any] = {}
    for task in args.tasks:
        summary[task] = {}
        for spec in specs:
            m, s = mean_std(
                r["accuracy"] for r in runs if r["task"] == task and r["method"] == spec.name
            )
            summary[task][spec.name] = {"accuracy": {"mean": m, "std": s}}
    write_json(
        args.out / "results.json",
        {
            "experiment": "paper_scale",
            "model": args.model,
            "meta": run_metadata(args, started),
            "summary": summary,
            "runs": runs,
        },
    )
    bar_by_task(
        summary, [s.name for s in specs], "accuracy", args.out / "accuracy.png", ylabel="accuracy"
    )


if __name__ == "__main__":
    main()
