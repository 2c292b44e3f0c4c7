"""Hugging Face ``save_pretrained`` on a chained model writes the fine-tuned model.

A model that carries chainopt links would save ``….parametrizations.weight.original`` and the
factors, which ``from_pretrained`` ignores (it re-initialises the adapted weights). Every model a
``ChainLoRAOptimizer`` wraps gets, on the instance, a ``save_pretrained`` that writes
:func:`chainopt.merged_state_dict` instead: plain keys, every link merged, what stock
``from_pretrained`` loads as the fine-tuned model, with no missing or unexpected keys. So a
script's own last line (``model.save_pretrained(out)``, ``trainer.save_model()``) deploys.

Resuming is not lost: a save marks the model (:func:`chainopt._marks.mark_merged_save`), and the
optimizer's next ``state_dict()`` carries the chain's own tensors. A ``Trainer`` checkpoint is
``save_pretrained`` then ``optimizer.state_dict()``, so it holds both and resumes bitwise: the
chained model loads the merged weights (as a zero link on top), then the optimizer's state puts
the originals and factors back. Inside :func:`saving_for_resume` the save writes the parametrized
keys as they are. Torch only: nothing here imports transformers.

A ``save_pretrained`` that takes no ``state_dict=`` (diffusers' ``ModelMixin``, whose pipelines
save each component through it) reads ``model.state_dict()`` itself: the guard runs it inside
:func:`saving_merged`, where a state-dict post-hook that every chained model gets
(:func:`guard_state_dict_saves`) gives the merged plain keys. The same hook serves the saves
that read ``model.state_dict()`` behind the chained model's back, each recognised by its code
object on the call stack (``_DEPLOY_SAVES``): Accelerate's ``Accelerator.save_model``,
Lightning's checkpoint dump (see :mod:`chainopt.integrations.lightning`), and the class
``save_pretrained`` of a transformers or diffusers model that holds the chained one. Every other
``model.state_dict()`` keeps the chain's own keys: it is what resumes training.

Example:
    >>> from torch import nn
    >>> guard_save_pretrained(nn.Linear(2, 2))  # not a Hugging Face model: nothing to install
    False
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import MethodType
from typing import Any, Protocol, cast

from torch import Tensor, nn

from ._dtensor import gathered
from ._layers import find_adapted
from ._marks import CLEARED_IS_QUANTIZED, mark_merged_save, nested
from ._marks import MERGED_SAVES as _MERGED_SAVES
from ._marks import OWN_STATE as _OWN_STATE
from ._marks import RESUME_SAVES as _RESUME_SAVES
from ._marks import STATE_DICT_HOOK as _HOOK
from ._peft_layers import has_peft_layers
from ._peft_save import adapter_save_method
from ._rank_zero import write_once
from ._validate import type_name
from .advice import ChainLoRAWarning
from .export import adapted_modules, merged_state_dict, own_state_dict
from .guard import NonFiniteUpdateError

__all__ = [
    "ParametrizedCheckpointWarning",
    "accept_as_adapted",
    "guard_save_pretrained",
    "guard_state_dict_saves",
    "prepare_hf_model",
    "save_merged",
    "saving_for_resume",
    "saving_merged",
]


class _HasModel(Protocol):
    model: nn.Module


_READY = "_chainopt_merged_ready"  # instance attribute: a merged dict computed for this save
# Deploy saves of other libraries that read model.state_dict() themselves: (module, qualname).
_DEPLOY_SAVES = (
    ("accelerate.accelerator", "Accelerator.save_model", "accelerate"),
    ("lightning.pytorch.trainer.connectors.checkpoint_connector",
     "_CheckpointConnector.dump_checkpoint", "lightning"),
    ("pytorch_lightning.trainer.connectors.checkpoint_connector",
     "_CheckpointConnector.dump_checkpoint", "lightning"),
    # save_pretrained of a model that holds the chained one (whose own is guarded)
    ("transformers.modeling_utils", "PreTrainedModel.save_pretrained", "save_pretrained"),
    ("diffusers.models.modeling_utils", "ModelMixin.save_pretrained", "save_pretrained"),
)  # fmt: skip
_PARAMETRIZED = ".parametrizations."


class ParametrizedCheckpointWarning(UserWarning):
    """``save_pretrained`` was given a state dict with chainopt's parametrized keys that is not
    the model's own, and wrote it as given: ``from_pretrained`` ignores those keys.

    Pass ``state_dict=chainopt.merged_state_dict(model)`` (plain keys, links merged) instead,
    or save inside :func:`saving_for_resume` to write the chain's own keys on purpose.

    Example:
        >>> from chainopt import ChainLoRAWarning, ParametrizedCheckpointWarning
        >>> issubclass(ParametrizedCheckpointWarning, UserWarning)
        True
    """


def guard_save_pretrained(model: nn.Module) -> bool:
    """Make ``model.save_pretrained`` write the merged model while it carries chainopt links.

    Installed on the instance (so ``copy.deepcopy`` copies it bound to the copy); a model with no
    links left, or a save inside :func:`saving_for_resume`, saves as the class does.

    Args:
        model: the model; anything without a ``save_pretrained`` method is left alone.

    Returns:
        Whether the method is installed (``False`` for a model without ``save_pretrained`` or
        one whose ``save_pretrained`` is already overridden on the instance by something else).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> from torch import nn
        >>> guard_save_pretrained(nn.Linear(2, 2))  # not a Hugging Face model: nothing to install
        False
    """
    _require_module(model)
    current = model.__dict__.get("save_pretrained")
    if isinstance(current, MethodType) and current.__func__ is _merged_save_pretrained:
        return True
    if current is not None or not callable(getattr(type(model), "save_pretrained", None)):
        return False
    model.__dict__["save_pretrained"] = MethodType(_merged_save_pretrained, model)
    return True


@contextmanager
def saving_for_resume(model: nn.Module) -> Iterator[None]:
    """Within this block, ``model.save_pretrained`` writes the chain's parametrized keys.

    Such a folder resumes training through ``model.load_state_dict`` alone but is no deployable
    model. Blocks nest.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (on entering the block).

    Example:
        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> with saving_for_resume(model):
        ...     pass  # model.save_pretrained(checkpoint_dir) writes parametrized keys here
    """
    _require_module(model)
    with nested(model, _RESUME_SAVES):
        yield


@contextmanager
def merged_save(model: nn.Module) -> Iterator[None]:
    """:func:`saving_merged` with the merged dict computed (and checked finite) on entering, so a
    save that writes other files first (its config) writes nothing when a merge is not finite."""
    guard_state_dict_saves(model)
    model.__dict__[_READY] = merged_state_dict(model)
    try:
        with saving_merged(model):
            yield
    finally:
        model.__dict__.pop(_READY, None)


@contextmanager
def saving_merged(model: nn.Module) -> Iterator[None]:
    """Within this block, ``model.state_dict()`` holds the merged plain keys of a chained model.

    For a library's save function that reads ``model.state_dict()`` itself and writes it as the
    deployable model (``save_pretrained`` without ``state_dict=`` is run inside this block by the
    guard; wrap any other such call yourself). The model must have been wrapped by a
    ``ChainLoRAOptimizer`` (which installs :func:`guard_state_dict_saves`); a model without
    links saves as it is. Blocks nest; :func:`saving_for_resume` inside wins.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` (on entering the block).
        NonFiniteUpdateError: a merged weight would not be finite, or a parameter trained
            outside the links holds NaN/Inf (at ``state_dict()``).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, knot_every=10)
        >>> with saving_merged(model):
        ...     sorted(model.state_dict())
        ['0.bias', '0.weight']
    """
    _require_module(model)
    with nested(model, _MERGED_SAVES):
        yield


def guard_state_dict_saves(model: nn.Module) -> None:
    """Install the state-dict post-hook behind :func:`saving_merged` on ``model`` (once).

    It rewrites ``model.state_dict()`` to the merged plain keys inside :func:`saving_merged` and
    inside Accelerate's ``Accelerator.save_model``; anywhere else it changes nothing.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    _require_module(model)
    if _HOOK not in model.__dict__:
        model.__dict__[_HOOK] = model.register_state_dict_post_hook(  # type: ignore[no-untyped-call]
            _merged_state_dict_hook
        )


def _deploy_save() -> tuple[str, Any] | None:
    """The known save of another library (``_DEPLOY_SAVES``) on the stack: its kind and frame."""
    codes: dict[Any, str] = {}
    for module_name, qualname, kind in _DEPLOY_SAVES:
        owner: Any = sys.modules.get(module_name)
        for part in qualname.split("."):
            owner = getattr(owner, part, None)
        code = getattr(owner, "__code__", None)
        if code is not None:
            codes[code] = kind
    if not codes:
        return None
    frame = inspect.currentframe()
    for _ in range(64):  # a few frames, and one per level the chained module is nested at
        if frame is None:
            return None
        if frame.f_code in codes:
            return codes[frame.f_code], frame
        frame = frame.f_back
    return None


def _lightning_defers(frame: Any) -> bool:
    """Lightning's checkpoint is left to ``ChainLoRACheckpoint`` when the trainer has one, and
    as it is under a strategy whose state dict is not the module's own (FSDP, DeepSpeed).

    A weights-only checkpoint (``save_weights_only``) calls no callback's
    ``on_save_checkpoint``: there the callback's choice is made here, the merged model unless
    it says ``merged=False``."""
    trainer = getattr(frame.f_locals.get("self"), "trainer", None)
    callbacks = getattr(trainer, "callbacks", None) or []
    mine = [c for c in callbacks if type(c).__name__ == "ChainLoRACheckpoint"]
    if mine and not frame.f_locals.get("weights_only"):
        return True  # its on_save_checkpoint decides
    if mine and not getattr(mine[0], "merged", True):
        return True  # the parametrized keys, as it keeps them in full checkpoints
    return bool(getattr(getattr(trainer, "strategy", None), "restore_checkpoint_after_setup", True))


def _merged_state_dict_hook(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, _metadata: Any
) -> None:
    """State-dict post-hook: the merged plain keys replace the chain's, where a deploy save
    reads them (see :func:`saving_merged`)."""
    own = module.__dict__
    if own.get(_OWN_STATE) or own.get(_RESUME_SAVES):
        return
    caller = None if own.get(_MERGED_SAVES) else _deploy_save()
    if not own.get(_MERGED_SAVES) and caller is None:
        return
    if caller is not None and caller[0] == "lightning" and _lightning_defers(caller[1]):
        return
    records = find_adapted(module)
    if not records:
        return
    kind = None if caller is None else caller[0]
    quantized = any(r.quant is not None for r in records)
    if kind == "lightning" and quantized:  # a 4-bit chain resumes from its own keys there
        return
    merged = own.get(_READY)
    if merged is None:
        try:  # a class's save_pretrained writes 4-bit layers as 4-bit: so does the merged dict
            merged = merged_state_dict(module, keep_quantized=kind == "save_pretrained")
        except NonFiniteUpdateError as err:
            if caller is None or caller[0] != "lightning":
                raise
            warnings.warn(  # a training checkpoint: keep what resumes, do not stop training
                f"the Lightning checkpoint keeps the chain's parametrized keys ({err})",
                ChainLoRAWarning,
                stacklevel=2,
            )
            return
    for key in [k for k in state_dict if k.startswith(prefix)]:  # this module's, at the end
        del state_dict[key]
    for key, value in merged.items():
        state_dict[prefix + key] = value
    if caller is not None:  # the optimizer's next state_dict() carries the chain's own tensors
        mark_merged_save(module)


def _require_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _own(model: nn.Module, given: Mapping[str, Any]) -> bool:
    """``given`` holds the model's own parametrized tensors (its ``state_dict()``, a Trainer's)."""
    mine = own_state_dict(model)
    return all(
        isinstance(t, Tensor) and k in mine and t.data_ptr() == mine[k].data_ptr()
        for k, t in given.items()
        if _PARAMETRIZED in f".{k}"
    )


def _merged_save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    save = type(self).save_pretrained  # type: ignore[attr-defined]
    if self.__dict__.get(_RESUME_SAVES) or not adapted_modules(self):
        return save(self, *args, **kwargs)
    try:
        bound = inspect.signature(save).bind(self, *args, **kwargs)
    except TypeError:  # let save_pretrained report its own argument errors
        return save(self, *args, **kwargs)
    quantizer = getattr(self, "hf_quantizer", None)
    if quantizer is not None:  # a quantized model saves what its quantizer says, not state_dict=
        return _save_quantized(self, save, bound, quantizer)
    what = _what(bound.arguments.get("save_directory"))
    if "state_dict" not in inspect.signature(save).parameters:
        # diffusers: save_pretrained reads self.state_dict(), which the hook merges in here
        with merged_save(self):
            result = write_once(self, lambda: save(*bound.args, **bound.kwargs), what)
        mark_merged_save(self)
        return result
    given = bound.arguments.get("state_dict")
    if given is not None and any(_PARAMETRIZED in f".{k}" for k in given):
        if not _own(self, given):
            warnings.warn(
                "save_pretrained() was given a state_dict with chainopt's parametrized keys "
                "that is not the model's own: it is written as given, and from_pretrained() "
                "ignores those keys; pass chainopt.merged_state_dict(model) to deploy",
                ParametrizedCheckpointWarning,
                stacklevel=2,
            )
            return save(self, *args, **kwargs)
        bound.arguments["state_dict"] = _merged_in(self, given)
    elif given is None:
        bound.arguments["state_dict"] = merged_state_dict(self)
    result = write_once(self, lambda: save(*bound.args, **bound.kwargs), what)
    mark_merged_save(self)
    return result


def _what(path: object) -> str:
    """What a save to ``path`` writes, for the other ranks' error under FSDP2."""
    where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    return f"the merged model to {where!r}"


def _merged_in(model: nn.Module, given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` (the model's own tensors under chainopt's keys, as a caller chose and ordered
    them) with each parametrized group replaced by its merged plain entry, every other entry
    as given: the caller's selection and values are honoured."""
    merged = merged_state_dict(model)
    out: dict[str, Any] = {}
    for key, value in given.items():
        head, sep, tail = f".{key}".partition(_PARAMETRIZED)
        if not sep:
            out[key] = value
            continue
        plain = f"{head[1:]}.{tail.split('.')[0]}" if head[1:] else tail.split(".")[0]
        if plain not in out and plain in merged:
            out[plain] = merged[plain]
    whole: dict[str, Any] = gathered(out)  # FSDP2: the caller's sharded entries, whole
    return whole


