"""The object that keeps a chain and a DeepSpeed engine in step (see
:mod:`chainopt.integrations.deepspeed`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .._schedule_free import resolve_iterates
from ..optimizer import ChainLoRAOptimizer
from ._deepspeed_layouts import _deepspeed, _Layout, _layout, _shape, _shaped_like, _UnfusedLayout

__all__ = ["DeepSpeedChain"]

_CLIENT_KEY = "chainopt"
_ATTACHED: weakref.WeakKeyDictionary[ChainLoRAOptimizer, DeepSpeedChain] = (
    weakref.WeakKeyDictionary()
)


class DeepSpeedChain:
    """A chain's knots under one DeepSpeed engine; made by :func:`deepspeed_knots`.

    Attributes:
        optimizer: the chain.
        engine: the ``DeepSpeedEngine``.
        mode: ``"stage 0"`` (DeepSpeed steps the chain itself), ``"ZeRO-1"``, ``"ZeRO-2"``,
            ``"ZeRO-3"``, ``"BF16_Optimizer"`` or ``"FP16_UnfusedOptimizer"``.

    Raises:
        ValueError: the engine was built with another optimizer, or an option of the chain that
            cannot be exact in this mode (the message says which and why).
        NotImplementedError: fp16, offload, or a DeepSpeed optimizer wrapper chainopt does not
            know.
    """

    def __init__(self, optimizer: ChainLoRAOptimizer, engine: Any) -> None:
        self.optimizer = optimizer
        self.engine = engine
        self._layout: _Layout | None = None
        self._wrapper: Any = None
        self.mode = "stage 0"
        if getattr(engine, "fp16_enabled", lambda: False)():
            raise NotImplementedError(
                "chainopt does not support DeepSpeed's fp16 mode: it could not be tested "
                "(DeepSpeed's CPU accelerator has no fp16 on the machines chainopt is tested "
                "on); bf16 is supported"
            )
        wrapper = getattr(engine, "optimizer", None)
        if wrapper is optimizer:  # stage 0 in fp32: DeepSpeed steps the chain, once per step
            return
        if wrapper is None or getattr(wrapper, "optimizer", None) is not optimizer:
            raise ValueError(
                "this engine was not initialised with this ChainLoRAOptimizer as its optimizer: "
                "give deepspeed.initialize(model=model, optimizer=opt, ...) the chain itself "
                "(and no 'optimizer' section in the DeepSpeed config)"
            )
        layout = _layout(wrapper)
        self._check(layout)
        self._layout, self._wrapper, self.mode = layout, wrapper, layout.kind
        self._reads_state = optimizer.config.reset not in ("full", "none")
        self._bf16 = bool(getattr(engine, "bfloat16_enabled", lambda: False)())
        if layout.gathers_weights:
            self._register_external_parameters()
        if isinstance(layout, _UnfusedLayout):
            self._undo_construction_step(layout)
        wrapper.optimizer = optimizer.optimizer  # DeepSpeed steps the wrapped optimizer itself
        self._own_step = "step" in vars(wrapper)  # an instance attribute to put back on remove
        self._step = wrapper.step
        wrapper.step = self._wrapper_step
        self._remove_context = _register_knot_context(optimizer, self._knot_context)

    # --- setup ---
    def _check(self, layout: _Layout) -> None:
        opt, config = self.optimizer, self.optimizer.config
        where = f"under DeepSpeed ({layout.kind})"
        if len(set(config.ranks)) > 1:
            raise ValueError(
                f"rank step-down (rank={list(config.ranks)}) is not supported {where}: "
                "DeepSpeed's flat buffers keep every parameter's shape"
            )
        if config.init == "gradient":
            raise ValueError(
                f'init="gradient" is not supported {where}: DeepSpeed frees the gradients '
                "inside its step, before the chain could read them"
            )
        if config.non_finite == "skip" and config.reset != "full":
            raise ValueError(
                f'non_finite="skip" needs reset="full" {where}: a dropped link must lose its '
                "optimizer state, and a master's step counter is shared with other links"
            )
        if resolve_iterates(opt.optimizer) is not None:
            raise ValueError(
                f"optimizers that keep their own iterates (schedule-free) are not supported "
                f"{where}: their train/eval swap would act on DeepSpeed's masters"
            )
        if any(opt.optimizer.state.get(p) for p in opt.factors()):
            raise ValueError(
                f"{type(opt.optimizer).__name__} built optimizer state for the factors at "
                f"construction; such optimizers are not supported {where}: a knot could not "
                "give a DeepSpeed master its construction-time state back"
            )
        if config.reset == "full":
            factors = {id(p) for p in opt.factors()}
            for _, params in layout.masters():
                ours = [id(p) in factors for p in params]
                if any(ours) and not all(ours):
                    raise ValueError(
                        f'reset="full" is not supported {where} when a param group holds both '
                        "factors and other trainable parameters (trainable_modules): DeepSpeed "
                        "keeps one step counter per group. Give the other parameters a param "
                        "group of their own, e.g. AdamW([{'params': head.parameters()}, "
                        "{'params': rest}])"
                    )

    def _undo_construction_step(self, layout: _Layout) -> None:
        """``FP16_UnfusedOptimizer`` steps its client optimizer once when it is built, on zero
        gradients, to create the state: not a training step. It is not counted, and its state
        (AdamW at step 1, zero moments) goes, so the first real step is AdamW's first."""
        opt = self.optimizer
        if getattr(self.engine, "global_steps", 0) != 0 or opt.optimizer_steps != 1:
            return
        if opt.knots_tied:
            raise ValueError(
                "DeepSpeed's FP16_UnfusedOptimizer stepped the chain once when it was built, and "
                "that step tied a knot; schedule the first knot later"
            )
        opt.optimizer_steps = 0
        for master, _ in layout.masters():
            opt.optimizer.state.pop(master, None)

    def _register_external_parameters(self) -> None:
        zero = _deepspeed().zero
        for r in self.optimizer.chain.records:
            for p in [r.weight, *r.factors()]:
                zero.register_external_parameter(r.module, p)
            if r.delta is not None and r.bias is not None:
                zero.register_external_parameter(r.module, r.bias)

    def remove(self) -> None:
        """Undo :func:`deepspeed_knots` (DeepSpeed then steps the chain again: wrong knots)."""
        _ATTACHED.pop(self.optimizer, None)
        if self._wrapper is None:
            return
        self._remove_context()
        if self._own_step:
            self._wrapper.step = self._step
        else:
            del self._wrapper.step
        self._wrapper.optimizer = self.optimizer
        self._wrapper = None

    # --- each step ---
    def _wrapper_step(self, *args: Any, **kwargs: Any) -> Any:
        out = self._step(*args, **kwargs)
        if not bool(getattr(self._wrapper, "overflow", False)):
            self._count_step()
        return out

    def _count_step(self) -> None:
        """The chain's ``step()``, whose wrapped optimizer DeepSpeed has just stepped."""
        if self._bf16:  # DeepSpeed's bf16 copies of the factors, over its fp32 masters
            self.optimizer.accept_dtypes()
        self.optimizer.count_step()

    # --- around each knot ---
    @contextmanager
    def _knot_context(self, chain: Any) -> Iterator[None]:
        layout = self._layout
        assert layout is not None
        factors = list(chain.factors())
        fresh: set[int] = set()
        try:
            with self._gathered(chain) if layout.gathers_weights else nullcontext():
                entries = self._expose_state(layout, factors)
                try:
                    yield
                finally:
                    fresh = self._absorb_state(layout, entries)
        finally:  # also after a knot that raised half-way: the masters follow the model
            self._write_masters(layout, factors)
            self._drop_states(layout, fresh)

    def _gathered(self, chain: Any) -> Any:
        params: list[Tensor] = []
        for r in chain.records:
            params += [r.weight, *r.factors()]
            if r.delta is not None and r.bias is not None:
                params.append(r.bias)
        return _deepspeed().zero.GatheredParameters(params, modifier_rank=0)

    def _expose_state(
        self, layout: _Layout, factors: Sequence[Tensor]
    ) -> dict[Tensor, dict[str, Any]]:
        """Give each factor an entry in the wrapped optimizer's ``state`` for the reset policy.

        With ``reset="full"`` or ``"none"`` the entry is empty (the policy drops it or keeps
        it); otherwise it holds the factor's state tensors, whole, and the counters.
        """
        state = self.optimizer.optimizer.state
        if not any(state.get(m) for m, _ in layout.masters()):
            return {}  # no step since the start or the last knot: nothing to reset
        entries: dict[Tensor, dict[str, Any]] = {p: {} for p in factors}
        if self._reads_state:
            self._gather_state(layout, factors, entries)
        for p, entry in entries.items():
            state[p] = entry
        return entries

    def _gather_state(
        self, layout: _Layout, factors: Sequence[Tensor], entries: dict[Tensor, dict[str, Any]]
    ) -> None:
        """Fill ``entries[p]`` with each state tensor of factor ``p``, whole, and a copy of the
        counters (``step``): one all-reduce per state key, to which each rank adds its fragments
        and zeros elsewhere (so the sum is exact)."""
        state = self.optimizer.optimizer.state
        master = next(m for m, _ in layout.masters() if state.get(m))
        keys = [k for k, v in state[master].items() if _shaped_like(v, master)]
        counters = {k: v for k, v in state[master].items() if k not in keys}
        sizes = [_shape(p).numel() for p in factors]
        for key in keys:
            flat = master.new_zeros(sum(sizes))
            for p, part in zip(factors, torch.split(flat, sizes), strict=True):
                for f in layout.fragments(p):
                    if key in state.get(f.master, {}):
                        part.narrow(0, f.lp, f.numel).copy_(f.view(state[f.master][key]))
            if layout.partitioned and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flat, group=layout.group(factors[0]))
            for p, part in zip(factors, torch.split(flat, sizes), strict=True):
                entries[p][key] = part.view(_shape(p))
        for p in factors:
            copies = {k: v.clone() if isinstance(v, Tensor) else v for k, v in counters.items()}
            entries[p].update(copies)

    def _absorb_state(self, layout: _Layout, entries: dict[Tensor, dict[str, Any]]) -> set[int]:
        """Take the per-factor entries out again and write back what the policy changed.

        Returns:
            The ids of the factors whose state the policy dropped (or replaced).
        """
        state = self.optimizer.optimizer.state
        fresh: set[int] = set()
        for p, entry in entries.items():
            if state.pop(p, None) is not entry:
                fresh.add(id(p))
                continue
            if not self._reads_state:
                continue
            for key, value in entry.items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape == _shape(p):
                    for f in layout.fragments(p):
                        if key in state.get(f.master, {}):
                            own = value.view(-1).narrow(0, f.lp, f.numel)
                            f.view(state[f.master][key]).copy_(own)
        return fresh

    @torch.no_grad()
    def _write_masters(self, layout: _Layout, factors: Sequence[Tensor]) -> None:
        """The factors as the knot left them into DeepSpeed's fp32 masters."""
        for p in factors:
            local = layout.local(p)
            for f in layout.fragments(p):
                f.view(f.master).copy_(local.narrow(0, f.lp, f.numel))

    def _drop_states(self, layout: _Layout, fresh: set[int]) -> None:
        """Drop the state of each master whose factors all lost theirs."""
        if not fresh:
            return
        state = self.optimizer.optimizer.state
        for master, params in layout.masters():
            dropped = [id(p) in fresh for p in params]
            if all(dropped):
                state.pop(master, None)  # the next step starts this master's state afresh
            elif any(dropped):  # refused by _check; zero their moments, keep the counter
                for p in params:
                    for f in layout.fragments(p) if id(p) in fresh else []:
                        for value in state.get(master, {}).values():
                            if _shaped_like(value, master):
                                f.view(value).zero_()
        if hasattr(self._wrapper, "_hp_optimizer_states_linked"):
            self._wrapper._hp_optimizer_states_linked = False  # DeepSpeed relinks its views

    # --- checkpoints ---
    def client_state(self) -> dict[str, Any]:
        """The chain's entry for a DeepSpeed checkpoint's ``client_state``."""
        with self._state_dict_view():
            return {_CLIENT_KEY: self.optimizer.state_dict()["chainopt"]}

    def load_client_state(self, client_state: Mapping[str, Any]) -> None:
        """Restore the chain's counters, generator and history from ``client_state``.

        Raises:
            ValueError: ``client_state`` holds no chain, or one that does not fit this chain.
        """
        entry = client_state.get(_CLIENT_KEY)
        if not isinstance(entry, dict):
            raise ValueError(
                "the DeepSpeed checkpoint's client_state holds no chain: save it with "
                "chainopt.integrations.deepspeed.save_checkpoint"
            )
        with self._state_dict_view():  # the wrapped optimizer's state as DeepSpeed loaded it
            base = self.optimizer.optimizer.state_dict()
            self.optimizer.load_state_dict({**base, _CLIENT_KEY: entry})

    @contextmanager
    def _state_dict_view(self) -> Iterator[None]:
        if self._layout is None:
            yield
            return
        with ExitStack() as stack:
            if self._layout.gathers_weights:  # the load checks the factors' shapes
                zero = _deepspeed().zero
                stack.enter_context(zero.GatheredParameters(self.optimizer.factors()))
            stack.enter_context(self._layout.filled_groups(self.optimizer.optimizer))
            yield


class _EngineKnots:
    """The knot context, marked as one whose engine steps the factors through its own masters
    (chainopt's knot then does not require the wrapped optimizer's groups to hold them)."""

    steps_factors = True

    def __init__(self, context: Callable[[Any], Any]) -> None:
        self.context = context

    def __call__(self, chain: Any) -> Any:
        return self.context(chain)


def _register_knot_context(optimizer: ChainLoRAOptimizer, context: Any) -> Callable[[], Any]:
    """``optimizer.register_knot_context(context)``; returns what removes it."""
    return optimizer.register_knot_context(_EngineKnots(context)).remove
