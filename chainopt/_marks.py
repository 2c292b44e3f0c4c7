"""Every mark chainopt leaves on a user's model, in one list, and how unloading removes each.

An unloaded model is the plain model: :func:`chainopt.merge_and_unload` (and the optimizer's
method) removes every mark below, so that ``torch.save(model)``, ``copy.deepcopy`` and the
model's own methods see nothing of chainopt.

On each adapted module (put by its layer kind's builder, :mod:`chainopt._layers`; removed by the
record's ``unload()``, :func:`chainopt._attach.detach`):

========================================  ===============================  ====================
mark                                      put by                           removed by
========================================  ===============================  ====================
``torch.nn.utils.parametrize`` class      ``_attach.attach`` (dense)       ``_attach.detach``
swap, ``parametrizations``, and the
factorised forward on that class
``__dict__[PARAMETER_ORDER]``             ``_attach.attach`` (dense)       ``_attach.detach``
child ``LINK_NAME``, ``__dict__           ``quantized.attach_quantized``   ``detach_quantized``
[QUANTIZED]``, an instance ``forward``    (4-bit)
a forward hook (``init="gradient"``)      ``init.GradientInit``            :func:`unmark`
``__dict__[PEFT_LINK]`` (the link), a     ``_peft_layers.PeftBuilder``     ``PeftBuilder.detach``
``chainopt_merge_residual`` buffer        (a PEFT LoRA layer; the buffer
                                          for a half-precision base)
``parametrize`` class swap with           ``_experts.ParameterBuilder``    ``ParameterBuilder
``parametrizations.<param>``, the         (``target_parameters``; one      .detach`` (per
forward run inside                        per parameter)                   parameter; the
``parametrize.cached()`` on that class,                                    forward and order
``__dict__[PARAMETER_ORDER]``                                              with the last one)
========================================  ===============================  ====================

On the model itself (removed by :func:`unmark`, which ``merge_and_unload`` calls last):

========================================  ===============================================
mark                                      put by
========================================  ===============================================
a ``load_state_dict`` pre-hook, its       ``_load_guard.guard_loads`` (construction)
handle in ``__dict__[LOAD_GUARD]``
a ``load_state_dict`` post-hook, its      ``_load_guard.guard_loads`` (construction)
handle in ``__dict__[LOAD_SETTLE]``
a ``load_state_dict`` pre-hook on each    ``_load_guard.guard_loads`` (construction)
module down to each link, their handles
in ``__dict__[INNER_LOAD_GUARDS]``
``__dict__[PLAIN_LOAD]``                  the post-hook (a load replaced the chain's
                                          tensors without its optimizer state)
``__dict__[STATE_RESTORED]``,             ``_load_guard.state_restored`` (an optimizer
``__dict__[EXPECTED_WEIGHTS]``            state loaded; gone at the next step)
``__dict__[LOADING]``                     the pre-hook (only during a load)
an instance ``save_pretrained``           ``_hf_save.guard_save_pretrained``
                                          (construction, a model with ``save_pretrained``)
``__dict__["is_quantized"] = False``,     ``_hf_save.accept_as_adapted``
``__dict__[CLEARED_IS_QUANTIZED]``        (construction, a quantized HF model); unloading
                                          puts ``is_quantized = True`` back
``__dict__[MERGED_SAVE]``                 ``mark_merged_save`` (a merged save)
``__dict__[RESUME_SAVES]``                ``_hf_save.saving_for_resume`` (only
                                          inside the block; also removed on leaving it)
a ``state_dict`` post-hook, its handle    ``_hf_save.guard_state_dict_saves``
in ``__dict__[STATE_DICT_HOOK]``          (construction)
``__dict__[MERGED_SAVES]``                ``_hf_save.saving_merged`` (only
                                          inside the block; also removed on leaving it)
an instance ``save_pretrained`` (the      ``_peft_save.install_whole_chain_save`` (a
whole chain), ``load_adapter`` and        ``PeftModel``, instead of the merged save)
``add_weighted_adapter``,
``__dict__[PEFT_AWAITING]``; or an
instance ``save_lora_adapter`` and a     (a diffusers model with injected PEFT layers);
refusing ``save_pretrained``
(both with ``__dict__[PEFT_SAVE]``)
an instance ``save_pretrained`` that      ``averaging.track_average`` (the averaged copy
refuses (a ``_AveragedAdapterSave``)      of a chained ``PeftModel``; merge_and_unload
                                          puts its own refusal in its place)
========================================  ===============================================

The Lightning callback's ``load_state_dict`` pre-hook is the callback's, removed by the
callback itself (``chainopt.integrations.lightning``).

Left by ``merge_and_unload`` itself, and kept by :func:`unmark` (they say what the weights hold
now, whatever chain comes next): ``__dict__[BASE_MERGED]`` on the model (and on a ``PeftModel``'s
base model); on a model whose own adapter save wrote the chain (``PEFT_SAVE`` above) an instance
``save_pretrained`` (``PeftModel``) or ``save_lora_adapter`` (diffusers) that refuses, from
``_peft_save.refuse_adapter_saves``: PEFT's own would write the zero link, not the fine-tuned
model.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer, merge_and_unload
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=1)
    >>> LOAD_GUARD in model.__dict__
    True
    >>> _ = merge_and_unload(model)
    >>> [k for k in vars(model) if "chainopt" in k], type(model[0]) is nn.Linear
    (['_chainopt_base_merged'], True)
    >>> merged_rank(model, "0") is None  # merged behind the optimizer's back: rank not known
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MethodType

from torch import nn

from ._surgery import remove_forward_hooks

__all__ = [
    "BASE_MERGED",
    "CLEARED_IS_QUANTIZED",
    "EXPECTED_WEIGHTS",
    "INNER_LOAD_GUARDS",
    "LINK_NAME",
    "LOADING",
    "LOAD_GUARD",
    "LOAD_SETTLE",
    "MERGED_SAVE",
    "MERGED_SAVES",
    "OWN_STATE",
    "PARAMETER_ORDER",
    "PEFT_AWAITING",
    "PEFT_LINK",
    "PEFT_SAVE",
    "PLAIN_LOAD",
    "QUANTIZED",
    "RESUME_SAVES",
    "STATE_DICT_HOOK",
    "STATE_RESTORED",
    "base_merged",
    "is_chainopt",
    "mark_base_merged",
    "mark_merged_save",
    "merged_rank",
    "merged_save_pending",
    "nested",
    "unmark",
]

PARAMETER_ORDER = "_chainopt_parameter_order"
"""Instance attribute of a dense adapted module: its parameters' order before the link."""
QUANTIZED = "_chainopt_quantized"
"""Instance attribute of an adapted 4-bit layer: its ``QuantizedWeight`` (backend, master)."""
LINK_NAME = "chainopt_link"
"""The child module holding a 4-bit layer's link."""
LOAD_GUARD = "_chainopt_load_guard"
"""Instance attribute of a chained model: the handle of its ``load_state_dict`` pre-hook."""
LOAD_SETTLE = "_chainopt_load_settle"
"""Instance attribute of a chained model: the handle of its ``load_state_dict`` post-hook."""
INNER_LOAD_GUARDS = "_chainopt_inner_load_guards"
"""Instance attribute of a chained model: the handles of the ``load_state_dict`` pre-hooks on
its submodules that hold links (a load into one of them alone is refused)."""
PLAIN_LOAD = "_chainopt_plain_load"
"""Instance flag: a plain (merged) checkpoint was loaded into the chain (its history is stale)."""
STATE_RESTORED = "_chainopt_state_restored"
EXPECTED_WEIGHTS = "_chainopt_expected_weights"
"""Instance attribute, from an optimizer-state load to the next step: the fingerprint of the
frozen weights that state was saved with (:mod:`chainopt._fingerprint`), which a model load
that follows must match."""
"""Instance flag: the chain's optimizer state was just loaded (a model load may complete it)."""
LOADING = "_chainopt_loading"
"""Instance attribute, only during a ``load_state_dict``: what the post-hook settles."""
MERGED_SAVE = "_chainopt_merged_save"
"""Instance flag: a save wrote merged weights without the chain's own tensors."""
RESUME_SAVES = "_chainopt_resume_saves"
"""Instance attribute: how deep ``saving_for_resume`` blocks are nested."""
OWN_STATE = "_chainopt_own_state"
"""Instance flag, only while chainopt reads ``model.state_dict()`` itself: the chain's own keys,
whatever save is on the stack (:func:`chainopt.export.own_state_dict`)."""
STATE_DICT_HOOK = "_chainopt_state_dict_hook"
"""Instance attribute of a chained model: the handle of its ``state_dict`` post-hook."""
MERGED_SAVES = "_chainopt_merged_saves"
"""Instance attribute: how deep ``saving_merged`` blocks are nested."""
PEFT_LINK = "_chainopt_peft_link"
"""Instance attribute of a chained PEFT LoRA layer: its ``PeftLink``."""
PEFT_SAVE = "_chainopt_peft_save"
"""Instance attribute of a model whose own adapter save writes the chain: its ``ChainSave``."""
PEFT_AWAITING = "_chainopt_awaiting_chain_state"
"""Instance attribute of a chained ``PeftModel``: ``load_adapter`` skipped a chain's own save
(the chain's state dict must be loaded before the next step)."""
BASE_MERGED = "_chainopt_base_merged"
"""Instance attribute (module name -> rank merged, see :func:`mark_base_merged`) of a model whose
weights hold links that :func:`chainopt.merge_and_unload` merged
(on the model it was given, and on a ``PeftModel``'s base model too). It outlives unloading
(:func:`unmark` keeps it): the weights are no longer those of the base the model's name stands
for, so an adapter over them (PEFT's own save after the chain is gone, a later chain's save or
``export_peft_adapter``) would compute another model on that base (:func:`base_merged`)."""
CLEARED_IS_QUANTIZED = "_chainopt_cleared_is_quantized"
"""Instance flag: chainopt set the HF model's ``is_quantized`` to ``False`` (Trainer's consent)."""


