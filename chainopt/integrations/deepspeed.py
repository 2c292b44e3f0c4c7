"""DeepSpeed: exact knots under ``deepspeed.initialize`` and Accelerate's DeepSpeed plugin.

A :class:`~chainopt.ChainLoRAOptimizer` given to DeepSpeed as its client optimizer trains, but
in every mode that wraps the optimizer its knots are silently wrong without this module:

- **ZeRO-1/2** (``DeepSpeedZeroOptimizer``) and **bf16** (``BF16_Optimizer``; stage 0 in bf16:
  ``FP16_UnfusedOptimizer``) replace the wrapped optimizer's param groups by fp32 *masters*
  (one flat partition per param group, or one copy per parameter), call the client optimizer's
  ``step()`` once per param group, and then copy the masters back into the model. The chain
  would count one step per group, tie its knot half-way through DeepSpeed's step, find no state
  keyed by the factors to reset, and have its restarted A and B overwritten by the stale
  masters: the model then applies the merged link twice.
- **ZeRO-3** (``DeepSpeedZeroOptimizer_Stage3``) also partitions every parameter, the frozen
  weights included: outside a forward ``param.data`` is empty, and a knot cannot even read them.

:func:`deepspeed_knots` (or :func:`initialize`, which calls ``deepspeed.initialize`` and then
it) makes the knots exact:

1. DeepSpeed's wrapper steps the optimizer the chain wraps (``AdamW``, …) directly; the chain
   counts one step, and ties a knot when due, after the wrapper's whole step (masters updated,
   parameters all-gathered). A step DeepSpeed skips (an overflow) is not counted.
2. Around each knot: under ZeRO-3 the adapted weights, the biases with a delta and the factors
   are gathered (``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``), merged and
   restarted whole, and re-partitioned from rank 0's values (every rank computed the same). The
   chain's ``reset=`` policy sees each factor's optimizer state as an entry of its own (gathered
   whole from the masters' state when the policy reads it, written back after); ``"full"``
   drops the state of each master, so the next link starts at the optimizer's first step. Then
   the restarted factors are written into DeepSpeed's masters.
3. Under ZeRO-3 each adapted module's frozen weight and factors are registered as external
   parameters of the module (``deepspeed.zero.register_external_parameter``): its factorised
   forward reads them without calling the parametrization modules that own them.

At stage 0 in fp32 DeepSpeed steps the chain itself, once per step, and nothing changes.
:func:`save_checkpoint` and :func:`load_checkpoint` wrap the engine's: the chain's counters,
generator and history travel in ``client_state``; DeepSpeed saves the rest, the merged frozen
weights included (stages 2 and 3 keep them as "frozen parameter fragments").

Tested in ``tests/test_deepspeed.py`` (DeepSpeed 0.19.8, CPU accelerator, gloo, 1 and 2
processes): stage 0, ZeRO-1, ZeRO-2 and ZeRO-3 in fp32 and bf16 (also ``BF16_Optimizer``),
through ``deepspeed.initialize`` and through Accelerate, resumed from checkpoints. Refused,
because knots could not be made exact or were not tested: fp16 (DeepSpeed has no fp16 on the CPU
accelerator), optimizer or parameter offload, rank step-down (``rank=[8, 4]``: DeepSpeed's flat
buffers keep their shapes), ``init="gradient"`` (DeepSpeed frees the gradients in its step),
``reset="full"`` with a param group holding both factors and other trainable parameters (a
master has one step counter: give those parameters a group of their own), ``non_finite="skip"``
without ``reset="full"``, optimizers that build their state at construction, and schedule-free
optimizers. Build the chain on the plain model, not one built under ``deepspeed.zero.Init``.

Example:
    Build the chain on the bare model, then let this module call ``deepspeed.initialize``
    (``docs/integrations.md`` has the runnable version)::

        import chainopt.integrations.deepspeed as chain_ds

        opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                 target_modules=["q_proj", "v_proj"], knot_every=100)
        engine, _, _, _ = chain_ds.initialize(model=model, optimizer=opt, config=ds_config)
        for batch in loader:
            engine.backward(engine(**batch).loss)
            engine.step()  # ties a knot when the chain's schedule says so

    With Accelerate: ``engine, _ = accelerator.prepare(model, opt)``, then
    ``chain_ds.deepspeed_knots(opt, engine)`` (the prepared model is the engine).
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..iterates import resolve_iterates
from ..optimizer import ChainLoRAOptimizer

__all__ = [
    "DeepSpeedChain",
    "deepspeed_knots",
    "initialize",
    "load_checkpoint",
    "save_checkpoint",
]

_CLIENT_KEY = "chainopt"
_ATTACHED: weakref.WeakKeyDictionary[ChainLoRAOptimizer, DeepSpeedChain] = (
    weakref.WeakKeyDictionary()
)


def _deepspeed() -> Any:
    """The ``deepspeed`` package, or an ImportError that says how to get it."""
    try:
        import deepspeed
    except ImportError as err:
        raise ImportError(
            "chainopt.integrations.deepspeed needs DeepSpeed: pip install deepspeed"
        ) from err
    return deepspeed


def _shape(p: Tensor) -> torch.Size:
    """``p``'s shape, also while ZeRO-3 holds only a partition of it."""
    shape: torch.Size = getattr(p, "ds_shape", p.shape)
    return shape


