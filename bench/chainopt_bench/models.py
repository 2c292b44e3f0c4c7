"""The base models of the benchmarks, built from config with a fixed seed, and their batches.

Example:
    >>> spec = ModelSpec("llama", hidden=64, layers=1, seq=8, batch=2, vocab=128)
    >>> spec.label(), spec.heads
    ('llama h64 L1 seq8 b2', 1)
    >>> make_batches(spec, n=1)[0]["input_ids"].shape
    torch.Size([2, 8])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TARGETS", "TARGET_LABEL", "ModelSpec", "build_model", "make_batches"]

#: The adapted modules per architecture: ``"qv"`` (the paper's setting) and ``"all"`` linear
#: projections of the blocks (never ``lm_head``).
TARGETS: dict[str, dict[str, list[str]]] = {
    "llama": {
        "qv": ["q_proj", "v_proj"],
        "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    },
    "opt": {
        "qv": ["q_proj", "v_proj"],
        "all": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    },
}
#: How tables name the target sets.
TARGET_LABEL = {"qv": "q,v", "all": "all-linear"}


@dataclass(frozen=True)
class ModelSpec:
    """A decoder built from config: ``arch`` is ``"llama"`` or ``"opt"``."""

    arch: str
    hidden: int = 512
    layers: int = 6
    seq: int = 256
    batch: int = 4
    vocab: int = 8192
    head_dim: int = 64

    @property
    def heads(self) -> int:
        """Attention heads: ``hidden / head_dim``, at least 1."""
        return max(1, self.hidden // self.head_dim)

    def label(self) -> str:
        """The spec in a table heading, e.g. ``"llama h512 L2 seq256 b4"``."""
        return f"{self.arch} h{self.hidden} L{self.layers} seq{self.seq} b{self.batch}"


def build_model(
    spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> nn.Module:
    """A randomly initialised causal LM (dropout 0, no KV cache), in train mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if spec.arch == "llama":
        # Llama's MLP ratio (8/3·h rounded up to a multiple of 32), as in the 7B model (11008).
        inter = int(math.ceil(spec.hidden * 8 / 3 / 32) * 32)
        cfg = LlamaConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            intermediate_size=inter,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.heads,
            max_position_embeddings=max(2048, spec.seq),
            use_cache=False,
            tie_word_embeddings=False,
        )
        model: nn.Module = LlamaForCausalLM(cfg)
    elif spec.arch == "opt":
        cfg = OPTConfig(
            vocab_size=spec.vocab,
            hidden_size=spec.hidden,
            word_embed_proj_dim=spec.hidden,
            ffn_dim=4 * spec.hidden,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            max_position_embeddings=max(2048, spec.seq),
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            layerdrop=0.0,
            use_cache=False,
        )
        model = OPTForCausalLM(cfg)
    else:
        raise ValueError(f"unknown arch {spec.arch!r} (llama or opt)")
    return model.to(device=device, dtype=dtype).train()


def make_batches(
    spec: ModelSpec, n: int = 4, seed: int = 1234, device: str = "cpu"
) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of random token ids (labels = inputs): the same ones for every variant."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=g)
        out.append({"input_ids": ids.to(device), "labels": ids.to(device)})
    return out
