"""The README's Quickstart as a script: COLA on a tiny Llama in a plain PyTorch loop.

A tiny ``LlamaForCausalLM`` built from ``LlamaConfig`` (random weights, no download) trains on
random token ids for 40 steps. ``ChainLoRAOptimizer`` wraps AdamW, trains rank-8 LoRA links on
``q_proj``/``v_proj`` and ties a knot every 10 steps; a torch LR scheduler drives it as it drives
any optimizer. Runs offline in seconds on a CPU::

    python examples/quickstart.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chainopt import ChainLoRAOptimizer


def main() -> None:
    torch.manual_seed(0)
    # Any model with nn.Linear layers: a tiny Llama here, so this runs anywhere in seconds.
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    )
    loader = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (40, 4, 32))]
    num_steps = len(loader)

    base = torch.optim.AdamW(model.parameters(), lr=5e-4)  # the optimizer you already use
    opt = ChainLoRAOptimizer(
        model, base, target_modules=["q_proj", "v_proj"], rank=8, alpha=16, knot_every=10
    )  # or knots=[15, 30]
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=num_steps)
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch).loss
        loss.backward()
        opt.step()  # ties a knot when the schedule says so
        sched.step()
        opt.zero_grad()
        if step % 10 == 0:
            print(f"step {step}: loss {loss.item():.3f}, knots tied {opt.knots_tied}")
    assert opt.knots_tied == 4
    model = opt.merge_and_unload()  # plain nn.Linear layers, every link merged in
    print(f"{opt.knots_tied} knots tied; the model has plain nn.Linear layers again")


if __name__ == "__main__":
    main()