def _shaped_like(value: object, master: Tensor) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape == master.shape


# --- where DeepSpeed keeps each parameter's fp32 master ----------------------------------------


@dataclass(frozen=True)
class _Fragment:
    """``master.view(-1)[hp : hp + numel]`` holds elements ``lp : lp + numel`` of the flattened
    parameter: this rank's part of it."""

    master: Tensor
    hp: int
    lp: int
    numel: int

    def view(self, tensor: Tensor) -> Tensor:
        """This fragment of ``tensor``, a tensor laid out like :attr:`master` (its state)."""
        return tensor.view(-1).narrow(0, self.hp, self.numel)


class _Layout:
    """How a DeepSpeed optimizer wrapper keeps the masters of the parameters it trains.

    These read DeepSpeed's internal attributes (DeepSpeed 0.19); :func:`_layout` refuses a
    wrapper it does not know.
    """

    kind = ""
    partitioned = True  # masters are split over the data-parallel ranks
    gathers_weights = False  # ZeRO-3: the parameters are partitioned too

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    def masters(self) -> list[tuple[Tensor, list[Tensor]]]:
        """Every master the wrapped optimizer steps (its state key), with the parameters in it."""
        raise NotImplementedError

    def fragments(self, p: Tensor) -> list[_Fragment]:
        """Where this rank keeps ``p``'s master (empty: other ranks keep all of it)."""
        raise NotImplementedError

    def local(self, p: Tensor) -> Tensor:
        """The model's copy of ``p``, flattened, indexed like :attr:`_Fragment.lp`."""
        return p.detach().view(-1)

    def group(self, p: Tensor) -> Any:
        """The process group ``p``'s master is partitioned over (``None``: the default)."""
        return None

    @contextmanager
    def filled_groups(self, optimizer: Any) -> Iterator[None]:
        """The wrapped optimizer's param groups hold every master meanwhile."""
        yield


class _HpMappingLayout(_Layout):
    """ZeRO-1/2 and ``BF16_Optimizer``: one flat fp32 partition per param group; each
    parameter's ``_hp_mapping`` says which part of it is the parameter's."""

    def __init__(self, wrapper: Any, flats: str, groups: str, kind: str) -> None:
        super().__init__(wrapper)
        self.flats, self.groups, self.kind = flats, groups, kind

    def masters(self) -> list[tuple[Tensor, list[Tensor]]]:
        flats = getattr(self.wrapper, self.flats)
        groups = getattr(self.wrapper, self.groups)
        return [(m, list(g)) for m, g in zip(flats, groups, strict=True)]

    def fragments(self, p: Tensor) -> list[_Fragment]:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return []
        master = getattr(self.wrapper, self.flats)[mapping.param_group_index]
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        return [_Fragment(master, int(hp.start), int(lp.start), int(lp.numel))]

    def group(self, p: Tensor) -> Any:
        return getattr(p, "_dp_group", None)


