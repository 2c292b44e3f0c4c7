"""Hugging Face ``save_pretrained`` on a chained model: a guard that says what it writes.

A model that still carries chainopt links saves ``….parametrizations.weight.original`` and the
factors; ``from_pretrained`` ignores those keys and silently re-initialises the adapted weights.
:func:`guard_save_pretrained` (installed on every model a ``ChainLoRAOptimizer`` wraps) makes
such a save warn; :func:`saving_for_resume` marks saves that are meant to resume training.
Torch only: nothing here imports transformers.

Example:
    >>> from torch import nn
    >>> guard_save_pretrained(nn.Linear(2, 2))  # not a Hugging Face model: nothing to guard
    False
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType
from typing import Any

from torch import nn

from ..export import adapted_modules

__all__ = ["ParametrizedCheckpointWarning", "guard_save_pretrained", "saving_for_resume"]

_RESUME_SAVES = "_chainopt_resume_saves"  # instance attribute: saving_for_resume depth
_PARAMETRIZED = ".parametrizations."


class ParametrizedCheckpointWarning(UserWarning):
    """``save_pretrained`` wrote chainopt's parametrized keys, which ``from_pretrained`` ignores.

    Such a checkpoint resumes training (``model.load_state_dict``, the HF ``Trainer``'s
    ``resume_from_checkpoint``) but is no deployable model. Filter this category to silence it.
    """


def guard_save_pretrained(model: nn.Module) -> bool:
    """Make ``model.save_pretrained`` warn while it would write chainopt's parametrized keys.

    A model that still carries chainopt links saves ``….parametrizations.weight.original`` and
    the factors; ``from_pretrained`` ignores those keys and silently re-initialises the adapted
    weights. The guard (on this instance only, so ``copy.deepcopy`` copies it bound to the copy)
    emits a :class:`ParametrizedCheckpointWarning` for such a call and then saves as asked. Plain
    keys (``state_dict=merged_state_dict(model)``), a model with no links left, and saves inside
    :func:`saving_for_resume` pass silently.

    Args:
        model: the model; anything without a ``save_pretrained`` method is left alone.

    Returns:
        Whether the guard is installed (``False`` for a model without ``save_pretrained`` or one
        whose ``save_pretrained`` is already overridden on the instance by something else).

    Example:
        >>> from torch import nn
        >>> guard_save_pretrained(nn.Linear(2, 2))  # not a Hugging Face model: nothing to guard
        False
    """
    current = model.__dict__.get("save_pretrained")
    if isinstance(current, MethodType) and current.__func__ is _guarded_save_pretrained:
        return True
    if current is not None or not callable(getattr(type(model), "save_pretrained", None)):
        return False
    model.__dict__["save_pretrained"] = MethodType(_guarded_save_pretrained, model)
    return True


@contextmanager
def saving_for_resume(model: nn.Module) -> Iterator[None]:
    """Within this block, ``model.save_pretrained`` writes resume checkpoints: no warning.

    :func:`guard_save_pretrained`'s warning is for checkpoints meant to be deployed; a
    checkpoint meant to resume training needs the parametrized keys. The HF ``Trainer``
    integration (:class:`chainopt.integrations.transformers.ChainLoRACallback`) wraps training in
    this block. Blocks nest.

    Example:
        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> with saving_for_resume(model):
        ...     pass  # model.save_pretrained(checkpoint_dir) warns not here
    """
    depth = model.__dict__.get(_RESUME_SAVES, 0)
    model.__dict__[_RESUME_SAVES] = depth + 1
    try:
        yield
    finally:
        if depth:
            model.__dict__[_RESUME_SAVES] = depth
        else:
            model.__dict__.pop(_RESUME_SAVES, None)


def _guarded_save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    save = type(self).save_pretrained  # type: ignore[attr-defined]
    if not self.__dict__.get(_RESUME_SAVES) and adapted_modules(self):
        try:
            state_dict = (
                inspect.signature(save).bind(self, *args, **kwargs).arguments.get("state_dict")
            )
        except TypeError:  # let save_pretrained report its own argument errors
            state_dict = None
        # No state_dict: save_pretrained takes self.state_dict(), parametrized keys and all.
        if state_dict is None or any(_PARAMETRIZED in f".{key}" for key in state_dict):
            warnings.warn(
                "save_pretrained() on a model that still carries chainopt links writes "
                "parametrized keys (….parametrizations.weight.original, lora_A, lora_B) that "
                "from_pretrained() ignores, re-initialising the adapted weights. This checkpoint "
                "only resumes training (model.load_state_dict, Trainer resume_from_checkpoint). "
                "To deploy, use chainopt.save_merged(opt, path) (plain merged weights) or "
                "chainopt.export_peft_adapter(opt, path); for resume checkpoints wrap the save in "
                "chainopt.saving_for_resume(model) (the Trainer callback "
                "chainopt.integrations.transformers.ChainLoRACallback does).",
                ParametrizedCheckpointWarning,
                stacklevel=2,
            )
    return save(self, *args, **kwargs)
