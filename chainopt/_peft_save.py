"""The model's own adapter save writes the whole chain: a chained ``PeftModel``'s
``save_pretrained`` and a diffusers model's ``save_lora_adapter``.

A chain of PEFT's own layers (:mod:`chainopt._peft_layers`) merges each link into the base
weights, so PEFT's save alone would write only the link under way. The methods installed here
write every link instead, as one adapter of rank Σr in PEFT's own format (PEFT's own save and
``get_peft_model_state_dict`` do the writing, over the chain's tensors): each layer's factors
become ``B = [s₁B₁ … sₖBₖ]`` and ``A = [A₁; …; Aₖ]``, zero-padded to the largest ``Σ rᵢ = R``,
and the config is the user's with ``r = lora_alpha = R`` (scale 1), ``use_rslora=False`` and no
patterns. Loaded onto the original base model the adapter computes the trained function, to
float32 rounding. A layer whose base weight PEFT's save writes too (a targeted ``embed_tokens``
or ``lm_head``, ``save_embedding_layers``) is written as it is: the merged links in that weight,
the link under way in its factors (:func:`bases_written`). The methods are bound to the model
and read their state from it (:class:`ChainSave`), so a deep copy saves its own chain.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from peft import LoraConfig, get_peft_model
    >>> from chainopt import ChainLoRAOptimizer
    >>> model = get_peft_model(nn.Sequential(nn.Linear(6, 4)),
    ...                        LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          knot_every=5)
    >>> _ = opt.tie_knot()
    >>> tensors, rank = whole_chain_tensors(chained_links(model), opt.history)
    >>> rank, sorted(tensors)[0]
    (4, 'base_model.model.0.lora_A.default.weight')
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import sys
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from torch import Tensor, nn

from ._dtensor import full_tensor
from ._marks import (
    PEFT_AWAITING,
    PEFT_SAVE,
    PLAIN_LOAD,
    base_merged,
    is_chainopt,
    mark_merged_save,
)
from ._peft_layers import PeftLink, link_of
from .guard import NonFiniteUpdateError
from .history import ChainHistory, LinkFactors

__all__ = [
    "AWAITING",
    "SIDECAR",
    "ChainSave",
    "RefusedAdapterSave",
    "adapter_save_method",
    "bases_written",
    "chain_config",
    "chained_links",
    "install_whole_chain_save",
    "refuse_adapter_saves",
    "warn_no_adapter_save",
    "whole_chain",
    "whole_chain_adapter",
    "whole_chain_tensors",
]

SIDECAR = "chainopt_chain.json"  # written next to a whole-chain adapter by save_pretrained
AWAITING = PEFT_AWAITING  # PeftModel.__dict__: load_adapter skipped a chain's own save

ChainRestore = Callable[[dict[str, Any]], None]
"""Loads a chain's state dict (``ChainLoRAOptimizer.load_state_dict``)."""
OPTIMIZER_FILE = "optimizer.pt"  # where the HF Trainer saves the optimizer's (the chain's) state


def _key(name: str, link: PeftLink, part: str) -> str:
    if link.kind == "Embedding":
        return f"{name}.lora_embedding_{part}.{link.adapter}"
    return f"{name}.lora_{part}.{link.adapter}.weight"


