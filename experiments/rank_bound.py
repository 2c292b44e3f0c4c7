"""Experiment 4: COLA against LoRA on SmolLM2-135M where rank is the bottleneck (issue 14).

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

Run (from the repository root):
    python experiments/rank_bound.py --estimate-only       # time a few steps, print the budget
    nohup nice -n 10 python experiments/rank_bound.py --threads 1 > rank_bound.log 2>&1 &
    python experiments/rank_bound.py --tiny --out /tmp/rb  # tiny random Llama, a few seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from chainopt import ChainLoRAOptimizer, load_checkpoint, save_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import claim, git_commit, mean_ci, write_json_atomic

_write_json = write_json_atomic
_git_commit = git_commit

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "experiments" / "results" / "rank_bound"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# ------------------------------------------------------------------------------------- design


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


# --------------------------------------------------------------------------------------- data

_CITIES = [
    "Paris",
    "London",
    "Tokyo",
    "Berlin",
    "Madrid",
    "Rome",
    "Cairo",
    "Lima",
    "Oslo",
    "Vienna",
    "Prague",
    "Dublin",
    "Lisbon",
    "Athens",
    "Moscow",
    "Delhi",
    "Seoul",
    "Sydney",
    "Toronto",
    "Chicago",
    "Boston",
    "Denver",
    "Miami",
    "Dallas",
]
_JOBS = [
    "doctor",
    "teacher",
    "lawyer",
    "farmer",
    "pilot",
    "nurse",
    "chef",
    "baker",
    "painter",
    "writer",
    "singer",
    "dancer",
    "plumber",
    "banker",
    "soldier",
    "sailor",
]
_COLOURS = [
    "red",
    "blue",
    "green",
    "yellow",
    "purple",
    "orange",
    "pink",
    "brown",
    "black",
    "white",
    "grey",
    "gold",
]
_INSTRUMENTS = [
    "piano",
    "guitar",
    "violin",
    "drums",
    "flute",
    "cello",
    "trumpet",
    "harp",
    "banjo",
    "organ",
    "clarinet",
]
RELATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("{name} lives in", tuple(_CITIES)),
    ("{name} works as a", tuple(_JOBS)),
    ("The favourite colour of {name} is", tuple(_COLOURS)),
    ("{name} plays the", tuple(_INSTRUMENTS)),
)
_ONSETS = [
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "k",
    "kl",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
    "th",
    "sh",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "k", "m"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def build_facts(n_people: int, seed: int) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs: ``n_people`` fictional people × 4 random attributes.

    Names are two made-up words of 2 and 3 syllables, all distinct; each attribute is drawn
    uniformly and independently, so a fact cannot be inferred from the others.
    """
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n_people:
        first = "".join(_syllable(rng) for _ in range(2)).capitalize()
        last = "".join(_syllable(rng) for _ in range(3)).capitalize()
        name = f"{first} {last}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    facts = []
    for name in names:
        for template, values in RELATIONS:
            facts.append((template.format(name=name), " " + rng.choice(values)))
    return facts


def chance_recall() -> float:
    """Recall of guessing an attribute uniformly (the mean over the four relations)."""
    return statistics.fmean(1 / len(v) for _, v in RELATIONS)


class ByteTokenizer:
    """UTF-8 bytes as token ids (3..258) for the tiny random model: no files needed."""

    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]


def encode(tokenizer: Any, text: str) -> list[int]:
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return list(tokenizer.encode(text, add_special_tokens=False))


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor  # (n,) flat index into (B·T) of the positions predicting answers
    targets: torch.Tensor  # (n,)
    fact_of: torch.Tensor  # (n,) which row of the batch each answer token belongs to


