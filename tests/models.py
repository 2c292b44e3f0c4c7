"""Tiny models for tests: plain ``nn.Sequential`` stacks and OPT/Llama built from config."""

from __future__ import annotations

import torch
from torch import nn


def mlp(
    width: int = 12, depth: int = 2, out: int = 6, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """``Linear → Tanh → … → Linear`` with modules named ``"0"``, ``"2"``, …"""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers).to(dtype)


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama with hidden size 32 (random weights, no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_opt(seed: int = 0) -> nn.Module:
    """A 2-layer OPT with hidden size 32 (random weights, no download)."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return OPTForCausalLM(cfg).eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer, by state-dict key."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def requires_grad_map(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}
