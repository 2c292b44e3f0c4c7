"""An ``Optimizer`` that shares its groups, state and defaults with the optimizer it wraps.

:class:`~chainopt.ChainLoRAOptimizer` builds on this: LR schedulers, ``GradScaler``,
Accelerate and the HF ``Trainer`` read and write ``param_groups``/``state``/``defaults`` and
register state-dict hooks as on any optimizer, and every other attribute (schedule-free's
``train()``/``eval()``, bitsandbytes' paging) reaches the wrapped optimizer. Nothing here knows
about chains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from ._surgery import init_optimizer_bookkeeping
from .advice import warn_frozen_parameters

__all__ = ["WrappedOptimizer"]


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
        return clone
