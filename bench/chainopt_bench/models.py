"""The base models of the benchmarks, built from config with a fixed seed, and their batches.

With ``quant="4bit"`` every linear layer but ``lm_head`` becomes a bitsandbytes ``Linear4bit``
(NF4, double quantization, compute dtype = the model's dtype), as
``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))``
would load it: QLoRA's base.

Example:
    >>> spec = ModelSpec("llama", hidden=64, layers=1, seq=8, batch=2, vocab=128)
    >>> spec.label(), spec.heads
    ('llama h64 L1 seq8 b2', 1)
    >>> make_batches(spec, n=1)[0]["input_ids"].shape
    torch.Size([2, 8])
    >>> adapted_weight_elements(build_model(spec), "llama", "qv")  # q_proj + v_proj: 2·64·64
    8192
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "QUANT",
    "TARGETS",
    "TARGET_LABEL",
    "ModelSpec",
    "adapted_weight_elements",
    "build_model",
    "make_batches",
    "quantize_4bit_",
]

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
#: The base-weight formats: ``"none"`` (dense, in the model's dtype) and ``"4bit"`` (bitsandbytes
#: NF4 with double quantization on every linear layer but ``lm_head``).
QUANT = ("none", "4bit")
#: Linear layers ``BitsAndBytesConfig(load_in_4bit=True)`` leaves dense (the output embedding).
KEEP_DENSE = ("lm_head",)


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
    spec: ModelSpec,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    quant: str = "none",
) -> nn.Module:
    """A randomly initialised causal LM (dropout 0, no KV cache), in train mode.

    Args:
        spec: Architecture and size.
        seed: Seed of the weights.
        dtype: The weights' dtype (with ``quant="4bit"``: of the layers left dense, and the
            4-bit layers' compute dtype).
        device: Where the model goes.
        quant: ``"none"`` or ``"4bit"`` (:func:`quantize_4bit_`).
    """
    if quant not in QUANT:
        raise ValueError(f"unknown quant {quant!r} (one of {QUANT})")
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
    model = model.to(device=device, dtype=dtype).train()
    if quant == "4bit":
        quantize_4bit_(model, compute_dtype=dtype)
    return model


def quantize_4bit_(
    model: nn.Module,
    compute_dtype: torch.dtype = torch.float32,
    quant_type: str = "nf4",
    double_quant: bool = True,
) -> int:
    """Replace every ``nn.Linear`` but ``lm_head`` by a bitsandbytes ``Linear4bit``, in place.

    Each weight is quantized on its own device (``Params4bit.to``: bitsandbytes 0.50 quantizes on
    the CPU too), blocks of 64, storage ``uint8``; biases stay dense, in the model's dtype.

    Args:
        model: A model with dense linear layers.
        compute_dtype: The dtype ``Linear4bit`` computes in (the model's dtype).
        quant_type: ``"nf4"`` or ``"fp4"``.
        double_quant: Quantize the absmax statistics too (``compress_statistics``).

    Returns:
        How many layers were replaced.
    """
    import bitsandbytes as bnb

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear or name in KEEP_DENSE:
                continue
            device = child.weight.device
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=double_quant,
                quant_type=quant_type,
                quant_storage=torch.uint8,
                device=device,
            )
            layer.weight = bnb.nn.Params4bit(
                child.weight.data.clone(),
                requires_grad=False,
                compress_statistics=double_quant,
                quant_type=quant_type,
                quant_storage=torch.uint8,
            )
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data.clone())
            setattr(parent, name, layer.to(device).train(child.training))  # quantizes
            replaced += 1
    return replaced


def adapted_weight_elements(model: nn.Module, arch: str, targets: str) -> int:
    """Weight elements (``out·in``) of the layers a target set adapts in ``model``.

    Args:
        model: The base model (dense or 4-bit).
        arch: ``"llama"`` or ``"opt"``.
        targets: ``"qv"`` or ``"all"``.
    """
    names = TARGETS[arch][targets]
    return sum(
        int(m.in_features) * int(m.out_features)
        for full, m in model.named_modules()
        if full.rsplit(".", 1)[-1] in names and hasattr(m, "in_features")
    )


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
