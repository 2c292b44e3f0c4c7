"""Every use of torch internals, and the class surgery that installs the adapted forward.

The forwards themselves (the link's math) are in :mod:`chainopt.lora`; here is only how they are
put on a module and taken off.

chainopt keeps to public torch API everywhere else. What public API cannot do is here, each use
commented with why, and each covered by ``tests/test_surgery.py``, which fails loudly if a torch
upgrade changes what it relies on:

- :func:`init_optimizer_bookkeeping`: ``ChainLoRAOptimizer`` shares ``param_groups``, ``state``
  and ``defaults`` with the optimizer it wraps (properties), so it cannot run
  ``Optimizer.__init__``, which would rebind them; it takes the rest of what ``__init__`` sets
  (hook dicts, the step-profiling patch) from a scratch optimizer.
- :func:`in_parametrize_cache`: ``parametrize.cached()`` has no public query.
- :func:`set_shape_`: a rank step-down gives a Parameter new data of another shape while a held
  graph may keep autograd's gradient accumulator alive with the old shape.
- :func:`install_forward` / :func:`remove_parametrizations`: the per-module class that
  ``parametrize`` creates gets the factorised forward; removal never edits a class that a
  ``copy.deepcopy`` of the module shares (``parametrize.remove_parametrizations`` does).
- :func:`restore_parameter_order`: ``parametrize`` moves a parametrized tensor to the end of the
  module's parameters; removing it puts it back where it was, so ``state_dict()`` order is kept.
- ``torch._foreach_*``: batched in-place ops with no public spelling.
- :func:`forget_parameter_sizes`: ``LBFGS`` caches the total size of its parameters at its first
  step (``_numel_cache``); a rank step-down changes it.
- :func:`lr_scheduler_step_patch` / :func:`patch_step_for_lr_scheduler`: an LR scheduler
  replaces ``optimizer.step`` on the instance by a wrapper holding a weak reference to that
  optimizer (marked ``_wrapped_by_lr_sched``); a copy of the optimizer gets its own wrapper.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(2, 3))
    >>> set_shape_(p, (1, 3))
    >>> tuple(p.shape)
    (1, 3)
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Sequence
from types import MethodType
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.optim import Optimizer

__all__ = [
    "SHARED_OPTIMIZER_ATTRIBUTES",
    "foreach_copy_",
    "foreach_zero_",
    "forget_parameter_sizes",
    "in_parametrize_cache",
    "init_optimizer_bookkeeping",
    "install_forward",
    "install_instance_forward",
    "lr_scheduler_step_patch",
    "parameter_order",
    "patch_step_for_lr_scheduler",
    "remove_forward_hooks",
    "remove_instance_forward",
    "remove_parametrizations",
    "restore_parameter_order",
    "set_shape_",
]

SHARED_OPTIMIZER_ATTRIBUTES = frozenset({"defaults", "state", "param_groups"})
"""What ``Optimizer.__init__`` sets that a wrapper shares with the wrapped optimizer instead."""


def init_optimizer_bookkeeping(optimizer: Optimizer) -> None:
    """Give a wrapper optimizer what ``Optimizer.__init__`` sets besides the shared containers.

    A scratch ``Optimizer`` is built and everything its ``__init__`` set (the step and
    state-dict hook dicts today) is moved over, fresh for this instance; then the class's
    ``step`` is patched for hooks and profiling as ``__init__`` would (``_patch_step_function``,
    private: ``Optimizer.__init__`` is its only public caller).
    """
    scratch = Optimizer([torch.empty(0)], {})
    for key, value in vars(scratch).items():
        if key not in SHARED_OPTIMIZER_ATTRIBUTES:
            optimizer.__dict__[key] = value
    optimizer._patch_step_function()


def lr_scheduler_step_patch(value: object) -> Callable[..., Any] | None:
    """The function an LR scheduler's instance-level ``step`` wrapper calls, or ``None``.

    ``LRScheduler.__init__`` sets ``optimizer.step`` to a ``functools.wraps`` wrapper of the
    class's ``step`` marked ``_wrapped_by_lr_sched`` (private) that calls it on a weakly
    referenced optimizer: the one the scheduler was built on, never a copy of it.
    """
    if not getattr(value, "_wrapped_by_lr_sched", False):
        return None
    wrapped = getattr(value, "__wrapped__", None)
    return wrapped if callable(wrapped) else None


def patch_step_for_lr_scheduler(optimizer: Optimizer, func: Callable[..., Any]) -> None:
    """Give ``optimizer`` the ``step`` wrapper an LR scheduler built on it would install.

    The same as ``LRScheduler.__init__``'s: it records the call (``_opt_called``, which the
    scheduler's "step order" warning reads) and runs ``func`` on ``optimizer`` (weakly held).
    """
    opt_ref = weakref.ref(optimizer)

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        opt = opt_ref()
        opt._opt_called = True  # type: ignore[union-attr]
        return func.__get__(opt, type(opt))(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    optimizer.__dict__["step"] = wrapper


def in_parametrize_cache() -> bool:
    """Whether a ``torch.nn.utils.parametrize.cached()`` block is active (no public query)."""
    return bool(parametrize._cache_enabled)


def set_shape_(param: nn.Parameter, shape: tuple[int, ...]) -> None:
    """Give ``param`` new zero data of ``shape``, keeping the Parameter object.

    A graph the caller still holds (a ``loss`` variable) keeps the parameter's gradient
    accumulator alive, and autograd reuses it with the old shape: assigning ``.data`` of another
    dtype first makes autograd drop it (it only does so on a dtype or device change). The stale
    gradient goes too.
    """
    fresh = torch.zeros(shape, dtype=param.dtype, device=param.device)
    other = torch.float64 if param.dtype != torch.float64 else torch.float32
    param.data = fresh.new_zeros((), dtype=other)
    param.data = fresh
    param.grad = None


def forget_parameter_sizes(optimizer: Optimizer) -> None:
    """Drop the total parameter size an optimizer cached: ``LBFGS`` sums its parameters' numel at
    its first step (``_numel_cache``, no public reset) and asserts every later flat gradient
    against it, so after a rank step-down resized the factors in place its next step raised
    ``AssertionError: Expected offset 56 to equal 112``. Others cache nothing."""
    if getattr(optimizer, "_numel_cache", None) is not None:
        optimizer._numel_cache = None  # type: ignore[attr-defined]


def foreach_copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``d.copy_(s)`` for every pair, batched."""
    torch._foreach_copy_(list(dst), list(src))