def whole_chain_tensors(
    links: list[tuple[str, PeftLink]], history: ChainHistory, merged_base: Collection[str] = ()
) -> tuple[dict[str, Tensor], int]:
    """PEFT state-dict entries (live keys, adapter name in them) writing the whole chain.

    Each layer's factors become ``B = [s₁B₁ … sₖBₖ]`` and ``A = [A₁; …; Aₖ]`` over the merged
    links and the pending one (scales folded into B), zero-padded to the largest ``Σ rᵢ``. A
    layer named in ``merged_base`` has its base weight written as it is now, the merged links
    in it (PEFT's ``save_embedding_layers``, see :func:`bases_written`): its factors are the
    pending link alone, so that the file does not hold the merged links twice.

    Returns:
        The tensors (float32, host) and the rank ``R`` they are padded to (scale 1 = ``R / R``).

    Raises:
        NonFiniteUpdateError: a factor is NaN/Inf (nothing is written).
    """
    stacks: dict[str, tuple[Tensor, Tensor]] = {}
    for name, link in links:
        pending = LinkFactors(
            link.lora_A.detach().float().cpu(), link.lora_B.detach().float().cpu(), link.scale
        )
        chained = [pending] if name in merged_base else [*history.links(name), pending]
        e = link.experts  # fused experts: stack each expert's factors (PEFT's layout), E = 1 else
        # B (out, r, E, …) and A (E, r, in, …) per link -> (out, Σr, E, …) and (E, Σr, in, …);
        # "…": a convolution's kernel dimensions (E = 1 there)
        b = torch.cat(
            [(f.B * f.scale).reshape(f.B.shape[0], -1, e, *f.B.shape[2:]) for f in chained], dim=1
        )
        a = torch.cat([f.A.reshape(e, -1, *f.A.shape[1:]) for f in chained], dim=1)
        stacks[name] = b, a
    rank = max([b.shape[1] for b, _ in stacks.values()] + [1])
    tensors: dict[str, Tensor] = {}
    for name, link in links:
        b, a = stacks[name]
        e = link.experts
        a_full = a.new_zeros(e, rank, *a.shape[2:])
        a_full[:, : a.shape[1]] = a  # (E, R, in, …)
        b_full = b.new_zeros(b.shape[0], rank, e, *b.shape[3:])
        b_full[:, : b.shape[1]] = b  # (out, R, E, …)
        tensors[_key(name, link, "A")] = a_full.reshape(e * rank, *a.shape[2:]).contiguous()
        tensors[_key(name, link, "B")] = b_full.reshape(b.shape[0], rank * e, *b.shape[3:])
    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteUpdateError(f"refusing to save the chain's adapter: non-finite {bad[:3]}")
    return tensors, rank


def chain_config(config: Any, rank: int) -> Any:
    """A copy of the adapter's ``LoraConfig`` for the whole chain: ``r = lora_alpha = rank``
    (scale 1: the links' scales are folded into B), ``use_rslora=False``, no patterns."""
    config = copy.deepcopy(config)
    config.r, config.lora_alpha, config.use_rslora = rank, rank, False
    config.rank_pattern, config.alpha_pattern = {}, {}
    return config


@dataclass
class ChainSave:
    """What a model's whole-chain save needs, kept on the model (``__dict__[PEFT_SAVE]``), so
    that ``copy.deepcopy`` of the model (or of the optimizer, which copies its model) saves the
    copy's chain: the links are found on the model itself, the history and the optimizer's
    ``load_state_dict`` are copied along.

    Attributes:
        adapter: the chained adapter's name.
        history: the chain's history (its merged links).
        restore: the optimizer's ``load_state_dict`` (``None``: nothing to restore into).
    """

    adapter: str
    history: ChainHistory
    restore: ChainRestore | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> ChainSave:
        """The copy's history, and ``restore`` bound to the copied optimizer when the optimizer
        is being copied too (``copy.deepcopy(opt)``); ``None`` for a copy of the model alone,
        which has no optimizer (deep-copying the bound method copied the optimizer from inside
        the half-built model copy, and raised ``AttributeError``)."""
        owner = getattr(self.restore, "__self__", None)
        twin = memo.get(id(owner)) if owner is not None else None
        restore = getattr(twin, self.restore.__name__) if twin is not None else None  # type: ignore[union-attr]
        return ChainSave(self.adapter, copy.deepcopy(self.history, memo), restore)


def chained_links(model: nn.Module) -> list[tuple[str, PeftLink]]:
    """``(name, link)`` of every chained PEFT layer of ``model``, in model order."""
    return [(n, link) for n, m in model.named_modules() if (link := link_of(m)) is not None]