def collate(items: Sequence[tuple[list[int], list[int]]], pad: int) -> Batch:
    width = max(len(p) + len(a) for p, a in items)
    ids = torch.full((len(items), width), pad, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    pos, tgt, row = [], [], []
    for i, (p, a) in enumerate(items):
        seq = p + a
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        for j, tok in enumerate(a):
            pos.append(i * width + len(p) + j - 1)  # the logit at t predicts token t+1
            tgt.append(tok)
            row.append(i)
    return Batch(ids, mask, torch.tensor(pos), torch.tensor(tgt), torch.tensor(row))


def data_order(n: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The fact indices of every step: a fresh seeded permutation per epoch, epochs chained."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    flat: list[int] = []
    while len(flat) < steps * batch_size:
        flat.extend(torch.randperm(n, generator=gen).tolist())
    return [flat[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def probe_tokens(tokenizer: Any, d: Design) -> tuple[torch.Tensor, dict[str, Any]]:
    """The forgetting probe: the first ``probe_tokens`` tokens of a few stdlib files."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for name in d.probe_files:
        ids = encode(tokenizer, (stdlib / name).read_text(encoding="utf-8"))[: d.probe_tokens]
        if len(ids) < d.probe_tokens:
            raise ValueError(f"{stdlib / name} has fewer than {d.probe_tokens} tokens")
        rows.append(ids)
    ids = torch.tensor(rows)
    info = {
        "stdlib": str(stdlib),
        "python": platform.python_version(),
        "files": list(d.probe_files),
        "tokens": int(ids.numel()),
        "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
    }
    return ids, info


# -------------------------------------------------------------------------------------- model


def _examples_models() -> Any:
    """The examples' model loaders (``examples/chainopt_examples/models.py``)."""
    examples = str(REPO_ROOT / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    try:
        from chainopt_examples import models  # type: ignore[import-not-found]
    except ImportError:  # a checkout from before the examples became a package
        import _common as models  # type: ignore[import-not-found,no-redef]
    return models


def load(d: Design) -> tuple[nn.Module, Any, int]:
    """``(model, tokenizer, pad id)``: SmolLM2-135M-Instruct, or a tiny random Llama."""
    if d.model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=ByteTokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            pad_token_id=0,
        )
        return LlamaForCausalLM(config).eval(), ByteTokenizer(), 0
    model, tokenizer = _examples_models().load_smollm2()
    return model, tokenizer, int(tokenizer.pad_token_id)


def answer_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits at the answer positions only: the LM head runs on those rows, not all tokens."""
    hidden = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    h = hidden.last_hidden_state.flatten(0, 1)[batch.positions]
    return model.lm_head(h).float()


@torch.no_grad()
def evaluate(
    model: nn.Module, encoded: list[tuple[list[int], list[int]]], pad: int, eval_batch: int = 64
) -> dict[str, float]:
    """Exact recall and answer NLL (nats per fact, summed over its answer tokens)."""
    model.eval()
    hits, nll = 0, 0.0
    by_length = sorted(encoded, key=lambda pa: len(pa[0]) + len(pa[1]))  # little padding
    for start in range(0, len(by_length), eval_batch):
        batch = collate(by_length[start : start + eval_batch], pad)
        logits = answer_logits(model, batch)
        tok_nll = F.cross_entropy(logits, batch.targets, reduction="none")
        right = logits.argmax(-1) == batch.targets
        n = batch.input_ids.shape[0]
        wrong_per_fact = torch.zeros(n).index_add_(0, batch.fact_of, (~right).float())
        hits += int((wrong_per_fact == 0).sum())
        nll += float(tok_nll.sum())
    return {"recall": hits / len(encoded), "answer_nll": nll / len(encoded)}


@torch.no_grad()
def probe_loss(model: nn.Module, ids: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    for row in ids:
        total += float(model(input_ids=row[None], labels=row[None]).loss)
    return total / ids.shape[0]


def adapted_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The projections every method trains: ``TARGETS`` in every decoder layer."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
    ]


def build_optimizer(
    model: nn.Module, method: Method, lr: float, seed: int, d: Design
) -> torch.optim.Optimizer:
    if method.kind == "full":
        # full fine-tuning of exactly the weights the chains adapt (every projection of every
        # layer, unconstrained rank); embeddings, LM head and norms stay frozen as for LoRA
        weights = [m.weight for _, m in adapted_linears(model)]
        for param in model.parameters():
            param.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        return torch.optim.AdamW(weights, lr=lr, weight_decay=0.0, fused=True)
    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule: dict[str, Any]
    knots = method.knots(d.steps)
    if knots is None:
        schedule = {"num_links": method.links, "total_steps": d.steps}
    else:
        schedule = {"knots": knots}
    return ChainLoRAOptimizer(
        model,
        base,
        target_modules=TARGETS,
        rank=list(method.ranks) if len(method.ranks) > 1 else method.ranks[0],
        alpha=method.alpha,
        seed=seed,
        reset=method.reset,  # type: ignore[arg-type]
        init=method.init,  # type: ignore[arg-type]
        keep_history=True,
        **schedule,
    )


# ------------------------------------------------------------------------------------- a run


def run_key(method: Method, lr: float, seed: int) -> str:
    return f"{method.name}__lr{lr:g}__s{seed}"


class Stop(Exception):
    """Raised by ``--stop-after-steps`` to simulate an interruption (tests)."""


@dataclass
class Context:
    d: Design
    out: Path
    model_cache: dict[str, Any] = field(default_factory=dict)
    steps_done_here: int = 0
    stop_after: int | None = None
    verbose: bool = True

    def data(self) -> dict[str, Any]:
        if not self.model_cache:
            model, tok, pad = load(self.d)
            facts = build_facts(self.d.n_people, self.d.fact_seed)
            enc = [(encode(tok, p), encode(tok, a)) for p, a in facts]
            probe, info = probe_tokens(tok, self.d)
            self.model_cache.update(
                tokenizer=tok, pad=pad, facts=facts, encoded=enc, probe=probe, probe_info=info
            )
            del model
        return self.model_cache

    def fresh_model(self) -> nn.Module:
        """The pretrained model as loaded from its cache (tiny: rebuilt from seed 0)."""
        self.data()
        return load(self.d)[0]


def train_run(ctx: Context, method: Method, lr: float, seed: int, phase: str) -> dict[str, Any]:
    """Train one (method, lr, seed) to the end, resuming from its checkpoint if there is one."""
    d, out = ctx.d, ctx.out
    key = run_key(method, lr, seed)
    result_path = out / "runs" / f"{key}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    data = ctx.data()
    ckpt = out / "ckpt" / f"{key}.pt"
    curve_path = out / "curves" / f"{key}.jsonl"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    curve_path.parent.mkdir(parents=True, exist_ok=True)

    model = ctx.fresh_model()
    model.train()
    opt = build_optimizer(model, method, lr, seed, d)
    start, train_seconds, resumed_from = 0, 0.0, None
    if ckpt.exists():
        extra = load_checkpoint(ckpt, model, opt)
        start, train_seconds, resumed_from = int(extra["step"]), float(extra["seconds"]), True
    # keep the curve up to the checkpoint: steps after it are redone
    rows = []
    if curve_path.exists():
        rows = [json.loads(x) for x in curve_path.read_text().splitlines() if x.strip()]
    rows = [r for r in rows if r["step"] <= start]
    curve_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    order = data_order(len(data["encoded"]), d.steps, d.batch_size, seed)
    if ctx.verbose:
        print(
            f"[{datetime.now().strftime('%H:%M:%S')}] {phase} {key}: "
            f"{'resuming at step ' + str(start) if start else 'start'}",
            flush=True,
        )
    chain = isinstance(opt, ChainLoRAOptimizer)
    with curve_path.open("a") as curve:
        bar = tqdm(
            range(start, d.steps), initial=start, total=d.steps, desc=key, unit="step",
            mininterval=30, disable=not ctx.verbose, file=sys.stderr,
        )  # fmt: skip
        for step in bar:
            for group in opt.param_groups:  # linear decay to 0, no warm-up
                group["lr"] = lr * (1 - step / d.steps)
            batch = collate([data["encoded"][i] for i in order[step]], data["pad"])
            t0 = time.perf_counter()
            loss = F.cross_entropy(answer_logits(model, batch), batch.targets)
            loss.backward()
            loss_value = loss.item()
            knots_before = opt.knots_tied if chain else 0
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            knot = chain and opt.knots_tied > knots_before
            train_seconds += t2 - t0
            row = {
                "step": step + 1,
                "loss": loss_value,
                "step_s": round(t2 - t0, 4),
                "opt_step_s": round(t2 - t1, 4),
                "knot": bool(knot),
            }
            curve.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{loss_value:.3f}", knots=opt.knots_tied if chain else 0,
                            refresh=False)  # fmt: skip
            if not math.isfinite(row["loss"]):
                break
            ctx.steps_done_here += 1
            done = step + 1
            if done % d.ckpt_every == 0 and done < d.steps:
                curve.flush()
                save_checkpoint(ckpt, model, opt, step=done, seconds=train_seconds)
            if ctx.stop_after is not None and ctx.steps_done_here >= ctx.stop_after:
                raise Stop(key)

    rows = [json.loads(x) for x in curve_path.read_text().splitlines() if x.strip()]
    t_eval = time.perf_counter()
    metrics = evaluate(model, data["encoded"], data["pad"])
    metrics["probe_loss"] = probe_loss(model, data["probe"])
    eval_seconds = time.perf_counter() - t_eval
    summary: dict[str, Any] = {}
    if chain:
        s = opt.chain_summary()
        s = s.to_dict() if hasattr(s, "to_dict") else s  # the pinned chainopt returns a dict
        ranks = [m["effective_rank"] for m in s["modules"].values()]
        summary = {
            "links": s["links"],
            "ranks": s["ranks"],
            "knot_steps": s["knot_steps"],
            "effective_rank_mean": statistics.fmean(ranks) if None not in ranks else None,
            "effective_rank_min": min(ranks) if None not in ranks else None,
        }
    plain = [r["step_s"] for r in rows if not r["knot"]]
    plain_opt = [r["opt_step_s"] for r in rows if not r["knot"]]
    knot_rows = [r for r in rows if r["knot"]]
    result = {
        "key": key,
        "phase": phase,
        "method": dataclasses.asdict(method),
        "lr": lr,
        "seed": seed,
        "design": d.to_json(),
        "metrics": metrics,
        "final_train_loss": statistics.fmean(r["loss"] for r in rows[-max(1, d.steps // 20) :]),
        "diverged": not all(math.isfinite(r["loss"]) for r in rows),
        "chain": summary,
        "timing": {
            "train_seconds": round(train_seconds, 2),
            "eval_seconds": round(eval_seconds, 2),
            "median_step_s": statistics.median(plain) if plain else None,
            "median_opt_step_s": statistics.median(plain_opt) if plain_opt else None,
            "knot_opt_step_s": [r["opt_step_s"] for r in knot_rows],
            "knot_extra_s": [
                round(r["opt_step_s"] - statistics.median(plain_opt), 4) for r in knot_rows
            ]
            if plain_opt
            else [],
            "resumed": bool(resumed_from),
        },
        "probe": data["probe_info"],
        "git_commit": _git_commit(),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
    }
    _write_json(result_path, result)
    ckpt.unlink(missing_ok=True)
    if ctx.verbose:
        m = metrics
        print(
            f"    done {key}: recall {m['recall']:.3f}, NLL {m['answer_nll']:.3f}, probe "
            f"{m['probe_loss']:.3f}, {train_seconds:.0f}s train "
            f"({result['timing']['median_step_s']} s/step)",
            flush=True,
        )
    return result


# ---------------------------------------------------------------------------------- the plan


def finished(out: Path) -> dict[str, dict[str, Any]]:
    runs = {}
    for p in sorted((out / "runs").glob("*.json")):
        r = json.loads(p.read_text())
        runs[r["key"]] = r
    return runs


def score(r: dict[str, Any]) -> tuple[float, float]:
    """LR selection order: higher recall, then lower answer NLL (diverged runs last)."""
    if r["diverged"] or not math.isfinite(r["metrics"]["answer_nll"]):
        return (-1.0, 0.0)
    return (r["metrics"]["recall"], -r["metrics"]["answer_nll"])


def grid_of(method: Method, d: Design) -> tuple[float, ...]:
    return d.full_lrs if method.kind == "full" else d.lora_lrs


def best_lr(method: Method, runs: dict[str, dict[str, Any]], d: Design) -> float | None:
    """The grid LR with the best seed-0 result, or None until every grid run of seed 0 is done."""
    seed0 = d.seeds[0]
    cands = []
    for lr in grid_of(method, d):
        r = runs.get(run_key(method, lr, seed0))
        if r is None:
            return None
        cands.append((score(r), -lr, lr))
    return max(cands)[2]


def method_runs(method: Method, runs: dict[str, dict[str, Any]], d: Design) -> list[dict]:
    """Finished runs of ``method`` at its selected LR, in seed order."""
    lr = best_lr(method, runs, d)
    if lr is None:
        return []
    return [runs[k] for s in d.seeds if (k := run_key(method, lr, s)) in runs]


def qualification(runs: dict[str, dict[str, Any]], d: Design) -> dict[str, Any]:
    """Which base ranks qualify (LoRA 2r beats LoRA r by > 3 SE of the difference), and r."""
    table: dict[str, Any] = {}
    for r in d.base_ranks:
        lo = method_runs(lora(r, d), runs, d)
        for ref in [lora(k * r, d) for k in (2, 4, 8) if k * r in d.search_ranks] + [full()]:
            hi = method_runs(ref, runs, d)
            if len(lo) < len(d.seeds) or len(hi) < len(d.seeds):
                table[f"{ref.name} vs lora{r}"] = None
                continue
            a = [x["metrics"]["recall"] for x in lo]
            b = [x["metrics"]["recall"] for x in hi]
            sa, sb = mean_ci(a), mean_ci(b)
            se = math.sqrt(sa["se"] ** 2 + sb["se"] ** 2)
            gap = sb["mean"] - sa["mean"]
            table[f"{ref.name} vs lora{r}"] = {
                "gap": gap,
                "se": se,
                "z": gap / se if se > 0 else (math.inf if gap > 0 else 0.0),
                "qualifies": gap > 3 * se,
            }
    # The smallest qualifying r is known as soon as it and every smaller r are decided.
    decided, chosen = True, None
    for r in d.base_ranks:
        entry = table.get(f"lora{2 * r} vs lora{r}")
        if entry is None:
            decided = False
            break
        if entry["qualifies"]:
            chosen = r
            break
    if decided and chosen is None:
        chosen = max(d.base_ranks, key=lambda r: table[f"lora{2 * r} vs lora{r}"]["z"])
    return {"table": table, "decided": decided, "chosen_r": chosen, "qualified": chosen
            is not None and table[f"lora{2 * chosen} vs lora{chosen}"]["qualifies"]}  # fmt: skip


def run_order(r: int, d: Design) -> list[Method]:
    """Once r is chosen: each chain next to the LoRA of its total rank, then the rest of the search.

    LoRA r, COLA 2×r, LoRA 2r, COLA 4×r, LoRA 4r, COLA 8×r, LoRA 8r, the 4-link variants, and
    whatever search method is left (full fine-tuning): a chain's gap closed can be read as soon
    as its row and its reference's are done.
    """
    chains = {m.name: m for m in compare_methods(r, d)}
    search = search_methods(d)
    by_name = {m.name: m for m in search} | chains
    order = [f"lora{r}"]
    for k in (2, 4, 8):
        order += [f"cola{k}x{r}", f"lora{k * r}"]
    order += [m.name for m in chains.values()] + [m.name for m in search]
    seen: dict[str, Method] = {}
    for name in order:
        if name in by_name and name not in seen:
            seen[name] = by_name[name]
    return list(seen.values())


def next_runs(runs: dict[str, dict[str, Any]], d: Design) -> list[tuple[str, Method, float, int]]:
    """What is runnable now, in order: method by method, its grid (seed 0), then its seeds."""
    todo: list[tuple[str, Method, float, int]] = []

    def phase(name: str, methods: list[Method]) -> None:
        for m in methods:
            for lr in grid_of(m, d):
                if run_key(m, lr, d.seeds[0]) not in runs:
                    todo.append((name, m, lr, d.seeds[0]))
            lr = best_lr(m, runs, d)
            if lr is None:
                continue
            for s in d.seeds[1:]:
                if run_key(m, lr, s) not in runs:
                    todo.append((name, m, lr, s))

    q = qualification(runs, d)
    if q["chosen_r"] is None or d.only:
        phase("search", search_methods(d))
        return todo
    search = {m.name for m in search_methods(d)}
    for m in run_order(q["chosen_r"], d):
        phase("search" if m.name in search else "compare", [m])
    return todo


def planned_units(d: Design, full_ratio: float = 2.0) -> dict[str, float]:
    """Runs of the whole plan in LoRA-run units (compare phase at the first r and worst r)."""
    s = len(d.seeds) - 1

    def units(methods: Iterable[Method]) -> float:
        total = 0.0
        for m in methods:
            n = len(grid_of(m, d)) + s
            total += n * (full_ratio if m.kind == "full" else 1.0)
        return total

    return {
        "search": units(search_methods(d)),
        "compare_r1": units(compare_methods(d.base_ranks[0], d)),
        "compare_worst": max(units(compare_methods(r, d)) for r in d.base_ranks),
    }


def measure_step(ctx: Context, method: Method, n: int = 6) -> float:
    """Median seconds of a training step (forward, backward, optimizer) on the real batches."""
    data = ctx.data()
    model = ctx.fresh_model()
    model.train()
    opt = build_optimizer(model, method, 1e-4, 0, ctx.d)
    order = data_order(len(data["encoded"]), n + 1, ctx.d.batch_size, 0)
    times = []
    for step in range(n + 1):
        batch = collate([data["encoded"][i] for i in order[step]], data["pad"])
        t0 = time.perf_counter()
        F.cross_entropy(answer_logits(model, batch), batch.targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def estimate(ctx: Context) -> dict[str, Any]:
    """Time LoRA and full-FT steps and one evaluation here, and the whole plan from that."""
    d = ctx.d
    t_lora = measure_step(ctx, lora(1, d))
    t_full = measure_step(ctx, full())
    data = ctx.data()
    model = ctx.fresh_model()
    t0 = time.perf_counter()
    evaluate(model, data["encoded"], data["pad"])
    probe_loss(model, data["probe"])
    t_eval = time.perf_counter() - t0
    per_unit = d.steps * t_lora + t_eval + 3.0  # + model copy and checkpoints
    u = planned_units(d, t_full / t_lora)
    hours = {k: v * per_unit / 3600 for k, v in u.items()}
    est = {
        "lora_step_s": round(t_lora, 3),
        "full_step_s": round(t_full, 3),
        "full_over_lora": round(t_full / t_lora, 2),
        "eval_s": round(t_eval, 1),
        "run_s": round(per_unit, 0),
        "units": u,
        "hours_search": round(hours["search"], 2),
        "hours_total_r1": round(hours["search"] + hours["compare_r1"], 2),
        "hours_total_worst": round(hours["search"] + hours["compare_worst"], 2),
        "facts": len(data["facts"]),
        "threads": torch.get_num_threads(),
    }
    return est


def _claim(out: Path, key: str) -> Any:
    """An exclusive lock on run ``key`` (held until closed), or None when another driver has it."""
    return claim(out / "ckpt", key)


def drive(
    ctx: Context, max_runs: int | None = None, wait_s: float = 30.0
) -> dict[str, dict[str, Any]]:
    """Run whatever is runnable until nothing is left (or ``max_runs`` runs were finished).

    Several drivers may share one ``--out`` (one per core): each takes the first runnable run no
    other driver holds, and waits while every runnable run is held.
    """
    d = ctx.d
    done_here = 0
    while True:
        runs = finished(ctx.out)
        for r in runs.values():
            if r["design"] != json.loads(json.dumps(d.to_json())):
                raise SystemExit(f"{r['key']} was run with another design; use another --out")
        todo = next_runs(runs, d)
        if not todo or (max_runs is not None and done_here >= max_runs):
            return runs
        for phase, method, lr, seed in todo:
            handle = _claim(ctx.out, run_key(method, lr, seed))
            if handle is None:
                continue
            with handle:
                if not (ctx.out / "runs" / f"{run_key(method, lr, seed)}.json").exists():
                    train_run(ctx, method, lr, seed, phase)
                    done_here += 1
            break
        else:
            time.sleep(wait_s)


def base_metrics(ctx: Context) -> dict[str, Any]:
    """Zero-shot recall / NLL / probe loss of the untouched model (once, cached in base.json)."""
    path = ctx.out / "base.json"
    if path.exists():
        return json.loads(path.read_text())
    data = ctx.data()
    model = ctx.fresh_model()
    m = evaluate(model, data["encoded"], data["pad"])
    m["probe_loss"] = probe_loss(model, data["probe"])
    lengths = [(len(p), len(a)) for p, a in data["encoded"]]
    payload = {
        "design": ctx.d.to_json(),
        "metrics": m,
        "chance_recall": chance_recall(),
        "n_facts": len(data["facts"]),
        "mean_prompt_tokens": statistics.fmean(p for p, _ in lengths),
        "mean_answer_tokens": statistics.fmean(a for _, a in lengths),
        "examples": [list(f) for f in data["facts"][:8]],
        "probe": data["probe_info"],
    }
    _write_json(path, payload)
    return payload


def with_overrides(d: Design, pairs: Sequence[str]) -> Design:
    """``d`` with ``KEY=VALUE`` fields replaced (tuples as comma-separated values)."""
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        current = getattr(d, key)
        if isinstance(current, tuple):
            kind = type(current[0]) if current else str
            changes[key] = tuple(kind(v) for v in value.split(",") if v)
        else:
            changes[key] = type(current)(value)
    return dataclasses.replace(d, **changes)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random Llama, tiny task (a test)")
    p.add_argument("--out", type=Path, default=None, help=f"results folder ({DEFAULT_OUT})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--estimate-only", action="store_true", help="print the budget and stop")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    p.add_argument("--stop-after-steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override design fields (pilots): n_people=80 only=lora1,full",
    )
    p.add_argument(
        "--extra",
        nargs="*",
        default=[],
        metavar="METHOD@LR",
        help="supplementary runs after the plan, outside its analysis: METHOD at LR on every "
        "seed (cola4x2@0.003)",
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = with_overrides(TINY if args.tiny else Design(), args.set)
    extras = []
    for spec in args.extra:
        name, _, lr = spec.partition("@")
        try:
            extras.append((method_by_name(name, d), float(lr)))
        except (KeyError, ValueError):
            p.error(f"--extra wants METHOD@LR with a method of the design, got {spec!r}")
    out = args.out or DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("ckpt/\n")
    ctx = Context(d, out, stop_after=args.stop_after_steps, verbose=not args.quiet)
    est_path = out / "estimate.json"
    if est_path.exists() and not args.estimate_only:
        est = json.loads(est_path.read_text())
    else:
        est = estimate(ctx)
        _write_json(est_path, est)
    if not args.quiet:
        print("estimated compute (one core):", json.dumps(est, indent=1), flush=True)
    if args.estimate_only:
        return
    base_metrics(ctx)
    try:
        runs = drive(ctx, args.max_runs)
    except Stop as stop:
        print(f"stopped inside {stop} (--stop-after-steps)", flush=True)
        return
    for method, lr in extras:  # claimed like the plan's runs: several drivers may share them
        for seed in d.seeds:
            handle = _claim(ctx.out, run_key(method, lr, seed))
            if handle is None:
                continue
            with handle:
                if not (ctx.out / "runs" / f"{run_key(method, lr, seed)}.json").exists():
                    train_run(ctx, method, lr, seed, "extra")
        runs = finished(ctx.out)
    q = qualification(runs, d)
    _write_json(out / "qualification.json", q)
    if not args.quiet:
        print(f"{len(runs)} runs finished; qualification: {json.dumps(q, indent=1)}", flush=True)


if __name__ == "__main__":
    main()
