"""The plan: LR selection, which base rank qualifies, what runs next, the budget, the driver.

Two phases: **search** (LoRA at ranks 1, 2, 4, 8 and full fine-tuning, each at its best LR of a
grid on seed 0, then more seeds at that LR), then **compare** the chains at the chosen base rank
r against the LoRA references. Several drivers may share one results folder.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterable
from typing import Any

import torch
from _runs import claim, finished, mean_ci, write_json_atomic
from torch.nn import functional as F

from .design import Design, Method, compare_methods, full, lora, search_methods
from .facts import chance_recall, collate, data_order
from .train import Context, answer_logits, build_optimizer, evaluate, probe_loss, run_key, train_run

__all__ = [
    "base_metrics",
    "best_lr",
    "drive",
    "estimate",
    "grid_of",
    "method_runs",
    "next_runs",
    "planned_units",
    "qualification",
    "run_order",
    "score",
]


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
            handle = claim(ctx.out / "ckpt", run_key(method, lr, seed))
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
    write_json_atomic(path, payload)
    return payload