def is_chainopt(obj: object) -> bool:
    """Whether ``obj`` (a function, a bound method, a hook object) is chainopt's own."""
    target = obj.__func__ if isinstance(obj, MethodType) else obj
    module = getattr(target, "__module__", None) or type(target).__module__
    return module == "chainopt" or module.startswith("chainopt.")


def unmark(model: nn.Module) -> None:
    """Remove the marks chainopt put on ``model`` itself and its modules' ``init`` hooks.

    Call it once no module carries a link any more (the links go with each record's
    ``unload()``). Marks that are not there are skipped.
    """
    for key in (LOAD_GUARD, LOAD_SETTLE, STATE_DICT_HOOK):
        handle = model.__dict__.pop(key, None)
        if handle is not None and callable(getattr(handle, "remove", None)):
            handle.remove()
    for handle in model.__dict__.pop(INNER_LOAD_GUARDS, ()):
        handle.remove()
    for method in ("save_pretrained", "load_adapter", "add_weighted_adapter", "save_lora_adapter"):
        installed = model.__dict__.get(method)
        if installed is not None and is_chainopt(installed):
            del model.__dict__[method]  # the class's method again
    if model.__dict__.pop(CLEARED_IS_QUANTIZED, False):
        model.__dict__["is_quantized"] = True
    model.__dict__.pop(MERGED_SAVE, None)
    model.__dict__.pop(PLAIN_LOAD, None)
    model.__dict__.pop(STATE_RESTORED, None)
    model.__dict__.pop(EXPECTED_WEIGHTS, None)
    model.__dict__.pop(LOADING, None)
    model.__dict__.pop(RESUME_SAVES, None)
    model.__dict__.pop(MERGED_SAVES, None)
    model.__dict__.pop(PEFT_AWAITING, None)
    model.__dict__.pop(PEFT_SAVE, None)
    for module in model.modules():
        remove_forward_hooks(module, is_chainopt)