def install_whole_chain_save(model: nn.Module, save: ChainSave) -> bool:
    """Make the model's own adapter save write the whole chain as one adapter of rank Σr.

    On a ``PeftModel``: ``save_pretrained`` (and ``load_adapter``, see below; and
    ``add_weighted_adapter``, refused for the chained adapter after a knot). On a diffusers
    model with injected layers (``unet.add_adapter(...)``): ``save_lora_adapter``, which
    diffusers' ``load_lora_adapter`` reads back. Loaded onto the original base, the adapter
    computes the trained function (to float32 rounding); its config is :func:`chain_config`'s.
    A ``PeftModel`` save also writes a sidecar ``chainopt_chain.json``: ``load_adapter`` of such
    a directory into the chained adapter (the HF Trainer's resume and ``load_best_model_at_end``)
    brings the chain back to the state saved beside it (a Trainer checkpoint's ``optimizer.pt``,
    through ``save.restore``); without one it loads nothing and the chain refuses to step until
    its state dict is loaded. The methods are bound to the model (a deep copy rebinds them).

    Returns:
        Whether a save was installed (``False``: a model with neither method).
    """
    kind = adapter_save_method(model)
    if kind == "save_pretrained":
        methods: dict[str, Callable[..., Any]] = {
            "save_pretrained": _save_pretrained,
            "load_adapter": _load_adapter,
            "add_weighted_adapter": _add_weighted_adapter,
        }
        # chainopt's merged save is not a PEFT save
        drop: tuple[str, ...] = ("save_pretrained", "load_adapter", "add_weighted_adapter")
    elif kind == "save_lora_adapter":
        methods = {"save_lora_adapter": _save_lora_adapter, "save_pretrained": _refuse_save}
        drop = ("save_pretrained", "save_lora_adapter")
    else:
        return False
    for method in drop:
        installed = model.__dict__.get(method)
        if installed is not None and is_chainopt(installed):
            del model.__dict__[method]
    model.__dict__[PEFT_SAVE] = save
    for name, function in methods.items():
        model.__dict__[name] = MethodType(function, model)
    return True


def bases_written(
    model: Any, adapter: str, state: dict[str, Tensor], save_embedding_layers: Any = "auto"
) -> set[str]:
    """The chained layers whose base weight PEFT's adapter save writes too, as it is now.

    PEFT writes the embedding and output layers' base weights beside the adapter
    (``save_embedding_layers``: by default when the ``LoraConfig`` targets ``embed_tokens`` or
    ``lm_head``), and ``from_pretrained`` loads them over the base model's. After a knot such a
    weight holds the merged links, so the adapter must not add them again. PEFT's own
    ``get_peft_model_state_dict`` says which keys it writes.
    """
    from peft.utils import get_peft_model_state_dict

    keys = get_peft_model_state_dict(
        model, state_dict=state, adapter_name=adapter, save_embedding_layers=save_embedding_layers
    )
    return {name for name, link in chained_links(model) if link.weight_name(name) in keys}


def _embedding_layers(model: Any) -> set[int]:
    """``id`` of the model's input and output embedding layers (transformers'
    ``get_input_embeddings``/``get_output_embeddings``), those whose base weight PEFT's save may
    write."""
    found = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            layer = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            layer = None
        if isinstance(layer, nn.Module):
            found.add(id(layer))
    return found


def warn_no_adapter_save(model: nn.Module) -> None:
    """Warn that the chained model's PEFT layers have no adapter save of their own that writes
    the whole chain (:func:`install_whole_chain_save` found none): a model with PEFT layers
    injected by hand, or the model inside a ``PeftModel`` (``peft_model.get_base_model()``),
    whose ``save_pretrained`` chainopt cannot reach and would write the link under way only."""
    from .advice import ChainLoRAWarning  # (advice imports the records)

    warnings.warn(
        f"this {type(model).__name__} holds PEFT LoRA layers but has no adapter save of its own "
        "(it is no PeftModel, nor a diffusers model with save_lora_adapter), so no save of it "
        "writes the whole chain: if it is the model inside a PeftModel "
        "(peft_model.get_base_model()), that PeftModel's save_pretrained, like PEFT's "
        "get_peft_model_state_dict, writes only the link under way, and loaded onto the "
        "original base it is another model. Chain the PeftModel itself, "
        "ChainLoRAOptimizer(peft_model, ...), whose save_pretrained writes the whole chain; "
        "or deploy the merged model (chainopt.save_merged, merged_state_dict)",
        ChainLoRAWarning,
        stacklevel=3,
    )


