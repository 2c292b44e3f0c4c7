"""The whole chain as one PEFT LoRA adapter.

The chain's update to a weight is ``Σᵢ sᵢ·Bᵢ·Aᵢ = [s₁B₁ … s_LB_L]·[A₁; …; A_L]``: one LoRA of rank
``Σ rᵢ`` over the *original* base weights. :func:`export_peft_adapter` writes it in PEFT's format
(the merged links kept in ``opt.history`` and the pending one, or, without history, the exact
factorisation of ``W − W₀`` against the original weights), so
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
    >>> from chainopt import export_peft_adapter
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=1, keep_history=True)
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

import copy
import inspect
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from ._atomic import write_atomically
from ._attach import is_conv1d, original, plist_of
from ._dtensor import full_tensor
from ._experts import ParameterLink, split_experts
from ._layers import find_adapted
from ._load_guard import loaded_plain_weights
from ._lowrank import compress, factorise
from ._marks import PEFT_SAVE, base_merged
from ._peft_layers import PeftLink, is_peft_lora_layer
from ._peft_save import whole_chain, whole_chain_adapter
from ._quant_backends import backend_for
from ._rank_zero import write_once
from ._record import ModuleRecord
from ._validate import type_name
from .guard import NonFiniteUpdateError, check_links
from .history import ChainHistory, LinkFactors
from .merge import merged_bias, merged_weight
from .optimizer import ChainLoRAOptimizer
from .quantized import quantized_weight
from .targets import is_linear_like, select_modules

__all__ = ["AdapterReport", "export_peft_adapter", "peft_adapter_state_dict"]

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

    Example:
        >>> import tempfile
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer
        >>> from chainopt import export_peft_adapter
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0", "2"], rank=2, knot_every=1)
        >>> with torch.no_grad():  # trained B's, say (a new link's B is 0 and adds no rank)
        ...     _ = [link.lora_B.normal_() for link in (model[0].parametrizations.weight[0],
        ...                                             model[2].parametrizations.weight[0])]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     report = export_peft_adapter(opt, d)
        >>> report.rank, report.chain_ranks, report.relative_error
        (2, {'0': 2, '2': 2}, 0.0)
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


def _refuse_options_of_own_links(rank: object, base: object) -> None:
    """``rank=`` and ``base=`` are for chainopt's own links: a chain of PEFT's own layers keeps
    every link, and the model's own save (PEFT's state dict of them) writes them exactly."""
    if rank is not None or base is not None:
        raise ValueError(
            "rank= and base= are not taken for a chain of PEFT's own layers: its links are all "
            "kept, and the model's own adapter save (peft_model.save_pretrained) writes them "
            "exactly"
        )


def _export_peft_chain(
    chain: ChainLoRAOptimizer,
    path: Path,
    links: Sequence[tuple[str, PeftLink]],
    rank: int | None,
    base: object,
) -> AdapterReport:
    """A chain of PEFT's own layers: the ``PeftModel``'s ``save_pretrained`` (the whole chain,
    exact), with the model's own ``LoraConfig`` and keys."""
    _refuse_options_of_own_links(rank, base)
    if "save_pretrained" not in vars(chain.model):
        raise ValueError(
            "this chain's PEFT layers are not in a PeftModel (no save_pretrained writing the "
            "chain): wrap the model with peft.get_peft_model before chaining to save it as an "
            "adapter, or deploy the merged model with chainopt.save_merged"
        )
    _save, _tensors, padded, merged = whole_chain(chain.model)
    cast(Any, chain.model).save_pretrained(path)
    ranks = {
        name: (1 if name in merged else len(chain.history.links(name)) + 1) * link.rank
        for name, link in links
    }
    return AdapterReport(path, padded, ranks, dict.fromkeys(ranks, 0.0), 0.0)


def _refuse_aliased(chain: ChainLoRAOptimizer) -> None:
    """Refuse a chain on a module the model holds at several places (``Sequential(lin, act,
    lin)``): PEFT injects its layer at one of them, so the served adapter would change only
    that one and compute another function."""
    config = chain.config  # (the records are gone once the optimizer unloaded them)
    owners = [n.rpartition(".")[0] if n in config.parameters else n for n in config.modules]
    modules = dict(chain.model.named_modules())
    held = [modules[n] for n in owners if n in modules]
    places: dict[int, list[str]] = {}
    for name, module in chain.model.named_modules(remove_duplicate=False):
        places.setdefault(id(module), []).append(name)
    aliased = [places[id(m)] for m in held if len(places.get(id(m), ())) > 1]
    if aliased:
        raise ValueError(
            f"the chain adapts a module the model holds at several places ({aliased[0]}): PEFT "
            "would put its LoRA layer at one of them only, so the adapter would compute another "
            "function; deploy the merged model (chainopt.save_merged or merged_state_dict) "
            "instead; nothing was written"
        )