class _Stage3Layout(_Layout):
    """ZeRO-3: one flat fp32 partition per sub-group; a parameter keeps only ``ds_tensor``, its
    partition (``partition_numel()`` elements, the last rank's padded)."""

    kind = "ZeRO-3"
    gathers_weights = True

    def masters(self) -> list[tuple[Tensor, list[Tensor]]]:
        w = self.wrapper
        pairs = zip(w.fp32_partitioned_groups_flat, w.fp16_groups, strict=True)
        return [(m, list(g)) for m, g in pairs]

    def fragments(self, p: Tensor) -> list[_Fragment]:
        w = self.wrapper
        index, offset, size = w.grad_position[w.get_param_id(p)]
        start = dist.get_rank(group=self.group(p)) * int(size)
        valid = max(0, min(int(size), int(_shape(p).numel()) - start))
        if valid == 0:
            return []
        return [_Fragment(w.fp32_partitioned_groups_flat[index], int(offset), start, valid)]

    def local(self, p: Tensor) -> Tensor:
        part: Tensor = getattr(p, "ds_tensor").detach().view(-1)  # noqa: B009 (DeepSpeed's)
        start = dist.get_rank(group=self.group(p)) * part.numel()
        padded = part.new_zeros(start + part.numel())
        padded[start:] = part
        return padded

    def group(self, p: Tensor) -> Any:
        return getattr(p, "ds_process_group", None)

    @contextmanager
    def filled_groups(self, optimizer: Any) -> Iterator[None]:
        # Outside its step ZeRO-3 leaves the wrapped optimizer's param groups empty, while its
        # state is keyed by the masters: put them back, as during the step, for a state_dict.
        w = self.wrapper
        saved = [g["params"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["params"] = []
        for sub, master in enumerate(w.fp32_partitioned_groups_flat):
            optimizer.param_groups[w.sub_group_to_group_id[sub]]["params"].append(master)
        try:
            yield
        finally:
            for g, params in zip(optimizer.param_groups, saved, strict=False):
                g["params"] = params


class _UnfusedLayout(_Layout):
    """``FP16_UnfusedOptimizer`` (bf16 at stage 0): an fp32 copy of each parameter."""

    kind = "FP16_UnfusedOptimizer"
    partitioned = False

    def masters(self) -> list[tuple[Tensor, list[Tensor]]]:
        w = self.wrapper
        pairs = zip(w.fp32_groups, w.fp16_groups, strict=True)
        return [(m, [p]) for ms, ps in pairs for m, p in zip(ms, ps, strict=True)]

    def fragments(self, p: Tensor) -> list[_Fragment]:
        for m, (q,) in self.masters():
            if q is p:
                return [_Fragment(m, 0, 0, p.numel())]
        return []


def _layout(wrapper: Any) -> _Layout:
    """The layout of DeepSpeed's optimizer ``wrapper``.

    Raises:
        NotImplementedError: a wrapper chainopt does not know, or offload.
    """
    name = type(wrapper).__name__
    if name == "DeepSpeedZeroOptimizer":
        if getattr(wrapper, "cpu_offload", False):
            raise NotImplementedError(
                "chainopt does not support ZeRO-Offload (offload_optimizer) under DeepSpeed: "
                "knots were not tested with offloaded masters"
            )
        stage = 2 if getattr(wrapper, "partition_gradients", False) else 1
        flats, groups = "single_partition_of_fp32_groups", "bit16_groups"
        return _HpMappingLayout(wrapper, flats, groups, f"ZeRO-{stage}")
    if name == "BF16_Optimizer":
        return _HpMappingLayout(wrapper, "fp32_groups_flat_partition", "bf16_groups", name)
    if name == "DeepSpeedZeroOptimizer_Stage3":
        if getattr(wrapper, "offload_optimizer", False) or getattr(wrapper, "offload_param", False):
            raise NotImplementedError(
                "chainopt does not support ZeRO-3 offload (offload_optimizer/offload_param) "
                "under DeepSpeed: knots were not tested with offloaded masters or parameters"
            )
        return _Stage3Layout(wrapper)
    if name == "FP16_UnfusedOptimizer":
        return _UnfusedLayout(wrapper)
    raise NotImplementedError(
        f"chainopt does not support DeepSpeed's {name} optimizer wrapper (supported: stage 0, "
        "ZeRO-1/2/3, BF16_Optimizer, FP16_UnfusedOptimizer)"
    )


# --- the integration ---------------------------------------------------------------------------


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


def deepspeed_knots(optimizer: ChainLoRAOptimizer, engine: Any) -> DeepSpeedChain:
    """Make the knots of ``optimizer`` exact under the DeepSpeed ``engine`` built with it.

    Call it once, right after ``deepspeed.initialize(model=model, optimizer=optimizer, ...)``
    or Accelerate's ``accelerator.prepare(model, optimizer)`` (pass the prepared model: it is
    the engine), before the first step. The module docstring says what it changes.

    Args:
        optimizer: the chain, built on the bare model before DeepSpeed saw it.
        engine: the ``DeepSpeedEngine``.

    Returns:
        The :class:`DeepSpeedChain`; its ``remove()`` undoes this.

    Raises:
        ImportError: DeepSpeed is not installed.
        TypeError: ``optimizer`` is not a ChainLoRAOptimizer.
        RuntimeError: this was already called for the chain.
        ValueError: see :class:`DeepSpeedChain`.
        NotImplementedError: see :class:`DeepSpeedChain`.
    """
    _deepspeed()
    if not isinstance(optimizer, ChainLoRAOptimizer):
        raise TypeError(f"optimizer must be a ChainLoRAOptimizer, got {type(optimizer).__name__}")
    if optimizer in _ATTACHED:
        raise RuntimeError("deepspeed_knots was already called for this chain")
    handle = DeepSpeedChain(optimizer, engine)
    _ATTACHED[optimizer] = handle
    return handle


def _handle(optimizer: ChainLoRAOptimizer) -> DeepSpeedChain:
    handle = _ATTACHED.get(optimizer)
    if handle is None:
        raise RuntimeError("call deepspeed_knots(optimizer, engine) or initialize(...) first")
    return handle


def initialize(
    *, model: nn.Module, optimizer: ChainLoRAOptimizer, config: Any = None, **kwargs: Any
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` for a chain, then :func:`deepspeed_knots`.

    A config given as a dict or as the path of a JSON file gets
    ``"zero_allow_untested_optimizer": true`` (as Accelerate sets it): DeepSpeed then steps the
    optimizer the chain wraps, while it checks the type of the one it is given.

    Args:
        model: the chained model (``optimizer.model``).
        optimizer: the chain.
        config: the DeepSpeed config.
        **kwargs: passed on to ``deepspeed.initialize`` (``lr_scheduler``, ``training_data``, …).

    Returns:
        What ``deepspeed.initialize`` returns: ``(engine, optimizer, dataloader, lr_scheduler)``.

    Raises:
        ValueError: ``model`` is not the chain's model; see also :func:`deepspeed_knots`.
    """
    deepspeed = _deepspeed()
    if model is not optimizer.model:
        raise ValueError("model must be the model the ChainLoRAOptimizer was built on")
    if isinstance(config, (str, os.PathLike)):
        config = json.loads(Path(config).read_text())
    if isinstance(config, Mapping):
        config = {**config, "zero_allow_untested_optimizer": True}
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config, **kwargs
    )
    deepspeed_knots(optimizer, engine)
    return engine, ds_optimizer, loader, scheduler


def save_checkpoint(
    engine: Any,
    optimizer: ChainLoRAOptimizer,
    save_dir: str | os.PathLike[str],
    tag: str | None = None,
    client_state: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``engine.save_checkpoint``, with the chain's counters, generator and history.

    Call it on every rank. Your ``client_state`` is saved too (the key ``"chainopt"`` is the
    chain's).

    Returns:
        What ``engine.save_checkpoint`` returns.
    """
    state = {**(client_state or {}), **_handle(optimizer).client_state()}
    return engine.save_checkpoint(str(save_dir), tag=tag, client_state=state, **kwargs)


def load_checkpoint(
    engine: Any,
    optimizer: ChainLoRAOptimizer,
    load_dir: str | os.PathLike[str],
    tag: str | None = None,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """``engine.load_checkpoint`` of a :func:`save_checkpoint`, the chain's state included.

    Call it on every rank, with the engine and the chain built as for the saved run. Under
    ZeRO-3 the module's load takes only its buffers (merge residuals): DeepSpeed restores the
    partitioned parameters from its own shards (the engine's ``custom_load_fn``; pass one to
    override).

    Returns:
        ``(path, client_state)`` as ``engine.load_checkpoint`` returns them, less the chain's
        entry; ``(None, {})`` if there was nothing to load.

    Raises:
        ValueError: the checkpoint holds no chain, or one of another chain config.
    """
    handle = _handle(optimizer)
    if handle._layout is not None and handle._layout.gathers_weights:
        kwargs.setdefault("custom_load_fn", _load_buffers)
    path, client = engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)
    if path is None:
        return None, {}
    client = dict(client or {})
    handle.load_client_state(client)
    client.pop(_CLIENT_KEY, None)
    return path, client


def _load_buffers(src: Mapping[str, Any], dst: nn.Module) -> None:
    """ZeRO-3's module load: the buffers only. The saved parameters are empty placeholders,
    which chainopt's load check refuses; DeepSpeed loads the parameters from its shards."""
    buffers = dict(dst.named_buffers())
    with torch.no_grad():
        for name, value in src.items():
            if name in buffers and isinstance(value, Tensor):
                buffers[name].copy_(value)
