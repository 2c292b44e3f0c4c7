"""The PEFT user's paths of docs/reliability.md's seventh pass, measured on tiny models.

Each path trains a chained ``PeftModel`` (5 steps, a knot every 2) and prints how far the
chain's own save, loaded onto the original base with ``PeftModel.from_pretrained``, is from the
trained logits (and PEFT's ``merge_and_unload()`` for the ``LoraConfig`` options), or the
refusal, on lines starting with ``| ``. Run from the repository root:
``HF_HUB_OFFLINE=1 python scripts/probe_peft_paths.py``.
"""

from __future__ import annotations

import copy
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

# this checkout's chainopt and tests/models.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import tiny_llama, tiny_opt
from peft import LoraConfig, PeftModel, get_peft_model

from chainopt import ChainLoRAOptimizer

IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4], [8, 6, 2, 14, 3, 9, 1, 5]])
BASE: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def chain(model: nn.Module) -> ChainLoRAOptimizer:
    return ChainLoRAOptimizer(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), knot_every=2, seed=1
    )


def train(model: nn.Module, opt: ChainLoRAOptimizer, steps: int = 5) -> None:
    model.train()
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def saved_gap(model: Any, build: Callable[[], nn.Module] = tiny_llama, **kwargs: Any) -> float:
    out = tempfile.mkdtemp()
    model.save_pretrained(out, **kwargs)
    reloaded = PeftModel.from_pretrained(build(), out)
    return float((logits(reloaded) - logits(model)).abs().max())


def path(name: str, run: Callable[[], str]) -> None:
    try:
        print(f"| {name}: {run()}")
    except (ValueError, RuntimeError) as err:
        print(f"| {name}: refused: {str(err)[:160]}")


def continued() -> None:
    start = get_peft_model(tiny_llama(), LoraConfig(**BASE))
    with torch.no_grad():
        for n, p in start.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    first, second = tempfile.mkdtemp(), tempfile.mkdtemp()
    start.save_pretrained(first)

    def trainable() -> str:
        model = PeftModel.from_pretrained(tiny_llama(), first, is_trainable=True)
        opt = chain(model)
        train(model, opt)
        model.save_pretrained(second)
        return f"save {saved_gap(model):.1e}"

    def again() -> str:
        model = PeftModel.from_pretrained(tiny_llama(), second, is_trainable=True)
        opt = chain(model)
        train(model, opt)
        return f"rank {model.peft_config['default'].r}, save {saved_gap(model):.1e}"

    path("continue with is_trainable=True", trainable)
    path("continue the chain's own save", again)
    path("continue with is_trainable=False",
         lambda: str(chain(PeftModel.from_pretrained(tiny_llama(), first))))  # fmt: skip


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def continued_conv1d() -> None:
    """GPT-2's Conv1D layers (fan_in_fan_out): a saved adapter continued, twice."""
    extras: list[dict[str, Any]] = [{}, {"use_dora": True}, {"modules_to_save": ["lm_head"]}]
    for extra in extras:

        def run(extra: dict[str, Any] = extra) -> str:
            config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                fan_in_fan_out=True, **extra)  # fmt: skip
            start = get_peft_model(gpt2(), config)
            with torch.no_grad():
                for n, p in start.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.3)
            where = tempfile.mkdtemp()
            start.save_pretrained(where)
            gaps = []
            for _ in range(2):  # the adapter, then the chain's own save of it
                model = PeftModel.from_pretrained(gpt2(), where, is_trainable=True)
                train(model, chain(model))
                where = tempfile.mkdtemp()
                model.save_pretrained(where)
                reloaded = PeftModel.from_pretrained(gpt2(), where)
                gaps.append(float((logits(reloaded) - logits(model)).abs().max()))
            return f"saves {gaps[0]:.1e}, then {gaps[1]:.1e}"

        path(f"GPT-2 Conv1D continued {extra or ''}", run)