def _refuse_trained_under_links(chain: ChainLoRAOptimizer) -> None:
    """Refuse a chain whose weight (or bias) under a link requires grad: a weight trained
    directly (``add_param_group``) is a change no LoRA adapter holds, and one that only requires
    grad (``model.requires_grad_(True)``, which :meth:`~ChainLoRAOptimizer.step` refuses) would
    put its module in ``modules_to_save`` beside its own LoRA layer. Either way PEFT could not
    load what would be written."""
    hot = [name for name, _ in chain._frozen_requiring_grad()]
    if hot:
        raise ValueError(
            f"the weight or bias under the link of {hot[0].rpartition('.')[0]!r} requires grad "
            f"({hot[:3]}, {len(hot)} in all): a LoRA adapter cannot hold a change of the weight "
            "a link adapts, and PEFT could not load the adapter. Freeze them again (model."
            "requires_grad_(False), then requires_grad_(True) on every parameter in "
            "opt.param_groups), or, if the optimizer trains them, deploy the merged model "
            "(chainopt.save_merged or merged_state_dict); nothing was written"
        )


def _check_arguments(
    chain: object, rank: object, base: object, base_model_name_or_path: object
) -> ChainLoRAOptimizer:
    """Refuse bad arguments to :func:`export_peft_adapter` or :func:`peft_adapter_state_dict`
    and chains no adapter can hold; nothing is read from the model yet."""
    if not isinstance(chain, ChainLoRAOptimizer):
        raise TypeError(f"chain must be a ChainLoRAOptimizer, got {type_name(chain)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be None (exact) or a positive int, got {rank!r}")
    if base is not None and not isinstance(base, (nn.Module, Mapping)):
        raise TypeError(f"base must be an nn.Module or a state dict, got {type_name(base)}")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(
            f"base_model_name_or_path must be a str or None, got {base_model_name_or_path!r}"
        )
    if chain.config.parameters and chain.config.lora_bias:
        raise ValueError(
            "export_peft_adapter does not write bias deltas (lora_bias=True) beside "
            f"target_parameters (here {list(chain.config.parameters)[:3]}): PEFT's parameter "
            "wrappers carry no bias; deploy the merged model with chainopt.save_merged(opt, "
            "path) instead; nothing was written"
        )
    _refuse_aliased(chain)
    _refuse_trained_under_links(chain)
    return chain


def _peft_links(chain: ChainLoRAOptimizer) -> list[tuple[str, PeftLink]]:
    return [(r.name, r.link) for r in chain.chain.records if isinstance(r.link, PeftLink)]


@dataclass(frozen=True)
class _Adapter:
    """An adapter built in memory: PEFT's saved keys and config, and what the report says."""

    tensors: dict[str, Tensor]
    config: dict[str, Any]
    rank: int
    chain_ranks: dict[str, int]
    errors: dict[str, float]
    overall: float