@contextmanager
def nested(model: nn.Module, key: str) -> Iterator[None]:
    """Count the instance attribute ``key`` of ``model`` up for the block; blocks nest, and the
    attribute goes when the outermost block ends (``RESUME_SAVES``, ``MERGED_SAVES``,
    ``OWN_STATE``)."""
    depth = model.__dict__.get(key, 0)
    model.__dict__[key] = depth + 1
    try:
        yield
    finally:
        if depth:
            model.__dict__[key] = depth
        else:
            model.__dict__.pop(key, None)


def mark_merged_save(model: nn.Module) -> None:
    """Record that a save of ``model`` wrote merged weights without the chain's own tensors.

    The next :meth:`~chainopt.ChainLoRAOptimizer.state_dict` before another optimizer step
    carries :func:`chainopt.export.chain_tensors`, so that a checkpoint made of the two (the HF
    ``Trainer``'s) resumes the link bitwise.
    """
    model.__dict__[MERGED_SAVE] = True


def merged_save_pending(model: nn.Module, clear: bool = False) -> bool:
    """Whether a merged save happened since the last optimizer step (``clear`` forgets it)."""
    pending = bool(model.__dict__.get(MERGED_SAVE))
    if clear:
        model.__dict__.pop(MERGED_SAVE, None)
    return pending


def mark_base_merged(model: nn.Module, ranks: Mapping[str, int | None]) -> None:
    """Record that ``model``'s weights now hold a merged chain: per adapted module (its name in
    ``model``) the rank merged into it, added to what earlier chains merged (``None``: not
    known, as after :func:`chainopt.merge_and_unload` behind the optimizer's back)."""
    merged: dict[str, int | None] = model.__dict__.setdefault(BASE_MERGED, {})
    for name, rank in ranks.items():
        before = merged.get(name, 0)
        merged[name] = None if before is None or rank is None else before + rank


def base_merged(model: nn.Module) -> bool:
    """Whether ``model`` or any module in it carries :data:`BASE_MERGED`: its weights hold a chain
    that was merged and unloaded, so they are not its named base's."""
    return any(BASE_MERGED in m.__dict__ for m in model.modules())


def merged_rank(model: nn.Module, name: str) -> int | None:
    """The rank earlier chains merged into ``model``'s module ``name`` (0: none); ``None`` when it
    is not known (a chain merged behind the optimizer's back, or into a module inside ``model``
    under other names)."""
    marks = [m for m in model.modules() if BASE_MERGED in m.__dict__]
    if not marks:
        return 0
    if marks != [model]:
        return None
    rank: int | None = model.__dict__[BASE_MERGED].get(name, 0)
    return rank
