"""QLoRA chains on real weights: SmolLM2-135M in NF4, LoRA vs COLA vs COLA with in-place knots.

SmolLM2-135M-Instruct (real weights, ``chainopt_examples.models.load_smollm2``) has every Linear
of its decoder quantized to bitsandbytes NF4 (blocks of 64, double quantization, float32
compute), as ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))``
builds it on a GPU, then learns BBC News topics (the prompt-classification task of
``examples/llama_classify.py``, whose data and evaluation helpers this reuses) three ways, from
the same 4-bit weights on the same batches for the same steps:

- ``lora``: one link (QLoRA);
- ``cola_host``: a chain of ``--links`` links, knots exact (chainopt's default host master: the
  4-bit weight is ``quantize(M₀ + Σ sᵢ·Bᵢ·Aᵢ)``, rounded once);
- ``cola_inplace``: the same chain with ``quantized_master="none"``: every knot dequantizes, adds
  the link and requantizes (ReLoRA's merge), so what rounding drops is lost.

Each run reports the test accuracy of the model as trained (the last link still in its factors)
and after ``merge_and_unload()`` into 4-bit (what a 4-bit deployment serves), the loss curve, and
per knot the share of each link's update the 4-bit weights kept and the update's size in
quantization steps. Runs are checkpointed (``chainopt.save_checkpoint``) every ``--ckpt-every``
steps and written to ``runs/<method>_s<seed>.json`` when done: stop the script at any time and
start it again with the same flags to continue::

    nice -n 10 python experiments/qlora_smollm2.py           # experiments/results/qlora_smollm2/
    python experiments/qlora_smollm2.py --tiny --out /tmp/q  # a random tiny Llama, seconds
    python experiments/qlora_smollm2.py --estimate           # time a few steps, print the plan

The test split is the same for every seed; a seed changes the batch order and the links' draws.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _runs import REPO_ROOT, mean_std, run_metadata, write_json
from chainopt_examples.classify import PromptData
from qlora_knots import quant_step

import chainopt
from chainopt import ChainLoRAOptimizer
from chainopt._quant_backends import backend_for as quantized_backend

METHODS = {
    "lora": ("LoRA (QLoRA)", "host"),
    "cola_host": ("COLA, exact knots (host master)", "host"),
    "cola_inplace": ("COLA, in-place requantization", "none"),
}
TARGETS = ["q_proj", "v_proj"]


def quantize_decoder(model: nn.Module, quant_type: str = "nf4", double: bool = True) -> dict:
    """Replace every ``nn.Linear`` under ``model.model.layers`` by a CPU bnb ``Linear4bit``.

    Returns the quantization step (:func:`qlora_knots.quant_step`) of each replaced layer.
    """
    import bitsandbytes as bnb

    steps = {}
    for name, module in list(model.named_modules()):
        if not (type(module) is nn.Linear and name.startswith("model.layers.")):
            continue
        q = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=torch.float32,
            quant_type=quant_type,
            compress_statistics=double,
        )
        w = module.weight.detach().float()
        q.weight = bnb.nn.Params4bit(
            w.clone(), requires_grad=False, quant_type=quant_type, compress_statistics=double
        )
        if module.bias is not None:
            q.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        steps[name] = quant_step(w, quant_type)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to("cpu"))
    return steps


def load(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """The float model and its tokenizer."""
    if args.tiny:
        from chainopt_examples.models import load_tokenizer, tiny_llama

        tokenizer = load_tokenizer("smollm2")
        return tiny_llama(tokenizer, hidden_size=128, intermediate_size=256), tokenizer
    from chainopt_examples.models import load_smollm2

    return load_smollm2()


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(1000 * seed + epoch)
    return torch.randperm(n, generator=gen).tolist()


class KnotProbe:
    """Around every knot: how much of each link's update the 4-bit weights kept."""

    def __init__(self, steps: dict[str, float]) -> None:
        self.steps = steps
        self.knots: list[dict[str, float]] = []

    @contextmanager
    def __call__(self, chain: Any) -> Iterator[None]:
        before = {}
        for r in chain.records:
            if r.quant is not None:
                delta = r.link.delta().detach().double()
                before[r.name] = (r.quant.backend.dequantize(r.module).double(), delta)
        yield
        kept, sizes = [], []
        for r in chain.records:
            if r.name not in before:
                continue
            old, delta = before[r.name]
            applied = r.quant.backend.dequantize(r.module).double() - old
            d2 = delta.pow(2).sum().item()
            if d2 > 0:
                kept.append((applied * delta).sum().item() / d2)
                sizes.append(delta.pow(2).mean().sqrt().item() / self.steps[r.name])
        self.knots.append(
            {
                "retained_mean": sum(kept) / len(kept),
                "retained_min": min(kept),
                "update_rms_steps_mean": sum(sizes) / len(sizes),
                "update_rms_steps_max": max(sizes),
            }
        )