def _build(
    chain: ChainLoRAOptimizer,
    rank: int | None,
    base: nn.Module | Mapping[str, Tensor] | None,
    task_type: str | None,
    base_model_name_or_path: str | None,
) -> _Adapter:
    """The adapter of a chain of chainopt's own links (see :func:`export_peft_adapter`)."""
    history = chain.history
    chained = chain.chain.records  # none once unloaded by the optimizer; stale behind its back
    unloaded = not chained or not all(r.attached() for r in chained)
    if unloaded and _was_peft_chain(chain):
        raise ValueError(
            "this chain's links were PEFT's own LoRA layers, and merge_and_unload() merged them "
            "into the base layers (their B is zero now), so there is no adapter left to export; "
            "nothing was written. Export before opt.merge_and_unload() (the PeftModel's own "
            "save_pretrained writes the whole chain), or save the plain fine-tuned model: "
            "peft_model.merge_and_unload().save_pretrained(dir)"
        )
    # The history holds every merged link unless it was off while knots were tied.
    # A plain (merged) checkpoint loaded into the chain since: the history is not W - W0.
    stale = not unloaded and loaded_plain_weights(chain.model)
    # An earlier chain merged and unloaded into these weights: the history starts from them.
    earlier = not unloaded and (
        base_merged(chain.model) or any(v != 0 for v in chain.chain.merged_before.values())
    )
    from_history = (
        not unloaded and not stale and not earlier and (history.keep_factors or not len(history))
    )
    if not from_history and base is None:
        why = (
            "merge_and_unload() was called: its link is not in opt.history"
            if unloaded
            else "the model's weights hold an earlier chain that merge_and_unload() merged "
            "before this optimizer was built: opt.history holds this chain's links only, and "
            "an adapter of them would compute another model on the original base"
            if earlier
            else "the model's frozen weights are not those opt.history was saved with: a load "
            "replaced them without the chain's optimizer state (a plain (merged) checkpoint: a "
            "Trainer's load_best_model_at_end or resume without optimizer.pt; or a model-only "
            "load), or the optimizer state loaded is another run's (or was loaded without its "
            "model's weights), so opt.history no longer describes the update W - W0"
            if stale
            else f"this chain was built with keep_history=False and has tied {len(history)} "
            "knot(s): the merged links' factors were not kept"
        )
        raise ValueError(
            f"{why}. Pass base=<the original model or its state dict> to export the whole "
            "update W - W0, build the ChainLoRAOptimizer with keep_history=True, or deploy the "
            "merged model with chainopt.save_merged(opt, path)"
        )
    lora_bias = chain.config.lora_bias
    model = chain.model
    params = set(chain.config.parameters)  # "<module>.<param>" (target_parameters)
    names = [n for n in chain.config.modules if n not in params]
    param_names = [n for n in chain.config.modules if n in params]
    records = {r.name: r for r in chained if r.attached()}  # none once unloaded
    _refuse_read_elsewhere([records[n] for n in param_names if n in records])
    if not unloaded:
        check = check_links(chain.chain.records)
        if check.bad:
            raise NonFiniteUpdateError(f"refusing to export the adapter: {check.describe()}")
    originals = (
        None
        if from_history or base is None
        else _base_tensors(base, model, names, lora_bias, param_names)
    )
    sketched: dict[str, float] = {}
    if originals is None:
        stacks = {name: _stack(records[name], history) for name in names}
    else:
        stacks = {}
        for name in names:
            module = model.get_submodule(name)
            delta = _current_weight(module, records.get(name)) - _out_in(
                module, originals[f"{name}.weight"]
            )
            bound = _chain_rank(chain, name, records.get(name))
            stacks[name], sketched[name] = factorise(
                delta, min(delta.shape) if bound is None else bound
            )
    experts: dict[str, list[tuple[Tensor, Tensor]]] = {}  # per expert (B, A) of each parameter
    for name in param_names:
        if originals is None:
            experts[name] = _expert_stacks(records[name], history)
            continue
        deltas = _current_parameter(model, name, records.get(name)) - _experts_out_in(
            model, name, originals[name]
        )
        bound = _chain_rank(chain, name, records.get(name))
        found = [factorise(d, min(d.shape) if bound is None else bound) for d in deltas]
        experts[name] = [pair for pair, _left in found]
        sketched[name] = sum(left for _pair, left in found)
    widths = [b.shape[1] for b, _a in stacks.values()]
    widths += [b.shape[1] for pairs in experts.values() for b, _a in pairs]
    r = rank if rank is not None else max([*widths, 1])

    tensors: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    left_total, norm_total = 0.0, 0.0
    for name, (b, a) in stacks.items():
        b, a, left, norm = compress(b, a, r)
        missed = sketched.get(name, 0.0)  # left out of (b, a) from base: orthogonal to B·A
        left, norm = left + missed, norm + missed
        errors[name] = math.sqrt(left / norm) if norm > 0 else 0.0
        left_total, norm_total = left_total + left, norm_total + norm
        key = f"{_PREFIX}{name}"
        tensors[f"{key}.lora_A.weight"] = _pad(a, r, dim=0)  # (r, in)
        tensors[f"{key}.lora_B.weight"] = _pad(b, r, dim=1)  # (out, r)
        if lora_bias:
            tensors[f"{key}.lora_B.bias"] = (
                _bias_update(records[name], history)
                if originals is None
                else _current_bias(model, name, records.get(name))
                - _host(originals[f"{name}.bias"])
            )
    experts_tensors: dict[str, tuple[Tensor, Tensor]] = {}  # name -> PEFT's (A, B)
    for name, pairs in experts.items():
        left, norm = 0.0, 0.0
        a_parts, b_parts = [], []
        for b, a in pairs:
            b, a, left_e, norm_e = compress(b, a, r)
            missed = sketched.get(name, 0.0) / len(pairs)  # the range finder's, spread evenly
            left, norm = left + left_e + missed, norm + norm_e + missed
            a_parts.append(_pad(a, r, dim=0))  # (r, in)
            b_parts.append(_pad(b, r, dim=1))  # (out, r)
        errors[name] = math.sqrt(left / norm) if norm > 0 else 0.0
        left_total, norm_total = left_total + left, norm_total + norm
        # PEFT's ParamWrapper layout: A (r·E, in) expert by expert, B (out, r·E) interleaved
        a_full = torch.stack(a_parts).reshape(-1, a_parts[0].shape[1])
        b_full = torch.stack(b_parts, dim=-1).reshape(b_parts[0].shape[0], -1)
        experts_tensors[name] = a_full.contiguous(), b_full.contiguous()
    to_save = _modules_to_save(chain)
    for owner in to_save:  # trained outside the links: NaN/Inf here is checked as the links'
        for key, value in model.get_submodule(owner).state_dict().items():
            whole = full_tensor(value.detach())  # gathered under FSDP2 (a collective)
            tensors[f"{_PREFIX}{owner}.{key}"] = whole.cpu().clone().contiguous()
    bad = [
        k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    bad += [n for n, ab in experts_tensors.items() if not all(bool(t.isfinite().all()) for t in ab)]
    if bad:
        raise NonFiniteUpdateError(f"refusing to export the adapter: non-finite {bad[:3]}")

    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": _task_type(model) if task_type == "auto" else task_type,
        "base_model_name_or_path": base_model_name_or_path or _name_or_path(model),
        "revision": None,
        "r": r,
        "lora_alpha": r,  # PEFT's scale alpha / r = 1: the chain's scales are folded into B
        "target_modules": _target_modules(model, names) if names else None,
        "target_parameters": param_names or None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(is_conv1d(model.get_submodule(n)) for n in names),
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
    if _tied(model, to_save):  # PEFT keeps the saved copies of tied modules tied (>= 0.18)
        config["ensure_weight_tying"] = True

    skeleton = _check_peft_loads(model, config)
    if experts_tensors:
        for name, key in _parameter_keys(model, skeleton, param_names).items():
            a_full, b_full = experts_tensors[name]
            tensors[f"{_PREFIX}{key}.lora_A.weight"] = a_full
            tensors[f"{_PREFIX}{key}.lora_B.weight"] = b_full
    overall = math.sqrt(left_total / norm_total) if norm_total > 0 else 0.0
    chain_ranks = {name: b.shape[1] for name, (b, _a) in stacks.items()}
    chain_ranks |= {name: max(b.shape[1] for b, _a in pairs) for name, pairs in experts.items()}
    return _Adapter(tensors, config, r, chain_ranks, errors, overall)


def export_peft_adapter(
    chain: ChainLoRAOptimizer,
    path: str | os.PathLike[str],
    rank: int | None = None,
    *,
    base: nn.Module | Mapping[str, Tensor] | None = None,
    task_type: str | None = "auto",
    base_model_name_or_path: str | None = None,
) -> AdapterReport:
    """Write the whole chain as a PEFT LoRA adapter (``adapter_config.json`` + safetensors).

    ``PeftModel.from_pretrained(base, path)`` over the *original* base model (the weights the
    optimizer was built on) then computes what the fine-tuned model computes, to float32
    precision. Modules kept trainable (``trainable_modules``) are saved whole as PEFT's
    ``modules_to_save``. Export before ``merge_and_unload()``.

    The merged links come from ``opt.history`` when the chain keeps it (``keep_history=True``);
    otherwise from ``base``, the original weights: each module's whole update
    ``ΔW = W − W₀`` then has rank at most the chain's ``Σ rᵢ`` and is factorised through a
    randomized range finder and an SVD of its ``(Σ rᵢ + 8)``-column sketch (``O(out·in·Σ rᵢ)``),
    exact to float32 rounding (the report gives what is left).

    Parameters adapted with ``target_parameters`` (fused mixture-of-experts weights, routers)
    are written as PEFT's ``target_parameters``: each expert's links stacked (rank ``Σ rᵢ`` per
    expert) in PEFT's ``ParamWrapper`` layout, ``lora_A`` ``(r·E, in)`` and ``lora_B``
    ``(out, r·E)`` interleaved, under the keys PEFT's own injection gives them (it nests the
    wrappers of a module's parameters); ``rank=k`` compresses each expert on its own. This
    needs peft and a Hugging Face model (rebuilt on the meta device to ask PEFT).

    A chain of PEFT's own layers (a chained ``PeftModel``) is written by the model's
    ``save_pretrained``, which writes the whole chain exactly with the model's ``LoraConfig``
    (see :mod:`chainopt._peft_layers`); ``rank`` and ``base`` are refused there.

    Under FSDP2 (a model sharded by ``fully_shard``) call it on every rank: every rank gathers
    what it needs and gets the report, rank 0 alone writes, and no rank returns before the
    files are in place (if rank 0 cannot write, every rank raises).

    Args:
        chain: the optimizer.
        path: the directory to write (created if missing).
        rank: ``None`` writes the chain exactly (rank: the longest stacked chain); an int ``k``
            writes each module's best rank-``k`` approximation (see the report's errors).
        base: the original base model, or its state dict under plain keys
            (``"….q_proj.weight"``), before any chain was merged into it; needed once knots
            were tied without history, after ``merge_and_unload()`` (of this chain, or of an
            earlier one on the same model), or after a plain (merged) checkpoint was loaded
            into the chained model (``load_best_model_at_end`` without the chain's optimizer
            state). Ignored while ``opt.history`` holds every merged link.
        task_type: PEFT's ``task_type``; ``"auto"`` infers it from the model class name
            (``…ForCausalLM`` → ``"CAUSAL_LM"``, …), ``None`` writes none.
        base_model_name_or_path: recorded in the config; default: the model's ``name_or_path``.

    Returns:
        An :class:`AdapterReport` with the rank and the relative errors left.

    Raises:
        TypeError: ``chain`` is not a :class:`~chainopt.ChainLoRAOptimizer`.
        ValueError: a bad ``rank``; knots were tied with ``keep_history=False``,
            ``merge_and_unload()`` was called or a plain checkpoint loaded, and no ``base`` was
            given (or it lacks a weight, or holds one of another shape); PEFT would refuse to
            load the adapter into the model's architecture (Mamba's ``out_proj``, say: see
            :func:`_check_peft_loads`); a chain with ``target_parameters`` on a model that is
            not a Hugging Face one (or without peft), or with ``lora_bias=True``; a target
            parameter that the forwards seen (in this process, or before a loaded optimizer
            state was saved) read only outside its own module's forward (DBRX's experts: PEFT
            would not serve it); an adapted module the model holds at several places (PEFT
            would adapt one). Nothing is written then.
        NonFiniteUpdateError: a link, or a module trained as it is (``trainable_modules``),
            holds NaN/Inf (or a link would overflow its weight); nothing is written.
        ImportError: ``safetensors`` is not installed.

    Example:
        >>> import os, tempfile
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, knot_every=1,
        ...                          keep_history=True)
        >>> def train():  # a trained B, say (a new link's B is 0 and adds no rank)
        ...     with torch.no_grad():
        ...         _ = model[0].parametrizations.weight[0].lora_B.normal_()
        >>> train()
        >>> _ = opt.tie_knot()
        >>> train()  # one merged link and one pending: rank 2 + 2
        >>> with tempfile.TemporaryDirectory() as d:
        ...     report = export_peft_adapter(opt, d)
        ...     files = sorted(os.listdir(d))
        >>> files, report.rank
        (['adapter_config.json', 'adapter_model.safetensors'], 4)
    """
    chain = _check_arguments(chain, rank, base, base_model_name_or_path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type_name(path)}")
    peft = _peft_links(chain)
    if peft:  # a chained PeftModel: its own save_pretrained writes the whole chain
        return _export_peft_chain(chain, Path(path), peft, rank, base)
    try:
        from safetensors.torch import save as safetensors_bytes
    except ImportError as err:
        raise ImportError(
            "export_peft_adapter writes safetensors: pip install safetensors"
        ) from err
    adapter = _build(chain, rank, base, task_type, base_model_name_or_path)
    out_dir = Path(path)
    weights = safetensors_bytes(adapter.tensors, metadata={"format": "pt"})
    text = (json.dumps(adapter.config, indent=2, sort_keys=True) + "\n").encode()

    def write() -> None:  # like every file chainopt writes: atomically, 0600 until complete
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(out_dir / WEIGHTS_NAME, lambda f: f.write(weights))
        write_atomically(out_dir / CONFIG_NAME, lambda f: f.write(text))

    write_once(chain.model, write, f"the adapter to {str(out_dir)!r}")  # FSDP2: rank 0 alone
    return AdapterReport(
        out_dir, adapter.rank, adapter.chain_ranks, adapter.errors, adapter.overall
    )


def peft_adapter_state_dict(
    chain: ChainLoRAOptimizer,
    rank: int | None = None,
    *,
    base: nn.Module | Mapping[str, Tensor] | None = None,
    task_type: str | None = "auto",
    base_model_name_or_path: str | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The whole chain as one PEFT LoRA adapter, in memory: its state dict and its config.

    What :func:`export_peft_adapter` would write, without writing it: the state dict under
    PEFT's saved keys (what ``peft.get_peft_model_state_dict`` returns and
    ``set_peft_model_state_dict`` takes; for a model with injected PEFT layers, such as a
    diffusers UNet, the keys that function gives it, which diffusers' ``save_lora_weights``
    takes), and the config as a dict (``LoraConfig(**config)``). Use it where a training script
    takes ``get_peft_model_state_dict(model)`` by hand: on a chained model that holds only the
    link under way (the merged links are in the base weights), so loaded onto the original base
    it computes another model. The arguments, the exactness and the refusals are
    :func:`export_peft_adapter`'s; under FSDP2 call it on every rank, each gets the whole
    tensors.

    Returns:
        ``(state_dict, config)``; the tensors are on the CPU for chainopt's own links, where the
        model keeps them for PEFT's layers.

    Raises:
        TypeError: ``chain`` is not a :class:`~chainopt.ChainLoRAOptimizer`.
        ValueError: as :func:`export_peft_adapter`.
        NonFiniteUpdateError: as :func:`export_peft_adapter`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
        >>> from chainopt import ChainLoRAOptimizer
        >>> torch.manual_seed(0)
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> original = {k: v.clone() for k, v in model.state_dict().items()}
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, knot_every=2,
        ...                          keep_history=True)
        >>> x = torch.randn(4, 8)
        >>> for _ in range(5):  # two knots and a link under way
        ...     model(x).square().mean().backward()
        ...     opt.step()
        ...     opt.zero_grad()
        >>> state, config = peft_adapter_state_dict(opt)
        >>> config["r"], sorted(state)
        (6, ['base_model.model.0.lora_A.weight', 'base_model.model.0.lora_B.weight'])
        >>> plain = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> _ = plain.load_state_dict(original)
        >>> keys = ("r", "lora_alpha", "target_modules")
        >>> served = get_peft_model(plain, LoraConfig(**{k: config[k] for k in keys}))
        >>> _ = set_peft_model_state_dict(served, state)
        >>> torch.allclose(served(x), model(x), atol=1e-6)
        True
    """
    chain = _check_arguments(chain, rank, base, base_model_name_or_path)
    if _peft_links(chain):  # PEFT's own layers: PEFT's own state dict of the whole chain
        _refuse_options_of_own_links(rank, base)
        if PEFT_SAVE not in vars(chain.model):
            raise ValueError(
                "this chain's PEFT layers are not in a PeftModel or a diffusers model: wrap the "
                "model with peft.get_peft_model before chaining, or deploy the merged model "
                "with chainopt.merged_state_dict"
            )
        state, config = whole_chain_adapter(chain.model)
        return state, config.to_dict()
    adapter = _build(chain, rank, base, task_type, base_model_name_or_path)
    return {k: v.cpu() for k, v in adapter.tensors.items()}, adapter.config


# PEFT's own rule where peft is not installed to run it (peft.tuners.tuners_utils,
# _check_lora_target_modules_mamba): LoRA on these modules of these model types is refused.
_PEFT_REFUSED = {
    ("falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"): {"out_proj", "conv1d"},
}


def _check_peft_loads(model: nn.Module, config: Mapping[str, Any]) -> nn.Module | None:
    """Raise ``ValueError`` if PEFT would refuse to load an adapter of ``config`` into ``model``.

    With peft installed this runs PEFT's own injection (``inject_adapter_in_model``, every check
    its loader makes: per-family target rules, supported module types, the config itself) on a
    meta-device instance of the model's class built from its config, so nothing is allocated
    and the model is untouched. Without peft, or where no such instance can be built (a model
    that is not a Hugging Face one, a class that takes more than its config), PEFT's per-family
    rules (``_PEFT_REFUSED``) are applied by name.

    Returns:
        The meta-device instance with PEFT's layers injected (``None`` where none was built):
        where PEFT put each ``target_parameters`` wrapper.
    """
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        _check_peft_rules(model, config)
        return None
    fields = set(inspect.signature(LoraConfig).parameters)
    try:
        # copies: PEFT edits its config's lists (ensure_weight_tying drops tied modules from
        # modules_to_save), which would change what is written
        lora = LoraConfig(**{k: copy.deepcopy(v) for k, v in config.items() if k in fields})
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"PEFT refuses this adapter's config: {err} (nothing was written)"
        ) from err
    skeleton = _meta_instance(model)
    if skeleton is None:
        _check_peft_rules(model, config)
        return None
    try:
        inject_adapter_in_model(lora, skeleton)
    except Exception as err:  # whatever PEFT's own injection raises, its loader raises too
        # (e.g. AttributeError: a target parameter of a submodule of a module whose own
        # parameter PEFT already wrapped, as Ergo's experts.post_expert_norm.weight)
        raise ValueError(
            f"PEFT would not load this adapter into a {type_name(model)}: "
            f"{type(err).__name__}: {err} (nothing was "
            "written; leave those modules out of target_modules (or target_parameters), or "
            "deploy the merged model "
            "with chainopt.save_merged(opt, path))"
        ) from err
    return skeleton


def _meta_instance(model: nn.Module) -> nn.Module | None:
    """A meta-device instance of a Hugging Face model's class from its config, or ``None``."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not callable(getattr(type(model), "from_pretrained", None)):
        return None
    try:
        with torch.device("meta"):
            skeleton = type(model)(hf_config)
    except Exception:  # a class chainopt cannot rebuild from its config: the rules by name
        return None
    return skeleton if isinstance(skeleton, nn.Module) else None