def whole_chain(
    model: Any, state: dict[str, Tensor] | None = None, save_embedding_layers: Any = "auto"
) -> tuple[ChainSave, dict[str, Tensor], int, set[str]]:
    """The chain's save state, the whole chain's tensors, their rank, and the layers whose base
    weight the save writes (:func:`bases_written`, over ``state``, the model's by default: their
    tensors are the link under way). Refused after a load replaced the base weights under the
    links without the chain's optimizer state (``chainopt._load_guard.loaded_plain_weights``):
    the history then no longer describes ``W - W₀``, and the adapter would be another model."""
    save: ChainSave = model.__dict__[PEFT_SAVE]
    if model.__dict__.get(PLAIN_LOAD):
        raise ValueError(
            "refusing to save the chained adapter: a load replaced the chained model's base "
            "weights without the chain's optimizer state (a model-only load_state_dict, or one "
            "with a step between), so opt.history no longer describes their update over the "
            "original base, and the adapter would compute another model; nothing was written. "
            "Load the optimizer state saved with those weights (opt.load_state_dict, or "
            "chainopt.load_checkpoint), or deploy the merged model with chainopt.save_merged"
        )
    if base_merged(model):
        raise ValueError(_MERGED_BASE.format(what="the chained adapter"))
    links = chained_links(model)
    merged: set[str] = set()
    # before the first knot every base weight is the original one; PEFT writes the base weights
    # of the input and output embeddings only (asking it costs a Hub lookup where it checks for a
    # resized vocabulary)
    embeddings = _embedding_layers(model)
    if len(save.history) > 0 and any(id(link.layer) in embeddings for _n, link in links):
        state = dict(model.state_dict()) if state is None else state
        merged = bases_written(model, save.adapter, state, save_embedding_layers)
    tensors, rank = whole_chain_tensors(links, save.history, merged)
    factors = {id(t) for _name, link in links for t in (link.lora_A, link.lora_B)}
    trained = [  # modules_to_save, trainable tokens: written as they are, NaN/Inf checked here,
        n  # whole under FSDP2 (a collective, every rank in the same order: one verdict)
        for n, p in model.named_parameters()
        if p.requires_grad
        and id(p) not in factors
        and not bool(torch.isfinite(full_tensor(p.detach())).all())
    ]
    if trained:
        raise NonFiniteUpdateError(
            f"refusing to save the chained adapter: {trained[:3]} ({len(trained)} in all) train "
            "outside the links and hold NaN/Inf (a NaN/Inf gradient reached them); nothing was "
            "written. Resume from the last checkpoint"
        )
    return save, tensors, rank, merged


def whole_chain_adapter(model: Any) -> tuple[dict[str, Tensor], Any]:
    """What PEFT's ``get_peft_model_state_dict(model)`` returns for the chained adapter, with the
    whole chain in it (one adapter of rank Σr), and the ``LoraConfig`` it loads with."""
    from peft.utils import get_peft_model_state_dict

    state = dict(model.state_dict())
    save, tensors, rank, _merged = whole_chain(model, state)
    state.update(tensors)
    saved = model.peft_config[save.adapter]
    config = chain_config(saved, rank)
    model.peft_config[save.adapter] = config
    try:
        layers = get_peft_model_state_dict(model, state_dict=state, adapter_name=save.adapter)
    finally:
        model.peft_config[save.adapter] = saved
    return dict(layers), config


