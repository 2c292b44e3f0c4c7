"""The optimizers of docs/reliability.md's eleventh pass, each under every reset policy.

Every optimizer the HF ``Trainer`` builds from ``args.optim`` (through
``chainopt.integrations.transformers.create_chain_optimizer``) and a few built by hand
(``torch.optim.Muon``; torchao's low-bit AdamW at a size where it quantizes) trains a tiny
Llama's ``q_proj``/``v_proj`` chain for 5 steps (knots after steps 2 and 4), then round-trips
``opt.state_dict()``. One line per optimizer and policy, starting ``| ``: ``ok`` with the loss
before and after, ``refused`` with the error (an optimizer whose package is not installed is
``missing``). Run from the repository root:
``HF_HUB_OFFLINE=1 python scripts/probe_optimizers.py``.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's chainopt
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from chainopt import ChainLoRAOptimizer
from chainopt.integrations.transformers import create_chain_optimizer

POLICIES = ("full", "none", "moments", "prune")
TRAINER_OPTIMS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_4bit", "adamw_torch_8bit", "adamw_bnb_8bit",
    "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit", "paged_lion_8bit",
    "adafactor", "schedule_free_adamw", "schedule_free_sgd", "rmsprop", "rmsprop_bnb_8bit", "sgd",
    "adagrad", "ademamix", "ademamix_8bit",
)  # fmt: skip


def _model(hidden: int) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4)  # fmt: skip
    return LlamaForCausalLM(config)


def _by_hand() -> dict[str, tuple[int, Callable[[list[nn.Parameter]], Optimizer]]]:
    """name -> (hidden size, factory); torchao quantizes a state of 4,096 elements or more."""
    import torchao.optim as tao

    return {
        "torch.optim.Muon": (256, lambda ps: torch.optim.Muon([p for p in ps if p.ndim == 2])),
        "torchao AdamW8bit": (256, lambda ps: tao.AdamW8bit(ps, lr=1e-3, block_size=32)),
        "torchao AdamW4bit": (256, lambda ps: tao.AdamW4bit(ps, lr=1e-3, block_size=32)),
        "torchao AdamWFp8": (256, lambda ps: tao.AdamWFp8(ps, lr=1e-3, block_size=32)),
    }


def _run(model: nn.Module, opt: ChainLoRAOptimizer) -> tuple[float, float]:
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    train = getattr(opt, "train", None)  # schedule-free optimizers
    if callable(train):
        train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert opt.knots_tied == 2
    opt.load_state_dict(opt.state_dict())
    return losses[0], losses[-1]


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    chains: list[tuple[str, int, Callable[..., ChainLoRAOptimizer]]] = []
    for optim in TRAINER_OPTIMS:
        args = TrainingArguments(output_dir="probe-out", optim=optim, learning_rate=1e-3,
                                 report_to=[], use_cpu=True)  # fmt: skip
        chains.append((f"args.optim={optim}", 256,
                       lambda m, a=args, **kw: create_chain_optimizer(m, a, **kw)))  # fmt: skip
    for name, (hidden, factory) in _by_hand().items():
        chains.append((name, hidden,
                       lambda m, f=factory, **kw: ChainLoRAOptimizer(m, f, **kw)))  # fmt: skip
    for name, hidden, build in chains:
        for reset in POLICIES:
            model = _model(hidden)
            try:
                opt = build(model, target_modules=["q_proj", "v_proj"], rank=16, knot_every=2,
                            reset=reset)  # fmt: skip
                first, last = _run(model, opt)
                print(f"| {name} | {reset} | ok | loss {first:.3f} -> {last:.3f} |", flush=True)
            except ImportError as err:
                print(f"| {name} | {reset} | missing | {err} |", flush=True)
            except Exception as err:  # the row says what raised
                print(f"| {name} | {reset} | refused | {type(err).__name__}: {err} |", flush=True)


if __name__ == "__main__":
    main()