def _check_peft_rules(model: nn.Module, config: Mapping[str, Any]) -> None:
    """PEFT's per-family target rules (``_PEFT_REFUSED``), by name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for types, refused in _PEFT_REFUSED.items():
        bad = sorted(set(config["target_modules"] or ()) & refused)
        if model_type in types and bad:
            raise ValueError(
                f"PEFT refuses LoRA on {bad} of a {model_type!r} model, so it would not load "
                "this adapter: leave them out of target_modules, or deploy the merged model "
                "with chainopt.save_merged(opt, path); nothing was written"
            )


def _stack(record: ModuleRecord, history: ChainHistory) -> tuple[Tensor, Tensor]:
    """``(B, A)``, ``(out, R)`` and ``(R, in)`` in float32 on the CPU, scales folded into B.

    The merged links (:meth:`~chainopt.ChainHistory.stacked`) and the pending one (left out while
    ``B`` is still zero: it adds nothing).
    """
    link = record.link
    pending = None
    if bool(link.lora_B.detach().any()):
        pending = LinkFactors(_host(link.lora_A), _host(link.lora_B), link.scale)
    stacked = history.stacked(record.name, pending)
    if stacked is None:
        return torch.zeros(link.out_features, 0), torch.zeros(0, link.in_features)
    return stacked


def _bias_update(record: ModuleRecord, history: ChainHistory) -> Tensor:
    """Σ merged bias deltas (from the history) + the pending one, float32 on the CPU."""
    merged = history.bias_sum(record.name)
    delta = record.delta
    pending = torch.zeros(record.link.out_features) if delta is None else _host(delta.delta)
    return pending + (0 if merged is None else merged.cpu())


def _base_tensors(
    base: nn.Module | Mapping[str, Tensor],
    model: nn.Module,
    names: list[str],
    lora_bias: bool,
    param_names: Sequence[str] = (),
) -> dict[str, Tensor]:
    """The original weights (and biases) of the adapted modules, and the original adapted
    parameters (``target_parameters``, under their own names), by plain key, checked."""
    if isinstance(base, nn.Module):
        if base is model or find_adapted(base):
            raise ValueError(
                "base carries chainopt links (the chained model itself?): pass the original "
                "model, or its state dict from before the optimizer was built"
            )
        state = base.state_dict()  # references, no copies
        for name in names:  # a quantized base: its weights dequantized, as PEFT computes them
            if backend_for(base.get_submodule(name)) is not None:
                state[f"{name}.weight"] = _weight(base.get_submodule(name))
    else:  # a Mapping: export_peft_adapter checked the type
        state = dict(base)
    out: dict[str, Tensor] = {}
    for name in names:
        module = _module(model, name)
        weight = _weight(module)
        shapes: dict[str, tuple[int, ...]] = {"weight": tuple(weight.shape)}
        if lora_bias:
            shapes["bias"] = (_out_in(module, weight).shape[0],)
        for kind, shape in shapes.items():
            key = f"{name}.{kind}"
            tensor = state.get(key)
            if not isinstance(tensor, Tensor):
                raise ValueError(f"base has no tensor {key!r} (plain keys, as from_pretrained)")
            if tuple(tensor.shape) != shape:
                raise ValueError(
                    f"base[{key!r}] has shape {tuple(tensor.shape)}, the model's is {shape}"
                )
            out[key] = tensor  # converted one module at a time: no copy of the whole base
    for name in param_names:
        tensor, shape = state.get(name), tuple(_parameter(model, name).shape)
        if not isinstance(tensor, Tensor):
            raise ValueError(f"base has no tensor {name!r} (plain keys, as from_pretrained)")
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"base[{name!r}] has shape {tuple(tensor.shape)}, the model's is {shape}"
            )
        out[name] = tensor
    return out


# --- target_parameters: one (B, A) per expert, PEFT's ParamWrapper layout (chainopt._experts) ---


def _expert_stacks(record: ModuleRecord, history: ChainHistory) -> list[tuple[Tensor, Tensor]]:
    """Per expert ``(Bₑ, Aₑ)``, ``(out, Σ rᵢ)`` and ``(Σ rᵢ, in)`` float32 on the CPU, scales
    folded into B: the merged links of a parameter link and the pending one (if not zero)."""
    link = record.link
    e = link.experts
    links = list(history.links(record.name))
    if bool(link.lora_B.detach().any()):
        links.append(LinkFactors(_host(link.lora_A), _host(link.lora_B), link.scale))
    if not links:
        return [(torch.zeros(link.out_features, 0), torch.zeros(0, link.in_features))] * e
    split = [(*split_experts(f.A.float(), f.B.float(), e), f.scale) for f in links]
    return [
        (
            torch.cat([b_e[i] * scale for b_e, _a, scale in split], dim=1),  # (out, Σr)
            torch.cat([a_e[i] for _b, a_e, _s in split], dim=0),  # (Σr, in)
        )
        for i in range(e)
    ]


def _refuse_read_elsewhere(records: Sequence[ModuleRecord]) -> None:
    """Refuse parameters that the model reads only outside their module's own forward.

    PEFT's ``ParamWrapper`` replaces the module in the tree and adds its LoRA only while the
    module's forward runs: a parameter another module reads (DBRX's experts read
    ``experts.mlp.w1`` of their child and pass it to its forward) would fail to load (PEFT's
    wrapper has no such attribute) or be served without its update. The links record where
    they were read (:class:`~chainopt._experts.ParameterLink`)."""
    bad = [
        r.name
        for r in records
        if isinstance(r.link, ParameterLink) and r.link.read_elsewhere and not r.link.read_in_owner
    ]
    if bad:
        raise ValueError(
            f"target_parameters {bad[:3]} are read by another module than their own (not in "
            "their module's forward: DBRX's experts read experts.mlp.w1 of their child), and "
            "PEFT's ParamWrapper adds the LoRA of a target parameter only inside its module's "
            "forward: PEFT would not load this adapter to the chain's function. Deploy the "
            "merged model with chainopt.save_merged(opt, path); nothing was written"
        )


def _parameter(model: nn.Module, name: str) -> Tensor:
    """The adapted parameter ``"<module>.<param>"`` (its frozen original while linked)."""
    owner, _, param = name.rpartition(".")
    module = model.get_submodule(owner)
    plist = plist_of(module, param)
    return cast(Tensor, plist.original if plist is not None else getattr(module, param))


def _experts_out_in(model: nn.Module, name: str, tensor: Tensor) -> Tensor:
    """A parameter as ``(E, out, in)`` float32 on the CPU (a 2-D one as ``(1, out, in)``; one
    stored ``(E, in, out)``, ``is_transposed``, transposed per expert)."""
    t = _host(tensor)
    if t.dim() == 2:
        return t.unsqueeze(0)
    module = model.get_submodule(name.rpartition(".")[0])
    return t.mT if getattr(module, "is_transposed", False) else t


def _current_parameter(model: nn.Module, name: str, record: ModuleRecord | None) -> Tensor:
    """The parameter now, pending link included, as ``(E, out, in)`` (see above)."""
    now = _parameter(model, name) if record is None else merged_weight(record, torch.float32)
    return _experts_out_in(model, name, now)


def _parameter_keys(
    model: nn.Module, skeleton: nn.Module | None, names: Sequence[str]
) -> dict[str, str]:
    """Where PEFT puts each parameter's wrapper (``"<module>[.base_layer…]"``: PEFT nests the
    wrappers of a module's parameters), found on the meta-device model PEFT injected.

    Raises:
        ValueError: no such model could be built (not a Hugging Face model, or peft missing).
    """
    if skeleton is None:
        raise ValueError(
            "export_peft_adapter writes target_parameters only for a Hugging Face model with "
            f"peft installed (PEFT nests a module's parameter wrappers; chainopt reads where "
            f"from PEFT itself), not a {type_name(model)}: deploy the merged model with "
            "chainopt.save_merged(opt, path); nothing was written"
        )
    keys: dict[str, str] = {}
    for wrapper_name, wrapper in skeleton.named_modules():
        param = getattr(wrapper, "parameter_name", None)
        if type(wrapper).__name__ == "ParamWrapper" and isinstance(param, str):
            keys[f"{wrapper_name.replace('.base_layer', '')}.{param}"] = wrapper_name
    missing = [n for n in names if n not in keys]
    if missing:  # pragma: no cover - PEFT matched the full names in the config itself
        raise ValueError(f"PEFT put no parameter wrapper on {missing[:3]}; nothing was written")
    return {n: keys[n] for n in names}


def _host(tensor: Tensor) -> Tensor:
    """A whole float32 CPU copy (gathered if sharded)."""
    return full_tensor(tensor.detach()).float().cpu()


def _module(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    if not is_linear_like(module):  # pragma: no cover - chainopt adapts Linear and Conv1D only
        raise TypeError(f"{name!r} is a {type_name(module)}, not a Linear or Conv1D")
    return module


def _weight(module: nn.Module) -> Tensor:
    """The frozen weight, dense: under the link while adapted, the plain weight after unloading;
    a quantized layer's master or dequantized weight."""
    quant = quantized_weight(module)
    if quant is not None:
        return quant.dense()
    backend = backend_for(module)
    if backend is not None:  # unloaded, or the quantized base itself
        return backend.dequantize(module)
    if plist_of(module, "weight") is not None:  # the dense kind's link
        return original(module)
    weight = module.weight
    if not isinstance(weight, Tensor):  # pragma: no cover - Linear and Conv1D have one
        raise TypeError(f"{type_name(module)} has no weight tensor")
    return weight


