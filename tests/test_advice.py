"""Warnings for likely mistakes: a frozen task head, frozen parameters added, a dtype changed."""

from __future__ import annotations

import warnings

import pytest
import torch
from models import mlp
from torch import nn

from chainopt import ChainLoRAOptimizer, ChainLoRAWarning


def _classifier() -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_labels=3, pad_token_id=0)  # fmt: skip
    return LlamaForSequenceClassification(cfg)


def test_a_frozen_classification_head_warns_and_a_trainable_one_does_not() -> None:
    model = _classifier()
    with pytest.warns(ChainLoRAWarning, match=r"head 'score' .*trainable_modules=\['score'\]"):
        ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()),
                           target_modules=["q_proj"], rank=2, knot_every=5)  # fmt: skip
    model = _classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChainLoRAWarning)
        ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()),
                           target_modules=["q_proj"], trainable_modules=["score"], rank=2,
                           knot_every=5)  # fmt: skip
        causal = mlp()  # not a task model: nothing to say
        ChainLoRAOptimizer(causal, torch.optim.AdamW(causal.parameters()), target_modules=["0"],
                           rank=2, knot_every=5)  # fmt: skip


def test_adding_frozen_parameters_warns() -> None:
    model = mlp()
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()), target_modules=["0"],
                             rank=2, knot_every=5)  # fmt: skip
    with pytest.warns(ChainLoRAWarning, match="never trained"):
        opt.add_param_group({"params": list(model[4].parameters())})  # frozen by the chain
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChainLoRAWarning)
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


def test_casting_the_model_after_wrapping_warns_at_the_next_knot() -> None:
    model = mlp(dtype=torch.bfloat16)
    opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()), target_modules=["0"],
                             rank=2, knot_every=5)  # fmt: skip
    model.to(torch.float16)
    with pytest.warns(ChainLoRAWarning, match=r"'0' are torch.float16 / torch.float16, built as"):
        opt.tie_knot()