def resume(path: Path, model: nn.Module, opt: ChainLoRAOptimizer) -> dict[str, Any]:
    """``chainopt.load_checkpoint``, or, where it refuses the quantization state of the 4-bit
    layers the chain does not adapt (chainopt 0.1.0: their ``….weight.absmax`` etc. are
    "unexpected"), the same load without those entries: those layers never change, and the base
    is rebuilt bit for bit (quantization is deterministic)."""
    try:
        return chainopt.load_checkpoint(path, model, opt)
    except RuntimeError as err:
        if "Unexpected key" not in str(err):
            raise
    saved = torch.load(path, map_location="cpu", weights_only=True)
    adapted = {r.name for r in opt.chain.records}
    frozen = [n for n, m in model.named_modules() if quantized_backend(m) and n not in adapted]
    state = {
        k: v for k, v in saved["model"].items() if not k.startswith(tuple(f"{n}." for n in frozen))
    }
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys[:3]
    assert all(k.startswith(tuple(f"{n}." for n in frozen)) for k in result.missing_keys)
    opt.load_state_dict(saved["optimizer"])
    return dict(saved["extra"])


def dense_accuracy(
    model: nn.Module, tokenizer: Any, data: PromptData, args: argparse.Namespace
) -> float:
    """Test accuracy of the float model the chain stands for: every adapted layer from
    ``chainopt.merged_state_dict`` (its master plus the pending link: with the host master the
    exact ``deq(W₀) + Σ sᵢ·Bᵢ·Aᵢ``; in place, the requantized weight plus the pending link), every
    other 4-bit layer dequantized."""
    dense, _ = load(args)
    merged = chainopt.merged_state_dict(model)
    state = {}
    for name, module in model.named_modules():
        backend = quantized_backend(module)
        if backend is not None:
            key = f"{name}.weight"
            weight = merged[key]
            state[key] = weight if weight.is_floating_point() else backend.dequantize(module)
    dense.load_state_dict(state, strict=False)
    dense.eval()
    return data.accuracy(dense, tokenizer)


def build(base: nn.Module, method: str, total: int, args: argparse.Namespace, seed: int):
    model = copy.deepcopy(base)
    links = 1 if method == "lora" else args.links
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", chainopt.ChainLoRAWarning)  # "none" warns, as it should
        opt = ChainLoRAOptimizer(
            model,
            torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0),
            target_modules=args.targets,
            rank=args.rank,
            alpha=args.alpha,
            num_links=links,
            total_steps=total,
            seed=seed,
            quantized_master=METHODS[method][1],
        )
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=total)
    return model, opt, sched