def _out_in(module: nn.Module, weight: Tensor) -> Tensor:
    """``weight`` as an ``(out, in)`` float32 CPU tensor (Conv1D stores it transposed)."""
    w = _host(weight)
    return w.T if is_conv1d(module) else w


def _current_weight(module: nn.Module, record: ModuleRecord | None) -> Tensor:
    """The module's weight now, pending link included, ``(out, in)`` in float32 on the CPU
    (``record`` is ``None`` after ``merge_and_unload``)."""
    if record is None:
        return _out_in(module, _weight(module))
    return _out_in(module, merged_weight(record, torch.float32))


def _current_bias(model: nn.Module, name: str, record: ModuleRecord | None) -> Tensor:
    """The module's bias now, pending delta included, in float32 on the CPU."""
    plain = _module(model, name).bias
    if (record is None or record.delta is None) and isinstance(plain, Tensor):
        return _host(plain)
    bias = None if record is None else merged_bias(record, torch.float32)
    if bias is None:  # pragma: no cover - lora_bias exports only modules with a bias
        raise ValueError(f"{name!r} has no bias")
    return bias.cpu()


def _was_peft_chain(chain: ChainLoRAOptimizer) -> bool:
    """Whether the chain's modules are PEFT LoRA layers (a chained ``PeftModel``, unloaded)."""
    names = dict(chain.model.named_modules())
    return any(is_peft_lora_layer(names[n]) for n in chain.config.modules if n in names)