def _save_quantized(
    self: nn.Module, save: Any, bound: inspect.BoundArguments, quantizer: Any
) -> Any:
    """Save a chained quantized model as the fine-tuned quantized model.

    transformers takes a quantized model's state dict from its quantizer
    (``hf_quantizer.get_state_dict_and_metadata``), ignoring ``state_dict=``; so for the duration
    of the save that method (on this quantizer instance only) returns the merged state dict with
    every adapted 4-bit layer requantized from its master plus the pending link.
    """
    merged = merged_state_dict(self, keep_quantized=True)
    original = quantizer.get_state_dict_and_metadata

    def merged_state(model: nn.Module) -> Any:
        _state, metadata = original(model)
        return merged, metadata

    quantizer.get_state_dict_and_metadata = merged_state
    try:
        result = save(*bound.args, **bound.kwargs)
    finally:
        del quantizer.get_state_dict_and_metadata  # the class's method again
    mark_merged_save(self)
    return result


def accept_as_adapted(model: nn.Module) -> None:
    """Let the HF ``Trainer`` train a chained quantized model.

    ``Trainer`` refuses a model that ``from_pretrained`` quantized (its ``is_quantized`` instance
    flag) unless it is a PEFT model, because such a model has nothing to train; a chain is what
    it trains. The flag is cleared on the instance; the quantizer and the saved config keep saying
    the model is quantized.
    """
    if getattr(model, "hf_quantizer", None) is not None and getattr(model, "is_quantized", False):
        model.__dict__["is_quantized"] = False
        model.__dict__[CLEARED_IS_QUANTIZED] = True  # unloading puts it back (chainopt._marks)


