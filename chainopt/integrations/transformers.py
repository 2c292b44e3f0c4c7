"""The Hugging Face ``Trainer`` with a chain.

A :class:`~chainopt.ChainLoRAOptimizer` is a ``torch.optim.Optimizer``, so
``Trainer(model, args, optimizers=(opt, scheduler))`` trains with it as it is: the Trainer
wraps it in Accelerate's ``AcceleratedOptimizer``, steps it once per *optimizer* step (with
``gradient_accumulation_steps > 1`` too: knots count optimizer steps, not micro-batches).
``trainer.save_model()`` and every checkpoint's ``model.safetensors`` hold the merged model
(plain keys: stock ``from_pretrained`` loads the fine-tuned model; see
:mod:`chainopt._hf_save`), and a checkpoint's ``optimizer.pt`` the wrapped optimizer's
state plus the chain's counters, generator, history and own tensors (frozen originals, factors,
residuals), so ``resume_from_checkpoint`` continues bitwise. ``optimizers=(opt, None)`` lets the
Trainer build its LR scheduler from ``args`` over the chain's param groups.

This module adds two conveniences:

- :func:`create_chain_optimizer` builds the optimizer the Trainer would build from
  ``TrainingArguments`` (``args.optim``, learning rate, betas, weight decay but not on biases and
  norms) and wraps it in a chain.
- :class:`ChainLoRACallback` checks that the Trainer got the chain, and with
  ``load_best_model_at_end`` brings the chain's state back to the best checkpoint.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
    >>> from chainopt.integrations.transformers import ChainLoRACallback, create_chain_optimizer
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> args = TrainingArguments(output_dir="out", learning_rate=1e-3, weight_decay=0.1,
    ...                          report_to="none", use_cpu=True)  # creates no directory
    >>> opt = create_chain_optimizer(model, args, target_modules=["q_proj", "v_proj"], rank=4,
    ...                              knot_every=100)
    >>> type(opt.optimizer).__name__, [g["weight_decay"] for g in opt.param_groups]
    ('AdamW', [0.1])
    >>> # trainer = Trainer(model, args, train_dataset=..., optimizers=(opt, None),
    >>> #                   callbacks=[ChainLoRACallback()])
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, cast

import torch
from torch import nn
from torch.optim import Optimizer

try:
    from transformers import (
        Trainer,
        TrainerCallback,
        TrainerControl,
        TrainerState,
        TrainingArguments,
    )
except ImportError as err:
    raise ImportError(
        "chainopt.integrations.transformers needs Hugging Face transformers: "
        "pip install transformers"
    ) from err

from ..advice import ChainLoRAWarning
from ..optimizer import ChainLoRAOptimizer
from ..targets import ModuleSpec

__all__ = ["ChainLoRACallback", "create_chain_optimizer"]

# As Trainer.get_decay_parameter_names: no weight decay inside LayerNorms or on these names
# (a bias delta, "…parametrizations.bias.0.delta", counts as a bias).
_NO_DECAY = tuple(
    re.compile(p)
    for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
)
_OPTIMIZER_NAME = "optimizer.pt"  # where Trainer saves the optimizer's state in a checkpoint
# Optimizer kwargs with which Trainer hands the optimizer its own groups or the model (GaLore,
# LOMO, layer-wise optimizers): such optimizers cannot take the chain's factors.
_OWN_GROUPS = ("params", "model", "optimizer_dict")


def create_chain_optimizer(
    model: nn.Module,
    args: TrainingArguments,
    *,
    target_modules: ModuleSpec | None = None,
    **chain_kwargs: Any,
) -> ChainLoRAOptimizer:
    """The optimizer ``Trainer`` would build from ``args``, wrapped in a chain.

    The optimizer class and its keyword arguments come from
    ``Trainer.get_optimizer_cls_and_kwargs(args, model)`` (``args.optim``, ``learning_rate``,
    ``adam_beta1/2``, ``adam_epsilon``, ``optim_args``); the trainable parameters (factors, and
    ``trainable_modules``) are split as ``Trainer.create_optimizer`` splits them: weight decay
    ``args.weight_decay``, none for biases (bias deltas included) and norms. The model's
    ``save_pretrained`` writes the merged model (:mod:`chainopt._hf_save`).

    Pass the result as ``Trainer(..., optimizers=(opt, None))``: the Trainer then builds its LR
    scheduler from ``args`` over it.

    Args:
        model: the model to adapt.
        args: the Trainer's arguments.
        target_modules: as for :class:`~chainopt.ChainLoRAOptimizer` (omitted: a
            ``PeftModel``'s own layers, or ``target_parameters`` alone).
        **chain_kwargs: the other :class:`~chainopt.ChainLoRAOptimizer` arguments (``rank``,
            ``alpha``, a schedule, ``seed``, ``target_parameters``, …).

    Returns:
        The chain optimizer.

    Raises:
        ValueError: ``args.optim`` names an optimizer that builds its own parameter groups or
            takes the model (GaLore, LOMO, layer-wise, Muon-style factories); and whatever
            :class:`~chainopt.ChainLoRAOptimizer` raises. The model is unchanged then.
    """
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, cast(Any, model))
    own = [k for k in _OWN_GROUPS if k in optimizer_kwargs]
    if own or not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
        raise ValueError(
            f"args.optim={str(args.optim)!r} builds its own parameter groups or takes the model "
            f"({', '.join(own) or 'an optimizer factory'}); a chain wraps a plain "
            "torch.optim.Optimizer over its factors: use e.g. optim='adamw_torch'"
        )
    kwargs = dict(optimizer_kwargs)

    def build(params: list[nn.Parameter]) -> Optimizer:
        decay = _decay_ids(model)
        groups = [
            {"params": [p for p in params if id(p) in decay], "weight_decay": args.weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
        ]
        optimizer: Optimizer = optimizer_cls([g for g in groups if g["params"]], **kwargs)
        return optimizer

    return ChainLoRAOptimizer(model, build, target_modules=target_modules, **chain_kwargs)


def _decay_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters ``Trainer.create_optimizer`` would give weight decay."""
    ids: set[int] = set()

    def visit(module: nn.Module, prefix: str, in_norm: bool) -> None:
        in_norm = in_norm or isinstance(module, nn.LayerNorm)
        for name, p in module.named_parameters(prefix=prefix.rstrip("."), recurse=False):
            if not in_norm and not any(pat.search(name.lower()) for pat in _NO_DECAY):
                ids.add(id(p))
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.", in_norm)

    visit(model, "", False)
    return ids


class ChainLoRACallback(TrainerCallback):
    """Trainer callback: the Trainer trains the chain, and ends at the best checkpoint's state.

    At ``on_train_begin`` it checks that the Trainer's optimizer is a
    :class:`~chainopt.ChainLoRAOptimizer` (possibly inside Accelerate's ``AcceleratedOptimizer``);
    the model's ``save_pretrained`` writes the merged model since the chain was built
    (:func:`chainopt._hf_save.guard_save_pretrained`). With
    ``load_best_model_at_end``, ``on_train_end`` loads the best checkpoint's optimizer state
    into the chain, matching the model the Trainer loaded (the chain's own tensors, step and
    knot counts, generator, history: what :func:`chainopt.export_peft_adapter` reads).
    A resume from a checkpoint that holds no optimizer state (``save_only_model=True``) warns
    (:class:`~chainopt.ChainLoRAWarning`): the chain then restarts its schedule from the saved
    merged weights; so does ``load_best_model_at_end`` from such a checkpoint (the model is the
    best one, the chain's counters and history are not, and
    :func:`~chainopt.adapter.export_peft_adapter` then needs ``base=``). Training and resuming
    need no callback.

    Example:
        >>> callback = ChainLoRACallback()  # Trainer(..., callbacks=[callback])
    """

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        chain = None if optimizer is None else _unwrap(optimizer)
        if optimizer is not None and not isinstance(chain, ChainLoRAOptimizer):
            raise ValueError(
                f"ChainLoRACallback: the Trainer's optimizer is a {type(optimizer).__name__}, "
                "not a ChainLoRAOptimizer; pass optimizers=(opt, scheduler) with the chain"
            )
        if isinstance(chain, ChainLoRAOptimizer) and state.global_step > chain.optimizer_steps == 0:
            warnings.warn(
                f"the Trainer resumed at step {state.global_step} from a checkpoint without the "
                "chain's state (no optimizer.pt: save_only_model=True?): the chain goes on from "
                "the saved merged weights with a fresh link and fresh optimizer state, and its "
                "knot schedule counts optimizer steps from 0 again",
                ChainLoRAWarning,
                stacklevel=2,
            )

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        best = state.best_model_checkpoint
        chain = None if optimizer is None else _unwrap(optimizer)
        if not (args.load_best_model_at_end and best and isinstance(chain, ChainLoRAOptimizer)):
            return
        # The Trainer loaded the best checkpoint's model (frozen weights, factors); bring the
        # chain back to that step too (counters, generator, history), or the history would
        # hold knots the model never saw and export_peft_adapter would write them.
        path = os.path.join(best, _OPTIMIZER_NAME)
        if os.path.isfile(path):
            chain.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return
        warnings.warn(
            f"load_best_model_at_end: {best} holds no optimizer.pt (save_only_model=True), so "
            "the chain cannot go back to it: the model is the best checkpoint's merged model "
            "(every link restarted at zero), but the chain's step and knot counters and its "
            f"history are those of step {chain.optimizer_steps}. export_peft_adapter() now needs "
            "base=<the original model> (it factorises W - W0); save with save_only_model=False "
            "to restore the chain with the model",
            ChainLoRAWarning,
            stacklevel=2,
        )


def _unwrap(optimizer: Optimizer) -> Optimizer:
    """The optimizer inside Accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    seen = 0
    while not isinstance(optimizer, ChainLoRAOptimizer) and seen < 4:
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, Optimizer):
            break
        optimizer, seen = inner, seen + 1
    return optimizer
