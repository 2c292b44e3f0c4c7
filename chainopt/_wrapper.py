"""An ``Optimizer`` that shares its groups, state and defaults with the optimizer it wraps.

:class:`~chainopt.ChainLoRAOptimizer` builds on this: LR schedulers, ``GradScaler``,
Accelerate and the HF ``Trainer`` read and write ``param_groups``/``state``/``defaults`` and
register state-dict hooks as on any optimizer, and every other attribute (schedule-free's
``train()``/``eval()``, bitsandbytes' paging) reaches the wrapped optimizer, as do the
``grad_scale`` and ``found_inf`` a ``GradScaler`` sets for a fused step (fused Adam or SGD unscale
and skip inside their own step). Nothing here knows about chains.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from types import MethodType
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from ._surgery import (
    init_optimizer_bookkeeping,
    lr_scheduler_step_patch,
    patch_step_for_lr_scheduler,
)
from .advice import ChainLoRAWarning, warn_frozen_parameters

__all__ = ["WrappedOptimizer", "own_instance_patches"]


def own_instance_patches(clone: Optimizer, original: Optimizer) -> None:
    """Make the methods patched on ``original``'s instance act on ``clone``, a copy of it.

    A copy takes the instance's attributes (a torch optimizer's own copy drops them), and with
    them what other code set there in place of a method: an LR scheduler's ``step`` wrapper calls
    the *original's* step through a weak reference (the copy would train the original, then fail
    once it is collected), a method bound to the original (``copy.copy``) runs on the original.
    On the copy, methods bound to the original are bound to the copy, an LR scheduler's wrapper
    is built again for the copy (so a scheduler copied along keeps working), and any other
    function patched over a method (a closure chainopt cannot see into) is left out, with a
    :class:`~chainopt.ChainLoRAWarning`: the copy runs the class's method.
    """
    for name, value in list(original.__dict__.items()):
        if name.startswith("__") or not callable(getattr(type(original), name, None)):
            continue
        if isinstance(value, MethodType):
            if value.__self__ is original:
                clone.__dict__[name] = MethodType(value.__func__, clone)
            continue
        func = lr_scheduler_step_patch(value) if name == "step" else None
        if func is not None:
            patch_step_for_lr_scheduler(clone, func)
            continue
        clone.__dict__.pop(name, None)
        warnings.warn(
            f"the copy of this {type(clone).__name__} does not keep {name!r}, which something "
            f"patched on the original instance ({value!r}): it could act on the original; the "
            f"copy runs the class's {name}, patch it again on the copy if needed",
            ChainLoRAWarning,
            stacklevel=3,
        )


class WrappedOptimizer(Optimizer):
    """The plumbing of an optimizer around ``base``; subclasses add ``step`` and their state.

    ``Optimizer.__init__`` is not called (it would build new containers): the shared ones are
    properties, and the rest of its bookkeeping (the hook dicts, the patched ``step``) comes
    from ``_surgery.init_optimizer_bookkeeping``.
    """

    def __init__(self, base: Optimizer) -> None:
        self._base = base
        init_optimizer_bookkeeping(self)

    def __getattr__(self, name: str) -> Any:
        """The wrapped optimizer's own API; only reached for names the wrapper does not have."""
        base = self.__dict__.get("_base")
        if base is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        try:
            return getattr(base, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__!r} object (nor the {type(base).__name__!r} it wraps) has "
                f"no attribute {name!r}"
            ) from None

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._base

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._base.param_groups = value

    @property
    def state(self) -> Any:
        return self._base.state

    @state.setter
    def state(self, value: Any) -> None:
        self._base.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self._base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._base.defaults = value

    # A GradScaler over an optimizer whose step unscales and skips by itself (fused Adam/SGD:
    # ``_step_supports_amp_scaling``, read from the wrapped one) sets these two on the optimizer
    # it steps, the wrapper, for the step to read: they go where that step reads them.
    @property
    def grad_scale(self) -> Any:
        """The wrapped optimizer's ``grad_scale`` (set by a ``GradScaler`` around a fused step)."""
        return self._forwarded("grad_scale")

    @grad_scale.setter
    def grad_scale(self, value: Any) -> None:
        self._base.grad_scale = value  # type: ignore[attr-defined]

    @grad_scale.deleter
    def grad_scale(self) -> None:
        del self._base.grad_scale  # type: ignore[attr-defined]

    @property
    def found_inf(self) -> Any:
        """The wrapped optimizer's ``found_inf`` (set by a ``GradScaler`` around a fused step)."""
        return self._forwarded("found_inf")

    @found_inf.setter
    def found_inf(self, value: Any) -> None:
        self._base.found_inf = value  # type: ignore[attr-defined]

    @found_inf.deleter
    def found_inf(self) -> None:
        del self._base.found_inf  # type: ignore[attr-defined]

    def _forwarded(self, name: str) -> Any:
        try:
            return getattr(self._base, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__!r} object (nor the {type(self._base).__name__!r} it wraps) "
                f"has no attribute {name!r}"
            ) from None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer.

        Warns (:class:`~chainopt.ChainLoRAWarning`) for parameters that do not require
        gradients: they would never train.
        """
        params = param_group.get("params", ())
        warn_frozen_parameters([params] if isinstance(params, Tensor) else list(params))
        self._base.add_param_group(param_group)

    def _hooked_state_dict(self, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """``build()`` between the state-dict pre- and post-hooks, as ``Optimizer`` runs them."""
        for pre in self._optimizer_state_dict_pre_hooks.values():
            pre(self)
        sd = build()
        for post in self._optimizer_state_dict_post_hooks.values():
            sd = post(self, sd) or sd
        return sd

    def _hooked_load(
        self, state_dict: dict[str, Any], load: Callable[[dict[str, Any]], None]
    ) -> None:
        """``load(state_dict)`` between the load pre-hooks (which may replace it) and post-hooks."""
        for pre in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre(self, state_dict) or state_dict
        load(state_dict)
        for post in self._optimizer_load_state_dict_post_hooks.values():
            post(self)

    def __copy__(self) -> WrappedOptimizer:
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        own_instance_patches(clone, self)
        return clone