def prepare_hf_model(model: nn.Module) -> None:
    """What every model a chain wraps gets: the state-dict hook of deploy saves
    (:func:`guard_state_dict_saves`); a Hugging Face one also the merged ``save_pretrained``
    and, if it is quantized, the Trainer's consent (:func:`accept_as_adapted`)."""
    guard_state_dict_saves(model)
    guard_save_pretrained(model)
    accept_as_adapted(model)


def save_merged(
    chain: _HasModel | nn.Module, path: str | os.PathLike[str], **save_kwargs: Any
) -> Path:
    """Save a standard checkpoint: plain keys, every link merged, via ``save_pretrained``.

    Stock ``AutoModel*.from_pretrained(path)`` loads it with no missing or unexpected keys. The
    model in memory is not changed and can keep training.

    A ``PeftModel`` saves through its own ``save_pretrained``: on a chained one that writes the
    whole chain as one adapter for the original base (and refuses once the chain was merged
    and unloaded, see ``docs/integrations.md``); the plain fine-tuned model is
    ``peft_model.merge_and_unload()`` after ``opt.merge_and_unload()``. A model with PEFT layers
    injected (``unet.add_adapter(...)``) is refused: its keys are PEFT's, which
    ``from_pretrained`` does not load.

    Args:
        chain: the :class:`~chainopt.ChainLoRAOptimizer` (its ``model`` is saved) or the model.
        path: the directory to write.
        **save_kwargs: passed on to ``model.save_pretrained`` (``max_shard_size``, ``variant``,
            ``is_main_process``, …); not ``state_dict``. A ``save_pretrained`` that takes no
            ``state_dict`` (diffusers') runs inside
            :func:`~chainopt.saving_merged` instead.

    Under FSDP2 (a model sharded by ``fully_shard``) call it on every rank: every rank gathers
    the merged weights whole, rank 0 alone writes, and no rank returns before the files are in
    place (if rank 0 cannot write, every rank raises; see :func:`~chainopt.merged_state_dict`).

    Returns:
        ``path`` as a ``Path``.

    Raises:
        TypeError: the model has no ``save_pretrained`` (not a Hugging Face ``PreTrainedModel``;
            save ``merged_state_dict(model)`` yourself), or ``state_dict`` was given.
        ValueError: a model with PEFT layers injected, or a ``PeftModel`` whose own save
            refuses; nothing is written.
        NonFiniteUpdateError: a merged weight would not be finite, or a parameter trained
            outside the links holds NaN/Inf; nothing is written.

    Example:
        >>> import tempfile, torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from chainopt import ChainLoRAOptimizer, save_merged
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                   num_hidden_layers=1, num_attention_heads=2)
        >>> model = LlamaForCausalLM(cfg)
        >>> opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()),
        ...                          target_modules=["q_proj"], rank=2, knot_every=10)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     plain = LlamaForCausalLM.from_pretrained(save_merged(opt, d))
        >>> type(plain.model.layers[0].self_attn.q_proj).__name__
        'Linear'
    """
    model = chain if isinstance(chain, nn.Module) else getattr(chain, "model", None)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"chain must be a ChainLoRAOptimizer or an nn.Module, got {type_name(chain)}"
        )
    if "state_dict" in save_kwargs:
        raise TypeError("save_merged writes merged_state_dict(model); do not pass state_dict")
    if adapter_save_method(model) == "save_pretrained":  # a PeftModel: its own adapter save
        cast(Any, model).save_pretrained(path, **save_kwargs)  # the instance's: the whole chain
        return Path(path)
    if has_peft_layers(model):
        raise ValueError(
            f"save_merged cannot write this {type_name(model)} as a plain checkpoint: it holds "
            "PEFT layers injected into it, whose base_layer/lora keys from_pretrained does not "
            "load; nothing was written. Save the chain as an adapter with "
            "save_lora_adapter(dir) before opt.merge_and_unload(), or merge it into the model: "
            "opt.merge_and_unload(), then diffusers' fuse_lora()/unload_lora() and save_pretrained"
        )
    save = getattr(type(model), "save_pretrained", None)
    if not callable(save):
        raise TypeError(
            f"{type_name(model)} has no save_pretrained (not a Hugging Face model): save "
            "chainopt.merged_state_dict(model) with torch.save or safetensors instead"
        )
    what = _what(path)  # FSDP2: every rank gathers, rank 0 alone writes
    if "state_dict" in inspect.signature(save).parameters:
        merged = merged_state_dict(model)  # checks every merge first: nothing written if one fails
        write_once(model, lambda: save(model, path, state_dict=merged, **save_kwargs), what)
        return Path(path)
    # diffusers' save_pretrained takes no state_dict: it reads model.state_dict(), merged here
    with merged_save(model):  # checks every merge first: nothing is written if one fails
        write_once(model, lambda: save(model, path, **save_kwargs), what)
    return Path(path)