def _save_pretrained(
    self: Any, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any
) -> None:
    """``PeftModel.save_pretrained`` writing the whole chain (see
    :func:`install_whole_chain_save`)."""
    given = kwargs.pop("state_dict", None)
    state = dict(given if given is not None else self.state_dict())
    bound = inspect.signature(type(self).save_pretrained).bind(
        self, save_directory, *args, **kwargs
    )
    embedding = bound.arguments.get("save_embedding_layers", "auto")
    save, tensors, rank, _merged = whole_chain(self, state, embedding)
    state.update(tensors)
    saved = self.peft_config[save.adapter]
    self.peft_config[save.adapter] = chain_config(saved, rank)
    try:
        type(self).save_pretrained(self, save_directory, *args, state_dict=state, **kwargs)
    finally:
        self.peft_config[save.adapter] = saved
    mark_merged_save(self)  # the next opt.state_dict() carries the merged base weights
    selected = kwargs.get("selected_adapters") or list(self.peft_config)
    out = Path(save_directory)
    out = out if save.adapter == "default" else out / save.adapter
    if save.adapter in selected and out.is_dir():
        sidecar = {"adapter": save.adapter, "rank": rank, "knots": len(save.history)}
        (out / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")


def _load_adapter(self: Any, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
    """``PeftModel.load_adapter``; a chain's own save into the chained adapter brings the chain
    back instead (see :func:`install_whole_chain_save`)."""
    save: ChainSave = self.__dict__[PEFT_SAVE]
    where = Path(str(model_id))
    if adapter_name != save.adapter and len(save.history) > 0:
        from .advice import ChainLoRAWarning  # (advice imports the records)

        warnings.warn(
            f"load_adapter({str(model_id)!r}, {adapter_name!r}): this PeftModel's base weights "
            f"hold the {len(save.history)} merged link(s) of the chained adapter "
            f"{save.adapter!r}, so {adapter_name!r} will run on the chain's merged model, not on "
            "the original base it was trained on. To use it as trained, load it onto the "
            "original base: PeftModel.from_pretrained(base, path)",
            ChainLoRAWarning,
            stacklevel=2,
        )
    if adapter_name != save.adapter or not (where / SIDECAR).is_file():
        return type(self).load_adapter(self, model_id, adapter_name, *args, **kwargs)
    # The live link has PEFT's rank, not Σr: the chain's state dict brings back the merged
    # weights and the link, all of it. Without one, nothing is loaded and the chain refuses to
    # step until its state dict is.
    if save.restore is not None and (where / OPTIMIZER_FILE).is_file():
        save.restore(torch.load(where / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    else:
        self.__dict__[AWAITING] = str(model_id)
    return None


def _add_weighted_adapter(self: Any, adapters: Any, *args: Any, **kwargs: Any) -> None:
    """PEFT's ``add_weighted_adapter`` (``LoraModel``'s, which ``PeftModel`` forwards to),
    refused for the chained adapter after a knot: its factors are then only the link under way
    (the merged links live in the base weights), so the combination would be another model,
    silently (saved, it loads onto the original base without the merged links)."""
    save: ChainSave = self.__dict__[PEFT_SAVE]
    if len(save.history) > 0 and save.adapter in list(adapters):
        raise ValueError(
            f"add_weighted_adapter({list(adapters)!r}, ...): after {len(save.history)} knot(s) "
            f"the chained adapter {save.adapter!r} holds only the link under way (the merged "
            "links are in this model's base weights), so a combination of it would be another "
            "model; nothing was added. Save the whole chain (save_pretrained(dir)), load it onto "
            "the original base (PeftModel.from_pretrained(base, dir, adapter_name=...)) with the "
            "other adapters, and combine them there"
        )
    self.base_model.add_weighted_adapter(adapters, *args, **kwargs)


def foreign_factors_problem(model: nn.Module, state_dict: Any, prefix: str = "") -> str | None:
    """Why loading ``state_dict`` into a chained ``PeftModel`` would not give the model it
    describes, or ``None``.

    After a knot the base weights hold the chain's merged links. A state dict that sets the
    chained adapter's factors without the base weights under them (``load_adapter`` of an
    adapter saved elsewhere, ``set_peft_model_state_dict``, a partial ``load_state_dict``) was
    made for some other base (the original one, as PEFT's adapters are): loaded, the model would
    compute the merged links plus that adapter. A chain's own save (with its sidecar) is brought
    back by ``load_adapter`` through the chain's state instead (:func:`_load_adapter`)."""
    save = model.__dict__.get(PEFT_SAVE)
    if not isinstance(save, ChainSave) or len(save.history) == 0:
        return None  # no knot yet: the base is the original one, the load is exact
    for name, link in chained_links(model):
        keys = [f"{prefix}{_key(name, link, part)}" for part in ("A", "B")]
        base = f"{prefix}{name}.base_layer."
        if any(k in state_dict for k in keys) and not any(k.startswith(base) for k in state_dict):
            return (
                f"it sets the factors of the chained adapter {save.adapter!r} ({keys[0]!r}, ...) "
                f"without the base weights under them, but the base weights hold the chain's "
                f"{len(save.history)} merged link(s): the model would compute those links plus "
                "the loaded adapter, not the adapter. Load an adapter saved elsewhere onto the "
                "original base (PeftModel.from_pretrained(base, path)), or into another adapter "
                "name; a chain's own save_pretrained directory loads back through load_adapter"
            )
    return None


_MERGED_BASE = (
    "refusing to save {what}: this model's base weights hold a chain that merge_and_unload() "
    "merged, so an adapter saved over them would compute another model on the original base "
    "(the one the adapter's config names); nothing was written. Save the fine-tuned model "
    "itself: peft_model.merge_and_unload().save_pretrained(dir) (diffusers: fuse_lora() and "
    "save_pretrained), or chainopt.merged_state_dict(model); an adapter of the whole chain is "
    "the chain's own save_pretrained before opt.merge_and_unload()"
)


def refuse_adapter_saves(model: nn.Module) -> None:
    """After :func:`chainopt.merge_and_unload` of a model whose own adapter save wrote the chain:
    that save (a ``PeftModel``'s ``save_pretrained``, a diffusers model's ``save_lora_adapter``)
    refuses from now on, where PEFT's own would write the zero link as the adapter for the
    original base (the fine-tuned function lives in the base weights). PEFT's
    ``merge_and_unload()`` gives the plain model, whose save is the fine-tuned one."""
    method = adapter_save_method(model)
    if method is not None:
        model.__dict__[method] = RefusedAdapterSave(type(model).__name__)


def adapter_save_method(model: nn.Module) -> str | None:
    """The method that saves ``model``'s PEFT adapter: ``"save_pretrained"`` for a ``PeftModel``,
    ``"save_lora_adapter"`` for a diffusers model with injected layers, else ``None``."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        return "save_pretrained"
    if callable(getattr(model, "save_lora_adapter", None)) and hasattr(model, "peft_config"):
        return "save_lora_adapter"
    return None


@dataclass(frozen=True)
class RefusedAdapterSave:
    """The adapter save of a model whose chain was merged and unloaded (see
    :func:`refuse_adapter_saves`): a plain object, not a bound method, so the model still
    pickles (``torch.save(model)``) and deep-copies.

    Attributes:
        owner: the model's class name, for the message.
    """

    owner: str

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """Refuse; nothing is written."""
        raise ValueError(_MERGED_BASE.format(what=f"an adapter of this {self.owner}"))


def _refuse_save(self: Any, *args: Any, **kwargs: Any) -> None:
    """A diffusers model with injected PEFT layers: ``save_pretrained`` would write PEFT's
    ``base_layer``/``lora_*`` keys (the link under way apart from the merged ones), which
    ``from_pretrained`` does not load: refused, nothing written."""
    raise ValueError(
        f"{type(self).__name__}.save_pretrained on a chained model with injected PEFT layers "
        "would write PEFT's base_layer/lora keys, which from_pretrained does not load; nothing "
        "was written. Save the chain as an adapter with save_lora_adapter(dir) (the whole "
        "chain, for load_lora_adapter on the original model), or merge it first: "
        "opt.merge_and_unload(), then diffusers' fuse_lora()/unload_lora() and save_pretrained"
    )


def _save_lora_adapter(
    self: Any,
    save_directory: str | os.PathLike[str],
    adapter_name: str = "default",
    upcast_before_saving: bool = False,
    safe_serialization: bool = True,
    weight_name: str | None = None,
) -> None:
    """diffusers' ``save_lora_adapter`` with the whole chain: the same file, keys and metadata
    diffusers writes (PEFT's ``get_peft_model_state_dict`` over the chain's tensors)."""
    save: ChainSave = self.__dict__[PEFT_SAVE]
    if adapter_name != save.adapter:
        type(self).save_lora_adapter(self, save_directory, adapter_name, upcast_before_saving,
                                     safe_serialization, weight_name)  # fmt: skip
        return
    from diffusers.loaders.lora_base import (
        LORA_ADAPTER_METADATA_KEY,
        LORA_WEIGHT_NAME,
        LORA_WEIGHT_NAME_SAFE,
    )

    layers, config = whole_chain_adapter(self)
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory must be a directory, got the file {save_directory}")
    os.makedirs(save_directory, exist_ok=True)
    layers = {k: v.detach().cpu().float().contiguous() for k, v in layers.items()}
    if safe_serialization:
        from safetensors.torch import save_file

        meta = {k: list(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
        metadata = {
            "format": "pt",
            LORA_ADAPTER_METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True),
        }
        save_file(layers, str(Path(save_directory, weight_name or LORA_WEIGHT_NAME_SAFE)),
                  metadata=metadata)  # fmt: skip
    else:
        torch.save(layers, Path(save_directory, weight_name or LORA_WEIGHT_NAME))
