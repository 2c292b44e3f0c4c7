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


def tiny_qwen2_moe(seed: int = 0) -> nn.Module:
    """A 1-layer Qwen2-MoE, hidden size 16: 4 routed experts fused in 3-D Parameters
    (transformers 5), a bare-parameter router, a shared expert of Linears and its
    ``Linear(hidden, 1)`` gate (random weights, no download)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_experts_per_tok=2, max_position_embeddings=32,
        intermediate_size=24, moe_intermediate_size=8, shared_expert_intermediate_size=24,
        num_experts=4,
    )  # fmt: skip
    return Qwen2MoeForCausalLM(cfg)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer, by state-dict key."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def requires_grad_map(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def _hook_dicts(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v) for k, v in vars(module).items() if "hook" in k and isinstance(v, dict)}


def _tensor_hooks(t: torch.Tensor) -> list[int]:
    """How many hooks of each kind a tensor carries (backward, post-accumulate-grad)."""
    kinds = ("_backward_hooks", "_post_accumulate_grad_hooks")
    return [len(getattr(t, k, None) or ()) for k in kinds]


def fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Everything a refused construction must leave as it was, in a comparable form.

    Per module (every registration, shared ones included): its class, training flag, instance
    attributes (by identity), hook dicts (forward, backward, state-dict and load-state-dict,
    with and without kwargs) and parametrizations; per parameter (by name): identity,
    ``requires_grad``, registration order, instance attributes and tensor hooks; torch's global
    module hooks; the state dict's keys in order and values. Per
    optimizer: each group's parameters (by identity) and hyperparameters, the state of each
    parameter (values), its instance attributes and its hooks.
    """
    from torch.nn.utils import parametrize

    modules = {
        name: (
            type(m),
            m.training,
            {
                k: id(v)
                for k, v in vars(m).items()
                if k not in ("_parameters", "_buffers", "_modules")
            },
            _hook_dicts(m),
            parametrize.is_parametrized(m),
            list(m._parameters),
            list(m._buffers),
            list(m._modules),
        )
        for name, m in model.named_modules(remove_duplicate=False)
    }
    params = [
        (n, id(p), p.requires_grad, sorted(vars(p)), _tensor_hooks(p))
        for n, p in model.named_parameters()
    ]
    from torch.nn.modules import module as torch_module

    global_hooks = [len(v) for k, v in vars(torch_module).items() if k.startswith("_global_")
                    and k.endswith("hooks") and isinstance(v, dict)]  # fmt: skip
    out: dict = {
        "modules": modules,
        "params": params,
        "state_dict": snapshot(model),
        "global_hooks": global_hooks,
    }
    if optimizer is not None:
        out["groups"] = [
            ([id(p) for p in g["params"]], {k: v for k, v in g.items() if k != "params"})
            for g in optimizer.param_groups
        ]
        out["state"] = {
            id(p): {
                k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()
            }
            for p, s in optimizer.state.items()
        }
        out["optimizer"] = (
            sorted(vars(optimizer)),
            {k: list(v) for k, v in vars(optimizer).items() if "hook" in k and isinstance(v, dict)},
        )
    return out


def assert_same(before: object, after: object, where: str = "") -> None:
    """``before == after``, tensors compared exactly (dtype, shape and values)."""
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor) and before.dtype == after.dtype, where
        assert before.shape == after.shape and before.device == after.device, where
        assert before.is_meta or torch.equal(before, after), where  # (meta: no values)
    elif isinstance(before, dict):
        assert isinstance(after, dict) and list(before) == list(after), (where, before, after)
        for k in before:
            assert_same(before[k], after[k], f"{where}[{k!r}]")
    elif isinstance(before, (list, tuple)):
        assert type(before) is type(after) and len(before) == len(after), (where, before, after)
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            assert_same(b, a, f"{where}[{i}]")
    else:
        assert before == after, (where, before, after)