def options() -> None:
    cases: list[tuple[str, Callable[[], nn.Module], dict[str, Any]]] = [
        ("modules_to_save", tiny_llama, {**BASE, "modules_to_save": ["lm_head"]}),
        ("trainable_token_indices", tiny_llama,
         {**BASE, "trainable_token_indices": {"embed_tokens": [1, 5, 9]}}),
        ("gaussian init", tiny_llama, {**BASE, "init_lora_weights": "gaussian"}),
        ("init False", tiny_llama, {**BASE, "init_lora_weights": False}),
        ("all-linear", tiny_llama, {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
        ("layers_to_transform", tiny_llama,
         {**BASE, "layers_to_transform": [1], "layers_pattern": "layers"}),
        ("patterns", tiny_llama,
         {**BASE, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}}),
        ("exclude_modules", tiny_llama,
         {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "exclude_modules": ["o_proj"]}),
        ("rslora", tiny_llama, {**BASE, "use_rslora": True}),
        ("dropout 0.5", tiny_llama, {**BASE, "lora_dropout": 0.5}),
        ("bias='all' (OPT)", tiny_opt, {**BASE, "bias": "all"}),
        ("bias='lora_only' (OPT)", tiny_opt, {**BASE, "bias": "lora_only"}),
    ]  # fmt: skip
    for name, build, config in cases:

        def run(build: Callable[[], nn.Module] = build, config: dict[str, Any] = config) -> str:
            model = get_peft_model(build(), LoraConfig(**config))
            peft_trains = {n for n, p in model.named_parameters() if p.requires_grad}
            opt = chain(model)
            chain_trains = {n for n, p in model.named_parameters() if p.requires_grad}
            frozen, unfrozen = peft_trains - chain_trains, chain_trains - peft_trains
            train(model, opt)
            merged = copy.deepcopy(model).merge_and_unload()
            gap = float((logits(merged) - logits(model)).abs().max())
            return (
                f"knots {opt.knots_tied}, save {saved_gap(model, build):.1e}, merged {gap:.1e}, "
                f"tensors PEFT trains that the chain froze: {len(frozen)}, that PEFT froze and "
                f"the chain trains: {len(unfrozen)}"
            )

        path(name, run)


def adapters() -> None:
    def two() -> Any:
        model = get_peft_model(tiny_llama(), LoraConfig(**BASE))
        model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
        return model

    def saves() -> str:
        model = two()
        train(model, chain(model))
        kwargs: list[dict[str, Any]] = [
            {}, {"selected_adapters": ["default"]}, {"safe_serialization": False},
            {"save_embedding_layers": True},
        ]  # fmt: skip
        return ", ".join(f"{k or 'plain'} {saved_gap(model, **k):.1e}" for k in kwargs)

    def around_eval() -> str:
        model = two()
        opt = chain(model)
        for _ in range(3):
            train(model, opt, 1)
            with model.disable_adapter():
                logits(model)
            model.merge_adapter()
            logits(model)
            model.unmerge_adapter()
            model.set_adapter("other")
            logits(model)
            model.set_adapter("default")
        return f"knots {opt.knots_tied}, save {saved_gap(model):.1e}"

    def weighted() -> str:
        model = two()
        opt = chain(model)
        train(model, opt)
        model.add_weighted_adapter(["default"], [1.0], "comb", combination_type="cat")
        trained = logits(model)
        out = tempfile.mkdtemp()
        model.save_pretrained(out, selected_adapters=["comb"])
        reloaded = PeftModel.from_pretrained(tiny_llama(), f"{out}/comb")
        return f"combination saved: {float((logits(reloaded) - trained).abs().max()):.2f} away"

    def step_under_other() -> str:
        model = two()
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt = ChainLoRAOptimizer(model, adamw, knot_every=4, seed=1)
        train(model, opt, 2)  # mid-link: step 3 is no knot, nor the link's first step
        model.set_adapter("other")
        factors = [f.detach().clone() for f in opt.factors()]
        train(model, opt, 1)
        moved = any(not torch.equal(f, g) for f, g in zip(opt.factors(), factors, strict=True))
        return f"steps counted {opt.optimizer_steps}, the chain moved under other: {moved}"

    def by_hand() -> str:
        """PEFT's get_peft_model_state_dict taken by hand, and chainopt's whole-chain one, each
        loaded with set_peft_model_state_dict onto the original base."""
        from peft import set_peft_model_state_dict
        from peft.utils import get_peft_model_state_dict

        from chainopt import peft_adapter_state_dict

        model = get_peft_model(tiny_llama(), LoraConfig(**BASE))
        opt = chain(model)
        train(model, opt)
        trained = logits(model)
        whole, config = peft_adapter_state_dict(opt)
        gaps = []
        for state, r, alpha in ((get_peft_model_state_dict(model), 4, 8),
                                (whole, config["r"], config["lora_alpha"])):  # fmt: skip
            served = get_peft_model(
                tiny_llama(), LoraConfig(**{**BASE, "r": r, "lora_alpha": alpha})
            )
            set_peft_model_state_dict(served, state)
            gaps.append(float((logits(served) - trained).abs().max()))
        return (f"knots {opt.knots_tied}: get_peft_model_state_dict {gaps[0]:.2f} away, "
                f"peft_adapter_state_dict {gaps[1]:.1e}")  # fmt: skip

    path("two adapters, save kwargs", saves)
    path("a state dict taken by hand", by_hand)
    path("a step with another adapter active", step_under_other)
    path("disable/merge/set_adapter around evaluation", around_eval)
    path("add_weighted_adapter after a knot", weighted)


def layers() -> None:
    """docs/reliability.md's thirteenth pass: tied and embedding layers, the modules a chain keeps
    trainable, and the model inside a PeftModel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def tied() -> nn.Module:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, tie_word_embeddings=True)  # fmt: skip
        return LlamaForCausalLM(config).eval()

    def knot_gap(target: str) -> str:
        model = get_peft_model(tied(), LoraConfig(**{**BASE, "target_modules": ["q_proj", target]}))
        opt = chain(model)
        train(model, opt, 1)
        before = logits(model)
        opt.tie_knot()
        return f"the knot moved the logits by {float((logits(model) - before).abs().max()):.2f}"

    def embedding_save(target: str) -> str:
        model = get_peft_model(tiny_llama(), LoraConfig(**{**BASE, "target_modules": [target]}))
        opt = chain(model)
        train(model, opt)
        return f"knots {opt.knots_tied}, save {saved_gap(model):.1e}"

    def kept_trainable() -> str:
        model = get_peft_model(tiny_llama(), LoraConfig(**BASE))
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt = ChainLoRAOptimizer(model, adamw, knot_every=2, seed=1, trainable_modules=["lm_head"])
        train(model, opt)
        return f"knots {opt.knots_tied}, save {saved_gap(model):.2f}"

    def inner() -> str:
        model = get_peft_model(tiny_llama(), LoraConfig(**BASE))
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt = ChainLoRAOptimizer(model.get_base_model(), adamw, knot_every=2, seed=1)
        train(model, opt)
        return f"knots {opt.knots_tied}, the PeftModel's save {saved_gap(model):.2f}"

    for target in ("embed_tokens", "lm_head"):
        path(f"tied {target} targeted", partial(knot_gap, target))
        path(f"{target} targeted, saved", partial(embedding_save, target))
    path("trainable_modules=['lm_head']", kept_trainable)
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        path("the model inside a PeftModel chained", inner)
    names = {type(w.message).__name__ for w in seen}
    print(f"|   warned: {'ChainLoRAWarning' in names}")


def runtime() -> None:
    def checkpointing() -> str:
        model = get_peft_model(tiny_llama(), LoraConfig(**BASE))
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
        train(model, chain(model))
        return f"save {saved_gap(model):.1e}"

    def compiled() -> str:
        model = get_peft_model(tiny_llama(), LoraConfig(**BASE, lora_dropout=0.1))
        opt = chain(model)
        train(torch.compile(model, backend="eager"), opt)
        fast = logits(torch.compile(model, backend="eager"))
        gap = float((fast - logits(model)).abs().max())
        return f"compiled vs eager {gap:.1e}, save {saved_gap(model):.1e}"

    def counts() -> str:
        model = get_peft_model(tiny_llama(), LoraConfig(**BASE))
        before = model.get_nb_trainable_parameters()
        train(model, chain(model))
        return f"trainable, all: {before} before, {model.get_nb_trainable_parameters()} after"

    path("gradient checkpointing", checkpointing)
    path("torch.compile", compiled)
    path("parameter counts", counts)


def trainers() -> None:
    from test_integrations import _args, _Tokens
    from transformers import Trainer

    from chainopt.integrations.transformers import ChainLoRACallback

    def best_at_end() -> str:
        out = Path(tempfile.mkdtemp())
        model = get_peft_model(tiny_llama(), LoraConfig(**BASE))
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-2)
        opt = ChainLoRAOptimizer(model, adamw, knot_every=3)
        trainer: Any = None

        def metric(_: Any) -> dict[str, float]:  # checkpoint-4 is the best (knots at 3 and 6)
            return {"first": float(trainer.state.global_step == 4)}

        args = _args(
            out, gradient_accumulation_steps=1, save_steps=2, eval_strategy="steps", eval_steps=2,
            load_best_model_at_end=True, metric_for_best_model="first", greater_is_better=True,
            max_steps=8,
        )  # fmt: skip
        trainer = Trainer(
            model=model, args=args, train_dataset=_Tokens(), eval_dataset=_Tokens(2),
            compute_metrics=metric, optimizers=(opt, None), callbacks=[ChainLoRACallback()],
        )  # fmt: skip
        trainer.train()
        trainer.save_model(str(out / "final"))
        reloaded = PeftModel.from_pretrained(tiny_llama(), out / "final")
        gap = float((logits(reloaded) - logits(model)).abs().max())
        best = Path(trainer.state.best_model_checkpoint).name
        return f"best {best}, steps {opt.optimizer_steps}, knots {opt.knots_tied}, save {gap:.1e}"

    path("Trainer load_best_model_at_end", best_at_end)


if __name__ == "__main__":
    torch.set_num_threads(1)
    continued()
    continued_conv1d()
    options()
    adapters()
    layers()
    runtime()
    trainers()