def train_run(
    base: nn.Module,
    tokenizer: Any,
    data: PromptData,
    steps_of: dict[str, float],
    method: str,
    seed: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    key = f"{method}_s{seed}"
    ckpt = args.out / "checkpoints" / f"{key}.pt"
    per_epoch = len(data.batches)
    total = args.epochs * per_epoch
    model, opt, sched = build(base, method, total, args, seed)
    probe = KnotProbe(steps_of)
    try:
        opt.register_knot_context(probe)
    except TypeError:  # chainopt 0.1.0: Chain.contexts is a plain dict, no RemovableHandle
        opt.chain.contexts[id(probe)] = probe
    state: dict[str, Any] = {"step": 0, "losses": [], "seconds": 0.0, "knots": []}
    if ckpt.exists():
        extra = resume(ckpt, model, opt)
        sched.load_state_dict(extra["sched"])
        state = json.loads(extra["state"])
        probe.knots = state["knots"]
        print(f"{key}: resumed at step {state['step']} of {total}", flush=True)
    model.train()
    bar = tqdm(total=total, initial=state["step"], desc=key, unit="step", mininterval=10,
               file=sys.stderr, leave=False)  # fmt: skip
    while state["step"] < total:
        tick = time.perf_counter()
        step = state["step"]
        epoch, i = divmod(step, per_epoch)
        batch = data.batches[epoch_order(per_epoch, seed, epoch)[i]]
        loss = model(**data.inputs(batch)).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        state["losses"].append(loss.item())
        state["step"] += 1
        state["seconds"] += time.perf_counter() - tick
        state["knots"] = probe.knots
        done = state["step"]
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", knots=opt.knots_tied, refresh=False)
        if done % args.log_every == 0 or done == total:
            print(
                f"{key}: step {done}/{total} loss {loss.item():.3f} knots {opt.knots_tied} "
                f"({state['seconds'] / done:.1f} s/step)",
                flush=True,
            )
        if done % args.ckpt_every == 0 and done < total:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            chainopt.save_checkpoint(
                ckpt, model, opt, sched=sched.state_dict(), state=json.dumps(state)
            )
            if args.stop_after and done >= args.stop_after:
                raise SystemExit(f"{key}: stopped after step {done} (--stop-after)")
    bar.close()
    model.eval()
    tick = time.perf_counter()
    accuracy = data.accuracy(model, tokenizer)
    summary = opt.chain_summary()
    dense = dense_accuracy(model, tokenizer, data, args)
    opt.merge_and_unload()  # into the 4-bit weights: requantized from the master, or in place
    merged = data.accuracy(model, tokenizer)
    run = {
        "key": key,
        "method": method,
        "label": METHODS[method][0],
        "seed": seed,
        "accuracy": accuracy,
        "accuracy_merged_4bit": merged,
        "accuracy_dense": dense,
        "knot_steps": list(summary.knot_steps),
        "knots": probe.knots,
        "losses": state["losses"],
        "train_seconds": state["seconds"],
        "eval_seconds": time.perf_counter() - tick,
    }
    write_json(args.out / "runs" / f"{key}.json", run)
    if ckpt.exists():
        ckpt.unlink()
    return run


def report(args: argparse.Namespace, runs: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    rows = []
    for method in args.methods:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        acc, acc_sd = mean_std(r["accuracy"] for r in rs)
        mer, mer_sd = mean_std(r["accuracy_merged_4bit"] for r in rs)
        den, den_sd = mean_std(r["accuracy_dense"] for r in rs)
        knots = [k for r in rs for k in r["knots"]]
        kept = sum(k["retained_mean"] for k in knots) / len(knots) if knots else None
        size = sum(k["update_rms_steps_mean"] for k in knots) / len(knots) if knots else None
        tail = [sum(r["losses"][-args.tail :]) / len(r["losses"][-args.tail :]) for r in rs]
        rows.append(
            {
                "method": method,
                "label": METHODS[method][0],
                "seeds": [r["seed"] for r in rs],
                "accuracy": acc,
                "accuracy_std": acc_sd,
                "accuracy_each": [r["accuracy"] for r in rs],
                "accuracy_merged_4bit": mer,
                "accuracy_merged_4bit_std": mer_sd,
                "accuracy_merged_4bit_each": [r["accuracy_merged_4bit"] for r in rs],
                "accuracy_dense": den,
                "accuracy_dense_std": den_sd,
                "accuracy_dense_each": [r["accuracy_dense"] for r in rs],
                "final_loss": sum(tail) / len(tail),
                "knot_update_retained": kept,
                "knot_update_rms_steps": size,
                "seconds_per_step": sum(r["train_seconds"] for r in rs)
                / sum(len(r["losses"]) for r in rs),
            }
        )
    write_json(args.out / "results.json", {**meta, "methods": rows})
    lines = [
        f"{meta['model']} with every decoder Linear in NF4 (bnb, blocks of 64, double quant), "
        f"{meta['task']}: {meta['n_train']} train / {meta['n_test']} test, {meta['steps']} steps "
        f"(batch {args.batch_size}), rank {args.rank}, alpha {args.alpha:g}, lr {args.lr:g}, "
        f"targets {', '.join(args.targets)}; COLA {args.links} links. Zero-shot: "
        f"{meta['zero_shot_float']:.1%} (float), {meta['zero_shot_4bit']:.1%} (NF4). "
        "Mean ± std over seeds (each seed's value in brackets).",
        "",
        "| method | seeds | accuracy as trained | after merge into 4-bit | dense (master + link) "
        f"| loss, last {args.tail} steps | link update kept by a knot "
        "| link update RMS (quant. steps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        each = ", ".join(f"{a:.1%}" for a in r["accuracy_each"])
        each_m = ", ".join(f"{a:.1%}" for a in r["accuracy_merged_4bit_each"])
        each_d = ", ".join(f"{a:.1%}" for a in r["accuracy_dense_each"])
        kept = "—" if r["knot_update_retained"] is None else f"{r['knot_update_retained']:.1%}"
        size = "—" if r["knot_update_rms_steps"] is None else f"{r['knot_update_rms_steps']:.3f}"
        lines.append(
            f"| {r['label']} | {len(r['seeds'])} | {r['accuracy']:.1%} ± {r['accuracy_std']:.1%} "
            f"({each}) | {r['accuracy_merged_4bit']:.1%} ± {r['accuracy_merged_4bit_std']:.1%} "
            f"({each_m}) | {r['accuracy_dense']:.1%} ± {r['accuracy_dense_std']:.1%} ({each_d}) "
            f"| {r['final_loss']:.3f} | {kept} | {size} |"
        )
    text = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(text)
    print(text)
    plot(runs, args.out / "loss.png", args)


def plot(runs: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"lora": "tab:blue", "cola_host": "tab:green", "cola_inplace": "tab:red"}
    for r in runs:
        losses = torch.tensor(r["losses"])
        w = min(args.smooth, len(losses))
        smooth = losses.unfold(0, w, 1).mean(1) if w > 1 else losses
        ax.plot(
            range(w, len(losses) + 1),
            smooth.tolist(),
            color=colors[r["method"]],
            alpha=0.8,
            label=f"{r['label']}" if r["seed"] == min(x["seed"] for x in runs) else None,
        )
        for k in r["knot_steps"]:
            ax.axvline(k, color=colors[r["method"]], ls=":", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {args.smooth})")
    ax.set_title("SmolLM2-135M, NF4 decoder: knots (dotted)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="bbc_news")
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--links", type=int, default=3)
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--ckpt-every", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=4)
    parser.add_argument("--tail", type=int, default=8, help="steps averaged for the final loss")
    parser.add_argument("--smooth", type=int, default=4, help="loss curve moving average")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama, seconds")
    parser.add_argument("--estimate", action="store_true", help="time a few steps and stop")
    parser.add_argument("--stop-after", type=int, default=0, help="exit at the first checkpoint "
                        "from this step on (to try resuming)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "experiments/results/qlora_smollm2")
    args = parser.parse_args(argv)
    if args.tiny:
        args.n_train, args.n_test, args.epochs, args.batch_size = 16, 16, 2, 4
        args.max_length, args.links, args.ckpt_every = args.max_length or 48, 2, 3
        args.log_every = 2
    torch.set_num_threads(args.threads)
    started = time.time()
    args.out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load(args)
    data = PromptData.load(
        args.task,
        tokenizer,
        n_train=args.n_train,
        n_test=args.n_test,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=0,
    )
    total = args.epochs * len(data.batches)
    info_path = args.out / "zero_shot.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    if "zero_shot_float" not in info and not args.estimate:
        info["zero_shot_float"] = data.accuracy(model, tokenizer)
    steps_of = quantize_decoder(model)  # every decoder Linear: NF4
    if "zero_shot_4bit" not in info and not args.estimate:
        info["zero_shot_4bit"] = data.accuracy(model, tokenizer)
        write_json(info_path, info)
    n_quant = len(steps_of)
    print(
        f"{n_quant} decoder Linears in NF4; {data.n_train} train / {len(data.test)} test, "
        f"{total} steps per run; zero-shot float {info.get('zero_shot_float', float('nan')):.1%}, "
        f"NF4 {info.get('zero_shot_4bit', float('nan')):.1%}",
        flush=True,
    )

    if args.estimate:
        m, opt, _ = build(model, "cola_host", total, args, 0)
        times = []
        for batch in data.batches[:3]:
            tick = time.perf_counter()
            m(**data.inputs(batch)).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - tick)
        tick = time.perf_counter()
        opt.tie_knot()
        knot = time.perf_counter() - tick
        m.eval()
        tick = time.perf_counter()
        sub = PromptData(data.task, data.batches, data.test.select(range(16)), 16, data.max_length)
        sub.accuracy(m, tokenizer)
        per_example = (time.perf_counter() - tick) / 16
        step = min(times[1:])
        runs = len(args.methods) * len(args.seeds)
        todo = runs * (total * step + 2 * len(data.test) * per_example)
        print(
            f"one step {step:.1f} s (first {times[0]:.1f} s), a knot {knot:.2f} s, eval "
            f"{per_example:.2f} s/example; {runs} runs x ({total} steps + 2 evals of "
            f"{len(data.test)}) = about {todo / 60:.0f} min",
            flush=True,
        )
        return

    meta = {
        "model": "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct",
        "task": args.task,
        "n_train": data.n_train,
        "n_test": len(data.test),
        "steps": total,
        **info,
    }
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            path = args.out / "runs" / f"{method}_s{seed}.json"
            if path.exists():
                done = json.loads(path.read_text())
                if "accuracy_dense" in done:  # runs from before that metric are run again
                    runs.append(done)
                    continue
            run = train_run(model, tokenizer, data, steps_of, method, seed, args)
            print(
                f"{run['key']}: accuracy {run['accuracy']:.1%}, merged into 4-bit "
                f"{run['accuracy_merged_4bit']:.1%}",
                flush=True,
            )
            runs.append(run)
            report(args, runs, {**meta, "meta": run_metadata(args, started)})
    report(args, runs, {**meta, "meta": run_metadata(args, started)})


if __name__ == "__main__":
    main()