def foreach_zero_(tensors: Sequence[Tensor]) -> None:
    """``t.zero_()`` for every tensor, batched."""
    torch._foreach_zero_(list(tensors))


# --- class surgery -----------------------------------------------------------------------------


def install_instance_forward(module: nn.Module, forward: Callable[..., Tensor]) -> None:
    """Make ``forward`` the forward of ``module`` alone (an instance attribute; deep copies
    rebind it to the copy). For modules no parametrization class is made for."""
    module.__dict__["forward"] = MethodType(forward, module)


def remove_instance_forward(module: nn.Module) -> None:
    """Undo :func:`install_instance_forward`."""
    module.__dict__.pop("forward", None)


def remove_forward_hooks(module: nn.Module, is_ours: Callable[[object], bool]) -> None:
    """Remove the forward hooks of ``module`` for which ``is_ours(hook)`` holds.

    Without the handles that registered them (a model unloaded by the function
    ``merge_and_unload``, whose optimizer is gone) there is no public way to list them;
    ``module._forward_hooks`` is the registry ``register_forward_hook`` fills.
    """
    hooks = module._forward_hooks
    for key in [k for k, hook in hooks.items() if is_ours(hook)]:
        del hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)


def install_forward(module: nn.Module, forward: Callable[..., Tensor]) -> None:
    """Make ``forward`` the forward of ``module``'s own parametrized class.

    ``parametrize.register_parametrization`` gives the module a class of its own
    (``Parametrized<Cls>``); the forward goes there, never on the user's class. A
    ``copy.deepcopy`` of the module shares that class, and is adapted the same way.
    """
    cls = type(module)
    if parametrize.type_before_parametrizations(module) is cls:
        raise RuntimeError(f"{cls.__name__} is not a class made by torch.nn.utils.parametrize")
    cls.forward = forward


def remove_parametrizations(
    module: nn.Module, is_ours: Callable[[nn.Module], bool], forward: Callable[..., Tensor] | None
) -> None:
    """Remove the first parametrization of each tensor of ``module`` where ``is_ours`` holds.

    Later parametrizations on the same tensor stay, over the same original. The originals are
    registered back as plain parameters in their place in the module's order. Unlike
    ``parametrize.remove_parametrizations`` this never edits a class that another module may
    share (a ``copy.deepcopy`` shares it): when other parametrizations remain, the module gets
    a class of its own without the removed properties (and without ``forward`` if it is the
    one chainopt installed).
    """
    plists = cast(nn.ModuleDict, module.parametrizations)
    removed: list[tuple[str, Tensor]] = []
    for name in list(plists.keys()):
        plist = cast(parametrize.ParametrizationList, plists[name])
        if not is_ours(plist[0]):
            continue
        if len(plist) > 1:
            del plist[0]  # the rest of the stack stays, over the same original
            continue
        removed.append((name, plist.original))
        del plists[name]
    cls = type(module)
    base = cls.__mro__[1]
    if len(plists) == 0:
        del module._modules["parametrizations"]  # what parametrize itself does on removal
        module.__class__ = base
    elif removed or (forward is not None and cls.forward is forward):
        drop = {name for name, _ in removed} | {"forward", "__dict__", "__weakref__"}
        body = {k: v for k, v in cls.__dict__.items() if k not in drop}
        module.__class__ = type(cls.__name__, (base,), body)
    for name, original in removed:
        module.register_parameter(name, cast(nn.Parameter, original))


def parameter_order(module: nn.Module) -> tuple[str, ...]:
    """The names of ``module``'s own parameters, in registration order."""
    return tuple(name for name, _ in module.named_parameters(recurse=False))


def restore_parameter_order(module: nn.Module, order: Sequence[str]) -> None:
    """Reorder ``module``'s own parameters to ``order`` (names not in it keep their place after).

    ``module._parameters`` is the registry ``named_parameters``/``state_dict`` read in order;
    there is no public way to insert a parameter at a position.
    """
    params = module._parameters
    rank = {name: i for i, name in enumerate(order)}
    items = sorted(params.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    params.clear()
    params.update(items)
