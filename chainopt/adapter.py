"""The whole chain as one PEFT LoRA adapter.

The chain's update to a weight is ``Σᵢ sᵢ·Bᵢ·Aᵢ = [s₁B₁ … s_LB_L]·[A₁; …; A_L]``: one LoRA of rank
``Σ rᵢ`` over the *original* base weights. :func:`export_peft_adapter` writes it (the merged links
kept in ``opt.history`` and the pending one) in PEFT's format, so
``PeftModel.from_pretrained(base_model, path)`` reproduces the fine-tuned model and one base model
can serve many chains as adapters, which merging cannot. The scales are folded into ``B`` and
``lora_alpha = r``, so PEFT's scale is 1. ``rank=k`` keeps the best rank-``k`` approximation of
each module's update (an SVD through two thin QRs, never the ``(out, in)`` matrix) and reports
the relative error it leaves.

Writing needs ``safetensors`` only; loading the adapter needs ``peft``.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer
    >>> from chainopt.adapter import export_peft_adapter
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=1)
    >>> for _ in range(3):
    ...     model(torch.randn(4, 8)).square().mean().backward()
    ...     opt.step()
    ...     opt.zero_grad()
    >>> with tempfile.TemporaryDirectory() as d:
    ...     exact = export_peft_adapter(opt, d)
    ...     small = export_peft_adapter(opt, d, rank=2)
    >>> exact.rank, exact.relative_error  # three merged links of rank 2; the new link is still 0
    (6, 0.0)
    >>> small.rank, 0 < small.relative_error < 1
    (2, True)
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .history import LinkFactors
from .lora import bias_delta, lora_parametrization
from .optimizer import ChainLoRAOptimizer
from .targets import select_modules

__all__ = ["AdapterReport", "export_peft_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Model class name suffix -> PEFT task type (``task_type="auto"``); anything else gets none.
_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


@dataclass(frozen=True)
class AdapterReport:
    """What :func:`export_peft_adapter` wrote.

    Attributes:
        path: the adapter directory.
        rank: the adapter's rank ``r`` (every module; shorter chains are padded with zeros).
        chain_ranks: per module, the rank of the stacked chain ``Σ rᵢ`` before compression.
        relative_errors: per module, ``‖ΔW − B'A'‖_F / ‖ΔW‖_F`` left by compression (0 when
            exact, and for a module whose update is 0).
        relative_error: the same over all modules together.
    """

    path: Path
    rank: int
    chain_ranks: dict[str, int]
    relative_errors: dict[str, float]
    relative_error: float

    @property
    def max_relative_error(self) -> float:
        """The largest per-module relative error."""
        return max(self.relative_errors.values(), default=0.0)


def export_peft_adapter(
    chain: ChainLoRAOptimizer,
    path: str | os.PathLike[str],
    rank: int | None = None,
    *,
    task_type: str | None = "auto",
    base_model_name_or_path: str | None = None,
) -> AdapterReport:
    """Write the whole chain as a PEFT LoRA adapter (``adapter_config.json`` + safetensors).

    ``PeftModel.from_pretrained(base, path)`` over the *original* base model (the weights the
    optimizer was built on) then computes what the fine-tuned model computes, to float32
    precision. Modules kept trainable (``trainable_modules``) are saved whole as PEFT's
    ``modules_to_save``. Export before ``merge_and_unload()``.

    Args:
        chain: the optimizer; it must keep history (``keep_history=True``, the default) once a
            knot has been tied.
        path: the directory to write (created if missing).
        rank: ``None`` writes the chain exactly (rank: the longest stacked chain); an int ``k``
            writes each module's best rank-``k`` approximation (see the report's errors).
        task_type: PEFT's ``task_type``; ``"auto"`` infers it from the model class name
            (``…ForCausalLM`` → ``"CAUSAL_LM"``, …), ``None`` writes none.
        base_model_name_or_path: recorded in the config; default: the model's ``name_or_path``.

    Returns:
        An :class:`AdapterReport` with the rank and the relative errors left.

    Raises:
        TypeError: ``chain`` is not a :class:`~chainopt.ChainLoRAOptimizer`.
        ValueError: a bad ``rank``; knots were tied with ``keep_history=False`` (the merged
            links are gone); ``merge_and_unload()`` was called (its link is not in the history).
            Nothing is written then.
        ImportError: ``safetensors`` is not installed.
    """
    if not isinstance(chain, ChainLoRAOptimizer):
        raise TypeError(f"chain must be a ChainLoRAOptimizer, got {type(chain).__name__}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be None (exact) or a positive int, got {rank!r}")
    history = chain.history
    if len(history) and not history.keep_factors:
        raise ValueError(
            f"this chain was built with keep_history=False and has tied {len(history)} knot(s): "
            "the merged links' factors were not kept, so the chain cannot be written as an "
            "adapter. Build the ChainLoRAOptimizer with keep_history=True (the default) to "
            "export adapters, or deploy the merged model with chainopt.save_merged(opt, path)"
        )
    if not chain.adapted_modules():
        raise ValueError(
            "merge_and_unload() was called on this chain: the link it merged is not in "
            "opt.history, so the adapter would miss it; export the adapter before "
            "merge_and_unload()"
        )
    lora_bias = chain.config.lora_bias
    if lora_bias and len(history) and not history.keep_factors:
        raise ValueError(
            "this chain trains bias deltas (lora_bias=True) with keep_history=False: the merged "
            "deltas were not kept; deploy the merged model with chainopt.save_merged(opt, path)"
        )
    try:
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError(
            "export_peft_adapter writes safetensors: pip install safetensors"
        ) from err

    model = chain.model
    names = list(chain.config.modules)
    stacks = {
        name: _stack(model, name, history.links(name) if len(history) else []) for name in names
    }
    r = rank if rank is not None else max([b.shape[1] for b, _a in stacks.values()] + [1])

    tensors: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    left_total, norm_total = 0.0, 0.0
    for name, (b, a) in stacks.items():
        b, a, left, norm = _compress(b, a, r)
        errors[name] = math.sqrt(left / norm) if norm > 0 else 0.0
        left_total, norm_total = left_total + left, norm_total + norm
        key = f"{_PREFIX}{name}"
        tensors[f"{key}.lora_A.weight"] = _pad(a, r, dim=0)  # (r, in)
        tensors[f"{key}.lora_B.weight"] = _pad(b, r, dim=1)  # (out, r)
        if lora_bias:
            delta = bias_delta(model.get_submodule(name))
            out = b.shape[0]
            merged = history.bias_sum(name) if len(history) else None
            bias = torch.zeros(out) if delta is None else delta.delta.detach().float().cpu()
            tensors[f"{key}.lora_B.bias"] = bias + (0 if merged is None else merged.cpu())
    to_save = _modules_to_save(chain)
    for owner in to_save:
        for key, value in model.get_submodule(owner).state_dict().items():
            tensors[f"{_PREFIX}{owner}.{key}"] = value.detach().cpu().clone().contiguous()

    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": _task_type(model) if task_type == "auto" else task_type,
        "base_model_name_or_path": base_model_name_or_path or _name_or_path(model),
        "revision": None,
        "r": r,
        "lora_alpha": r,  # PEFT's scale alpha / r = 1: the chain's scales are folded into B
        "target_modules": _target_modules(model, names),
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": to_save or None,
    }
    if lora_bias:
        config["lora_bias"] = True  # PEFT >= 0.14: lora_B carries a bias

    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    overall = math.sqrt(left_total / norm_total) if norm_total > 0 else 0.0
    chain_ranks = {name: b.shape[1] for name, (b, _a) in stacks.items()}
    return AdapterReport(out_dir, r, chain_ranks, errors, overall)


def _stack(model: nn.Module, name: str, links: list[LinkFactors]) -> tuple[Tensor, Tensor]:
    """``(B, A)``, ``(out, R)`` and ``(R, in)`` in float32 on the CPU, scales folded into B.

    The merged links and, while the module is still adapted, its pending link (left out while
    ``B`` is still zero: it adds nothing).
    """
    module = model.get_submodule(name)
    if not isinstance(module, nn.Linear):  # pragma: no cover - chainopt adapts Linears only
        raise TypeError(f"{name!r} is a {type(module).__name__}, not an nn.Linear")
    links = list(links)
    link = lora_parametrization(module)
    if link is not None and bool(link.lora_B.detach().any()):
        links.append(
            LinkFactors(link.lora_A.detach().float(), link.lora_B.detach().float(), link.scale)
        )
    if not links:
        return torch.zeros(module.out_features, 0), torch.zeros(0, module.in_features)
    b = torch.cat([lf.B.detach().float().cpu() * lf.scale for lf in links], dim=1)  # (out, R)
    a = torch.cat([lf.A.detach().float().cpu() for lf in links], dim=0)  # (R, in)
    return b, a


def _compress(b: Tensor, a: Tensor, k: int) -> tuple[Tensor, Tensor, float, float]:
    """Best rank-``k`` ``(B', A')`` of ``B·A``, and ``‖B·A − B'·A'‖²_F``, ``‖B·A‖²_F``.

    Exact (and returned as is) when ``B`` has no more than ``k`` columns. Otherwise
    ``B = Q_b R_b``, ``Aᵀ = Q_a R_a``, ``R_b R_aᵀ = U S Vᵀ``: the SVD of a ``(p, q)`` matrix
    with ``p, q ≤ R``, in float64; ``√S`` goes to each side.
    """
    if b.shape[1] <= k:
        # ‖B·A‖² = Σ (BᵀB) ⊙ (AAᵀ): (R, R) products, never (out, in).
        norm = float(((b.double().T @ b.double()) * (a.double() @ a.double().T)).sum())
        return b, a, 0.0, max(norm, 0.0)
    qb, rb = torch.linalg.qr(b.double())  # (out, p), (p, R)
    qa, ra = torch.linalg.qr(a.double().T)  # (in, q), (q, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # (p, m), (m,), (m, q)
    squares = s.square()
    root = s[:k].sqrt()
    b_k = (qb @ u[:, :k]) * root  # (out, k)
    a_k = root[:, None] * (vh[:k] @ qa.T)  # (k, in)
    return b_k.float(), a_k.float(), float(squares[k:].sum()), float(squares.sum())


def _pad(t: Tensor, r: int, dim: int) -> Tensor:
    """Zero-pad ``t`` to size ``r`` along ``dim`` (extra rank that adds nothing)."""
    missing = r - t.shape[dim]
    if missing > 0:
        shape = list(t.shape)
        shape[dim] = missing
        t = torch.cat([t, t.new_zeros(shape)], dim=dim)
    return t.contiguous()


def _modules_to_save(chain: ChainLoRAOptimizer) -> list[str]:
    """Modules whose own parameters train as they are (``trainable_modules``), outermost only."""
    factors = {id(p) for p in chain.factors()}
    owners: set[str] = set()
    for name, p in chain.model.named_parameters():
        if p.requires_grad and id(p) not in factors:
            owner = name.rpartition(".")[0]
            if not owner:
                raise ValueError(
                    f"parameter {name!r} of the root module trains outside the chain; PEFT can "
                    "only save whole submodules (modules_to_save)"
                )
            owners.add(owner)
    return sorted(o for o in owners if not any(o.startswith(f"{other}.") for other in owners))


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """PEFT-style suffixes when they pick exactly ``names``; else a regex of the full names."""
    suffixes = sorted({name.rpartition(".")[2] for name in names})
    if {n for n, _m in select_modules(model, suffixes)} == set(names):
        return suffixes
    return "|".join(re.escape(name) for name in names)  # PEFT full-matches a str


def _task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES if cls.endswith(suffix)), None)


def _name_or_path(model: nn.Module) -> str | None:
    value = getattr(model, "name_or_path", None)
    return value if isinstance(value, str) and value else None