def _chain_rank(chain: ChainLoRAOptimizer, name: str, record: ModuleRecord | None) -> int | None:
    """``Σ rᵢ`` over the merged links, and the pending one unless it is still zero, plus what
    earlier chains had merged into the module when this one was built (``None``: not known;
    the export then keeps every rank).

    The most rank the module's ``W − W₀`` can have (what its history would stack); ``record``
    is ``None`` after ``merge_and_unload``, which merged the last link.
    """
    pending = record is None or bool(record.link.lora_B.detach().any())
    own = sum(chain.link_rank(i) for i in range(chain.knots_tied + int(pending)))
    earlier = chain.chain.merged_before.get(name, 0)
    return None if earlier is None else own + earlier


def _pad(t: Tensor, r: int, dim: int) -> Tensor:
    """Zero-pad ``t`` to size ``r`` along ``dim`` (extra rank that adds nothing)."""
    missing = r - t.shape[dim]
    if missing > 0:
        shape = list(t.shape)
        shape[dim] = missing
        t = torch.cat([t, t.new_zeros(shape)], dim=dim)
    return t.contiguous()


def _modules_to_save(chain: ChainLoRAOptimizer) -> list[str]:
    """Modules whose own parameters train as they are (``trainable_modules``), outermost only.

    Every module holding such a parameter counts, a tied one included (an ``lm_head`` sharing
    the trained embedding's weight): PEFT gives each saved module its own copy, so a tied
    partner left out would keep the original weight on the base model."""
    factors = {id(p) for p in chain.factors()}
    owners: set[str] = set()
    for name, p in chain.model.named_parameters(remove_duplicate=False):
        if p.requires_grad and id(p) not in factors:
            owner = name.rpartition(".")[0]
            if not owner:
                raise ValueError(
                    f"parameter {name!r} of the root module trains outside the chain; PEFT can "
                    "only save whole submodules (modules_to_save)"
                )
            owners.add(owner)
    return sorted(o for o in owners if not any(o.startswith(f"{other}.") for other in owners))


def _tied(model: nn.Module, owners: list[str]) -> bool:
    """Whether two of the modules ``owners`` hold one Parameter (tied weights)."""
    held = [id(p) for o in owners for p in model.get_submodule(o).parameters()]
    return len(held) != len(set(held))


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
