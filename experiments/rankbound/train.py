"""One training run: the model, its optimizer, the step loop with checkpoints, the evaluation.

A run checkpoints with :func:`chainopt.save_checkpoint` every ``ckpt_every`` steps, appends its
per-step losses to ``curves/<run>.jsonl`` and writes ``runs/<run>.json`` when done; started again,
it resumes from its checkpoint (bitwise the same result on the same machine).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from _runs import REPO_ROOT, run_stamp, write_json_atomic
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from chainopt import ChainLoRAOptimizer, load_checkpoint, save_checkpoint

from .design import TARGETS, Design, Method
from .facts import Batch, ByteTokenizer, build_facts, collate, data_order, encode, probe_tokens

__all__ = [
    "Context",
    "Stop",
    "adapted_linears",
    "answer_logits",
    "build_optimizer",
    "evaluate",
    "load",
    "probe_loss",
    "run_key",
    "train_run",
]


def _load_smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct through the examples' loader (``examples/chainopt_examples``)."""
    examples = str(REPO_ROOT / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    from chainopt_examples.models import load_smollm2  # type: ignore[import-not-found]

    return load_smollm2()  # type: ignore[no-any-return]


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
    model, tokenizer = _load_smollm2()
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
        s = opt.chain_summary().to_dict()
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
        **run_stamp(),
    }
    write_json_atomic(result_path, result)
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
