"""Hugging Face ``save_pretrained`` on a chained model writes the fine-tuned model.

A model that carries chainopt links would save ``….parametrizations.weight.original`` and the
factors, which ``from_pretrained`` ignores (it re-initialises the adapted weights). Every model a
``ChainLoRAOptimizer`` wraps gets, on the instance, a ``save_pretrained`` that writes
:func:`chainopt.merged_state_dict` instead: plain keys, every link merged, what stock
``from_pretrained`` loads as the fine-tuned model, with no missing or unexpected keys. So a
script's own last line (``model.save_pretrained(out)``, ``trainer.save_model()``) deploys.

Resuming is not lost: a save marks the model (:func:`chainopt.export.mark_merged_save`), and the
optimizer's next ``state_dict()`` carries the chain's own tensors. A ``Trainer`` checkpoint is
``save_pretrained`` then ``optimizer.state_dict()``, so it holds both and resumes bitwise: the
chained model loads the merged weights (as a zero link on top), then the optimizer's state puts
the originals and factors back. Inside :func:`saving_for_resume` the save writes the parametrized
keys as they are. Torch only: nothing here imports transformers.

Example:
    >>> from torch import nn
    >>> guard_save_pretrained(nn.Linear(2, 2))  # not a Hugging Face model: nothing to install
    False
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MethodType
from typing import Any

from torch import Tensor, nn

from ._marks import CLEARED_IS_QUANTIZED
from ._marks import RESUME_SAVES as _RESUME_SAVES
from .export import adapted_modules, mark_merged_save, merged_state_dict

__all__ = [
    "ParametrizedCheckpointWarning",
    "accept_as_adapted",
    "guard_save_pretrained",
    "prepare_hf_model",
    "saving_for_resume",
]

_PARAMETRIZED = ".parametrizations."


class ParametrizedCheckpointWarning(UserWarning):
    """``save_pretrained`` was given a state dict with chainopt's parametrized keys that is not
    the model's own, and wrote it as given: ``from_pretrained`` ignores those keys."""


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
    depth = model.__dict__.get(_RESUME_SAVES, 0)
    model.__dict__[_RESUME_SAVES] = depth + 1
    try:
        yield
    finally:
        if depth:
            model.__dict__[_RESUME_SAVES] = depth
        else:
            model.__dict__.pop(_RESUME_SAVES, None)


def _require_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _own(model: nn.Module, given: Mapping[str, Any]) -> bool:
    """``given`` holds the model's own parametrized tensors (its ``state_dict()``, a Trainer's)."""
    mine = model.state_dict()
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
        given = None
    if given is None:
        bound.arguments["state_dict"] = merged_state_dict(self)
    result = save(*bound.args, **bound.kwargs)
    mark_merged_save(self)
    return result


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
    """What every Hugging Face model a chain wraps gets: the merged ``save_pretrained`` and, if
    it is quantized, the Trainer's consent (:func:`accept_as_adapted`)."""
    guard_save_pretrained(model)
    accept_as_adapted(model)
