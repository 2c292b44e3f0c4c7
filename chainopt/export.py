"""Leaving the chain: merge into plain ``nn.Linear`` modules, or read plain-key state dicts.

A parametrized model's ``state_dict()`` holds ``….parametrizations.weight.original`` and the
factors; a loader that expects ``….weight`` (``from_pretrained``, a serving stack) silently ignores
those keys. :func:`merged_state_dict` gives the plain keys with every link merged, without touching
the model; :func:`merge_and_unload` turns the model itself back into plain modules.
:func:`save_merged` writes a Hugging Face checkpoint of the merged model, and
:func:`guard_save_pretrained` makes a plain ``save_pretrained`` of a still-chained model warn.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer, merged_state_dict
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=10)
    >>> sorted(merged_state_dict(model))
    ['0.bias', '0.weight', '2.bias', '2.weight']
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MethodType
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from .lora import detach, lora_parametrization, parametrization_count
from .merge import (
    NonFiniteUpdateError,
    find_non_finite,
    merge_into_weight,
    merged_bias,
    merged_weight,
)

if TYPE_CHECKING:
    from .optimizer import ChainLoRAOptimizer

__all__ = [
    "ParametrizedCheckpointWarning",
    "adapted_modules",
    "guard_save_pretrained",
    "merge_and_unload",
    "merged_state_dict",
    "save_merged",
    "saving_for_resume",
]


def adapted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified_name, module)`` for every module of ``model`` that carries a chainopt link."""
    return [(n, m) for n, m in model.named_modules() if lora_parametrization(m) is not None]


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every pending link into its weight and remove chainopt's parametrizations.

    Works on any model carrying chainopt links, a ``copy.deepcopy`` of a wrapped model included.
    The modules become plain ``nn.Linear`` again and keep their Parameter objects.

    Returns:
        ``model`` itself.

    Raises:
        NonFiniteUpdateError: a link holds NaN/Inf; nothing was changed.
    """
    modules = adapted_modules(model)
    bad = find_non_finite(modules)
    if bad:
        raise NonFiniteUpdateError(
            f"non-finite LoRA factors in {bad}; refusing to merge them (no weight was changed)"
        )
    for _name, module in modules:
        merge_into_weight(module)
        detach(module)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` under plain keys, with every pending link merged.

    The model is not changed. ``….parametrizations.weight.original`` becomes ``….weight`` holding
    ``W + s·B·A`` (and the bias its delta); factor and residual entries are dropped. Other entries
    are passed through unchanged, in order.
    """
    state = model.state_dict()
    plain: dict[str, Tensor] = {}
    owned: list[str] = []
    for name, module in adapted_modules(model):
        prefix = f"{name}." if name else ""
        owned.append(f"{prefix}parametrizations.")
        # With another parametrization stacked after ours, only the whole stack is the weight.
        stacked = parametrization_count(module) > 1
        weight = _current(module) if stacked else merged_weight(module)
        plain[f"{prefix}parametrizations.weight.original"] = weight
        bias = merged_bias(module)
        if bias is not None:
            plain[f"{prefix}parametrizations.bias.original"] = bias
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in plain:
            head, _, tail = key.partition("parametrizations.")
            out[head + tail.partition(".")[0]] = plain[key]
        elif not key.startswith(tuple(owned)):
            out[key] = value
    return out


def _current(module: nn.Module) -> Tensor:
    weight: Tensor = getattr(module, "weight")  # noqa: B009 - evaluates the parametrizations
    return weight.detach().clone()


# --- Hugging Face-style saving: a deployable merged checkpoint, and a guard on the other kind ---

_RESUME_SAVES = "_chainopt_resume_saves"  # instance attribute: saving_for_resume depth
_PARAMETRIZED = ".parametrizations."


class ParametrizedCheckpointWarning(UserWarning):
    """``save_pretrained`` wrote chainopt's parametrized keys, which ``from_pretrained`` ignores.

    Such a checkpoint resumes training (``model.load_state_dict``, the HF ``Trainer``'s
    ``resume_from_checkpoint``) but is no deployable model. Filter this category to silence it.
    """


def save_merged(
    chain: ChainLoRAOptimizer | nn.Module, path: str | os.PathLike[str], **save_kwargs: Any
) -> Path:
    """Save a standard checkpoint: plain keys, every link merged, via ``save_pretrained``.

    Stock ``AutoModel*.from_pretrained(path)`` loads it with no missing or unexpected keys. The
    model in memory is not changed and can keep training.

    Args:
        chain: the :class:`~chainopt.ChainLoRAOptimizer` (its ``model`` is saved) or the model.
        path: the directory to write.
        **save_kwargs: passed on to ``model.save_pretrained`` (``max_shard_size``, ``variant``,
            ``is_main_process``, …); not ``state_dict``.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        TypeError: the model has no ``save_pretrained`` (not a Hugging Face ``PreTrainedModel``;
            save ``merged_state_dict(model)`` yourself), or ``state_dict`` was given.
        NonFiniteUpdateError: a pending link holds NaN/Inf.

    Example:
        >>> import tempfile, torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from chainopt import ChainLoRAOptimizer
        >>> from chainopt.export import save_merged
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
    model = chain if isinstance(chain, nn.Module) else chain.model
    if "state_dict" in save_kwargs:
        raise TypeError("save_merged writes merged_state_dict(model); do not pass state_dict")
    save = getattr(type(model), "save_pretrained", None)
    if not callable(save):
        raise TypeError(
            f"{type(model).__name__} has no save_pretrained (not a Hugging Face model): save "
            "chainopt.merged_state_dict(model) with torch.save or safetensors instead"
        )
    save(model, path, state_dict=merged_state_dict(model), **save_kwargs)
    return Path(path)


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
