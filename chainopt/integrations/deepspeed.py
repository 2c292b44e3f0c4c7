"""DeepSpeed: exact knots under ``deepspeed.initialize`` and Accelerate's DeepSpeed plugin.

A :class:`~chainopt.ChainLoRAOptimizer` given to DeepSpeed as the client optimizer trains, but
without this module its knots are silently wrong under every mode that wraps the optimizer:

- **ZeRO-1/2** (``DeepSpeedZeroOptimizer``) and **bf16** (``BF16_Optimizer``, and the
  stage-0 bf16 engine's ``FP16_UnfusedOptimizer``) replace the wrapped optimizer's param groups
  by fp32 *master* tensors (flat partitions, one per param group), call its ``step()`` once per
  param group, then copy the masters back into the model's parameters. The chain's ``step()``
  would count one optimizer step per group, tie its knot half-way through DeepSpeed's step, find
  no optimizer state keyed by the factors to reset, and see its restarted A and B overwritten
  by the stale masters a moment later: the model then computes ``W + s·B·A`` with the old link
  merged *and* still applied.
- **ZeRO-3** (``DeepSpeedZeroOptimizer_Stage3``) also partitions every parameter, the frozen
  weights included: outside a forward ``param.data`` is empty, so a knot cannot even read them.

:func:`deepspeed_knots` (or :func:`initialize`, which calls ``deepspeed.initialize`` and then
it) makes knots exact in those modes:

1. DeepSpeed's wrapper steps the optimizer the chain wraps (``AdamW``, …) directly, and the
   chain counts one step, and ties a knot when due, after the wrapper's whole step (masters
   updated, parameters all-gathered); a step DeepSpeed skips (fp16 overflow) is not counted.
2. Around every knot: under ZeRO-3 the adapted weights (and biases with a delta) and the factors
   are gathered (``deepspeed.zero.GatheredParameters(..., modifier_rank=0)``), the knot merges
   and restarts them whole, and they are re-partitioned, every rank holding rank 0's values.
   Each factor's optimizer state is shown to the chain's ``reset=`` policy as a per-factor
   entry (gathered from the ranks' partitions when the policy reads it) and written back;
   then the restarted factors are written into DeepSpeed's fp32 masters. ``reset="full"``
   drops the state of each master, so the next link starts from the optimizer's first step.
3. Under ZeRO-3 the adapted modules' frozen weights and factors are registered as external
   parameters of the module whose factorised forward reads them
   (``deepspeed.zero.register_external_parameter``), so DeepSpeed gathers them for it.

The stage-0 fp32 engine steps the chain itself; this module then only adds nothing but the
checkpoint helpers. :func:`save_checkpoint` and :func:`load_checkpoint` wrap the engine's: the
chain's counters, generator and history travel in ``client_state``; DeepSpeed saves the rest
(the merged frozen weights too: stage 2 and 3 store them as "frozen parameter fragments").

Tested (``tests/test_deepspeed.py``, DeepSpeed's CPU accelerator, gloo, 1 and 2 processes):
stage 0, ZeRO-1, ZeRO-2 and ZeRO-3, fp32 and bf16 (stage 0 bf16 not: see below), through
``deepspeed.initialize`` and through Accelerate. Refused with an error, because knots could not
be made exact or were not tested: optimizer or parameter offload, rank step-down
(``rank=[8, 4]``: DeepSpeed's flat buffers keep their shapes), ``init="gradient"`` (DeepSpeed
frees the gradients inside its step), ``reset="full"`` with a param group that holds both
factors and other trainable parameters (a master has one step counter; put the other
parameters in a group of their own), ``non_finite="skip"`` unless ``reset="full"``, and wrapped
optimizers that build state at construction (Adagrad). The chain must be built on the plain
model, not one built under ``deepspeed.zero.Init``.

Example:
    Build the chain on the bare model, then let this module call ``deepspeed.initialize``::

        import chainopt.integrations.deepspeed as chain_ds

        opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3),
                                 target_modules=["q_proj", "v_proj"], knot_every=100)
        engine, _, _, _ = chain_ds.initialize(model=model, optimizer=opt, config=ds_config)
        for batch in loader:
            engine.backward(engine(**batch).loss)
            engine.step()  # ties a knot when the chain's schedule says so

    With Accelerate: ``model, _ = accelerator.prepare(model, opt)``, then
    ``chain_ds.deepspeed_knots(opt, model)`` (the prepared model is the engine).
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

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


# --- where DeepSpeed keeps each parameter's fp32 master ---------------------------------------


@dataclass(frozen=True)
class _Fragment:
    """``master.view(-1)[hp : hp + numel]`` holds elements ``lp : lp + numel`` of the flattened
    parameter (this rank's part of it)."""

    master: Tensor
    hp: int
    lp: int
    numel: int

    def view(self, tensor: Tensor) -> Tensor:
        """This fragment of ``tensor``, a tensor laid out like :attr:`master`."""
        return tensor.view(-1).narrow(0, self.hp, self.numel)


class _Layout:
    """How one DeepSpeed optimizer wrapper lays out the masters of the parameters it trains."""

    kind = ""
    partitioned = True  # masters are split over the data-parallel ranks
    gathers_weights = False  # ZeRO-3: parameters are partitioned too

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    def masters(self) -> list[tuple[Tensor, list[nn.Parameter]]]:
        """Every master tensor the wrapped optimizer steps, with the parameters it holds."""
        raise NotImplementedError

    def fragments(self, p: nn.Parameter) -> list[_Fragment]:
        """Where this rank keeps ``p``'s master (empty: another rank keeps all of it)."""
        raise NotImplementedError

    def local(self, p: nn.Parameter) -> Tensor:
        """The model's own copy of ``p``, flattened, indexed like :attr:`_Fragment.lp`."""
        return p.detach().view(-1)

    def group(self, p: nn.Parameter) -> Any:
        """The process group ``p``'s master is partitioned over."""
        return None


class _HpMappingLayout(_Layout):
    """ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and ``BF16_Optimizer``: one flat fp32 partition per
    param group; each parameter's part of it is described by its ``_hp_mapping``."""

    def __init__(self, wrapper: Any, flats: str, groups: str, kind: str) -> None:
        super().__init__(wrapper)
        self.flats, self.groups, self.kind = flats, groups, kind

    def masters(self) -> list[tuple[Tensor, list[nn.Parameter]]]:
        flats = getattr(self.wrapper, self.flats)
        return [(m, list(g)) for m, g in zip(flats, getattr(self.wrapper, self.groups), strict=True)]

    def fragments(self, p: nn.Parameter) -> list[_Fragment]:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            return []
        master = getattr(self.wrapper, self.flats)[mapping.param_group_index]
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        return [_Fragment(master, int(hp.start), int(lp.start), int(lp.numel))]

    def group(self, p: nn.Parameter) -> Any:
        return getattr(p, "_dp_group", None)


class _Stage3Layout(_Layout):
    """ZeRO-3: flat fp32 partitions per sub-group; parameters hold only ``ds_tensor``."""

    kind = "ZeRO-3"
    gathers_weights = True

    def masters(self) -> list[tuple[Tensor, list[nn.Parameter]]]:
        w = self.wrapper
        return [(m, list(g)) for m, g in zip(w.fp32_partitioned_groups_flat, w.fp16_groups, strict=True)]

    def fragments(self, p: nn.Parameter) -> list[_Fragment]:
        w = self.wrapper
        index, offset, size = w.grad_position[w.get_param_id(p)]
        start = dist.get_rank(group=self.group(p)) * int(size)
        valid = max(0, min(int(size), int(getattr(p, "ds_numel")) - start))
        if valid == 0:
            return []
        return [_Fragment(w.fp32_partitioned_groups_flat[index], int(offset), start, valid)]

    def local(self, p: nn.Parameter) -> Tensor:
        # ds_tensor is this rank's partition; index it by the whole parameter's offsets
        part: Tensor = getattr(p, "ds_tensor").detach().view(-1)
        start = dist.get_rank(group=self.group(p)) * part.numel()
        padded = part.new_zeros(start + part.numel())
        padded[start:] = part
        return padded

    def group(self, p: nn.Parameter) -> Any:
        return getattr(p, "ds_process_group", None)


class _UnfusedLayout(_Layout):
    """``FP16_UnfusedOptimizer`` (bf16/fp16 without ZeRO): one fp32 copy per parameter."""

    kind = "FP16_UnfusedOptimizer"
    partitioned = False

    def masters(self) -> list[tuple[Tensor, list[nn.Parameter]]]:
        w = self.wrapper
        return [
            (m, [p])
            for ms, ps in zip(w.fp32_groups, w.fp16_groups, strict=True)
            for m, p in zip(ms, ps, strict=True)
        ]

    def fragments(self, p: nn.Parameter) -> list[_Fragment]:
        for m, ps in self.masters():
            if ps[0] is p:
                return [_Fragment(m, 0, 0, p.numel())]
        return []


def _layout(wrapper: Any) -> _Layout:
    """The layout of ``wrapper``, DeepSpeed's optimizer wrapper; refuse what is not supported.

    Raises:
        NotImplementedError: an unsupported wrapper, or offload.
    """
    name = type(wrapper).__name__
    if name == "DeepSpeedZeroOptimizer":
        if getattr(wrapper, "cpu_offload", False):
            raise NotImplementedError(
                "chainopt does not support ZeRO-Offload (offload_optimizer) under DeepSpeed: "
                "knots were not tested with offloaded masters"
            )
        stage = 2 if getattr(wrapper, "partition_gradients", False) else 1
        return _HpMappingLayout(
            wrapper, "single_partition_of_fp32_groups", "bit16_groups", f"ZeRO-{stage}"
        )
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
    """A chain's knots under one DeepSpeed engine (made by :func:`deepspeed_knots`).

    Attributes:
        optimizer: the chain.
        engine: the DeepSpeed engine.
        mode: ``"stage 0"``, ``"ZeRO-1"``, ``"ZeRO-2"``, ``"ZeRO-3"``, ``"BF16_Optimizer"``
            or ``"FP16_UnfusedOptimizer"``.
    """

    def __init__(self, optimizer: ChainLoRAOptimizer, engine: Any) -> None:
        self.optimizer = optimizer
        self.engine = engine
        wrapper = getattr(engine, "optimizer", None)
        if wrapper is optimizer:  # stage 0, fp32: DeepSpeed steps the chain itself
            self._layout: _Layout | None = None
            self.mode = "stage 0"
            self._wrapper = None
            return
        if wrapper is None or getattr(wrapper, "optimizer", None) is not optimizer:
            raise ValueError(
                "this engine was not initialised with this ChainLoRAOptimizer as its optimizer: "
                "pass deepspeed.initialize(model=model, optimizer=opt, ...) the chain itself "
                "(and no 'optimizer' section in the DeepSpeed config)"
            )
        layout = _layout(wrapper)
        self._check(layout)
        self._layout, self.mode, self._wrapper = layout, layout.kind, wrapper
        self._reads_state = optimizer.config.reset not in ("full", "none")
        if layout.gathers_weights:
            self._register_external_parameters()
        wrapper.optimizer = optimizer.optimizer  # DeepSpeed steps the wrapped optimizer directly
        self._own_step = "step" in wrapper.__dict__  # an instance attribute to put back
        self._step = wrapper.step
        wrapper.step = self._wrapper_step
        self._remove_context = _register_knot_context(optimizer, self._knot_context)

    # --- setup ---
    def _check(self, layout: _Layout) -> None:
        opt = self.optimizer
        config = opt.config
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
        if opt.chain.contexts:
            raise ValueError(
                f"optimizers that keep their own iterates (schedule-free) are not supported {where}: "
                "their eval-mode swap acts on DeepSpeed's masters, not on the model"
            )
        factors = {id(p) for p in opt.factors()}
        if any(opt.optimizer.state.get(p) for p in opt.factors()):
            raise ValueError(
                f"{type(opt.optimizer).__name__} built optimizer state for the factors at "
                f"construction; such optimizers (Adagrad) are not supported {where}"
            )
        if config.reset == "full":
            for _, params in layout.masters():
                ours = [id(p) in factors for p in params]
                if any(ours) and not all(ours):
                    raise ValueError(
                        f'reset="full" is not supported {where} when a param group holds both '
                        "factors and other trainable parameters (trainable_modules): DeepSpeed "
                        "keeps one step counter per group. Put the other parameters in a param "
                        "group of their own, e.g. AdamW([{'params': head.parameters()}, "
                        "{'params': rest}])"
                    )

    def _register_external_parameters(self) -> None:
        deepspeed = _deepspeed()
        for name, module in self.optimizer.adapted_modules():
            record = next(r for r in self.optimizer.chain.records if r.name == name)
            for p in [record.weight, *record.factors()]:
                deepspeed.zero.register_external_parameter(module, p)
            if record.delta is not None and record.bias is not None:
                deepspeed.zero.register_external_parameter(module, record.bias)

    def remove(self) -> None:
        """Undo :func:`deepspeed_knots`: DeepSpeed steps the chain again (knots then wrong)."""
        _ATTACHED.pop(self.optimizer, None)
        if self._wrapper is None:
            return
        self._remove_context()
        if self._own_step:
            self._wrapper.step = self._step
        else:
            del self._wrapper.step
        self._wrapper.optimizer = self.optimizer

    # --- each step ---
    def _wrapper_step(self, *args: Any, **kwargs: Any) -> Any:
        out = self._step(*args, **kwargs)
        if not bool(getattr(self._wrapper, "overflow", False)):
            self._count_step()
        return out

    def _count_step(self) -> None:
        """The chain's ``step()`` without stepping the wrapped optimizer (DeepSpeed did)."""
        base: Any = self.optimizer.optimizer
        previous = base.__dict__.get("step")
        base.step = _stepped
        try:
            self.optimizer.step()
        finally:
            if previous is None:
                del base.step
            else:
                base.step = previous

    # --- around each knot ---
    @contextmanager
    def _knot_context(self, chain: Any) -> Iterator[None]:
        layout = self._layout
        assert layout is not None
        factors = list(chain.factors())
        with ExitStack() as stack:
            if layout.gathers_weights:
                stack.enter_context(self._gathered(chain))
            entries = self._expose_state(layout, factors)
            try:
                yield
            finally:
                fresh = self._absorb_state(layout, entries)
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
        """Put a per-factor entry into the wrapped optimizer's ``state`` for the reset policy.

        With ``reset="full"`` or ``"none"`` the entry is empty (the policy only drops or keeps
        it); otherwise it holds each state tensor of the factor, gathered whole from the ranks.
        """
        state = self.optimizer.optimizer.state
        stated = {id(m) for m, _ in layout.masters() if state.get(m)}
        entries: dict[Tensor, dict[str, Any]] = {}
        if not stated:
            return entries
        for p in factors:
            entries[p] = {}
        if self._reads_state:
            self._gather_state(layout, factors, entries)
        for p, entry in entries.items():
            state[p] = entry
        return entries

    def _gather_state(
        self, layout: _Layout, factors: Sequence[Tensor], entries: dict[Tensor, dict[str, Any]]
    ) -> None:
        state = self.optimizer.optimizer.state
        master = next(m for m, _ in layout.masters() if state.get(m))
        keys = [k for k, v in state[master].items() if _shaped_like(v, master)]
        scalars = {k: v.clone() if isinstance(v, Tensor) else v for k, v in state[master].items()}
        for key in keys:
            scalars.pop(key)
            buffers = [torch.zeros(p.numel(), dtype=master.dtype, device=master.device) for p in factors]
            for p, buffer in zip(factors, buffers, strict=True):
                for f in layout.fragments(p):
                    buffer.narrow(0, f.lp, f.numel).copy_(f.view(state[f.master][key]))
            if layout.partitioned and dist.is_initialized() and dist.get_world_size() > 1:
                flat = torch.cat(buffers)
                dist.all_reduce(flat, group=layout.group(factors[0]))  # disjoint parts: exact
                buffers = list(flat.split([p.numel() for p in factors]))
            for p, buffer in zip(factors, buffers, strict=True):
                entries[p][key] = buffer.view(p.shape)
        for p in factors:
            entries[p].update({k: v.clone() if isinstance(v, Tensor) else v for k, v in scalars.items()})

    def _absorb_state(
        self, layout: _Layout, entries: dict[Tensor, dict[str, Any]]
    ) -> set[int]:
        """Take the per-factor entries out again; write back what the policy changed.

        Returns:
            The ids of the factors whose state the policy dropped (or replaced).
        """
        state = self.optimizer.optimizer.state
        fresh: set[int] = set()
        for p, entry in entries.items():
            now = state.pop(p, None)
            if now is not entry:
                fresh.add(id(p))
                continue
            if not self._reads_state:
                continue
            for key, value in entry.items():
                if not (isinstance(value, Tensor) and value.shape == p.shape and value.dim() > 0):
                    continue
                for f in layout.fragments(p):
                    f.view(state[f.master][key]).copy_(value.reshape(-1).narrow(0, f.lp, f.numel))
        return fresh

    def _write_masters(self, layout: _Layout, factors: Sequence[Tensor]) -> None:
        """The restarted factors (and what a knot changed) into DeepSpeed's fp32 masters."""
        with torch.no_grad():
            for p in factors:
                assert isinstance(p, nn.Parameter)
                local = layout.local(p)
                for f in layout.fragments(p):
                    f.view(f.master).copy_(local.narrow(0, f.lp, f.numel))

    def _drop_states(self, layout: _Layout, fresh: set[int]) -> None:
        if not fresh:
            return
        state = self.optimizer.optimizer.state
        for master, params in layout.masters():
            dropped = [id(p) in fresh for p in params]
            if all(dropped):
                state.pop(master, None)  # the next step starts this master's state afresh
            elif any(dropped):  # refused at setup; keep the masters consistent anyway
                for p in params:
                    if id(p) in fresh:
                        for f in layout.fragments(p):
                            for value in state.get(master, {}).values():
                                if _shaped_like(value, master):
                                    f.view(value).zero_()
        if hasattr(self._wrapper, "_hp_optimizer_states_linked"):
            self._wrapper._hp_optimizer_states_linked = False  # relink after the next step

    # --- checkpoints ---
    def client_state(self) -> dict[str, Any]:
        """The chain's entry of a DeepSpeed checkpoint's ``client_state``."""
        return {_CLIENT_KEY: self.optimizer.state_dict()["chainopt"]}

    def load_client_state(self, client_state: Mapping[str, Any]) -> None:
        """Restore the chain's counters, generator and history from ``client_state``.

        Raises:
            ValueError: ``client_state`` holds no chain entry, or one that does not fit.
        """
        entry = client_state.get(_CLIENT_KEY)
        if not isinstance(entry, dict):
            raise ValueError(
                "the DeepSpeed checkpoint's client_state holds no chain: save it with "
                "chainopt.integrations.deepspeed.save_checkpoint"
            )
        self.optimizer.load_state_dict({**self.optimizer.optimizer.state_dict(), "chainopt": entry})


def _register_knot_context(optimizer: ChainLoRAOptimizer, context: Any) -> Any:
    """``optimizer.register_knot_context(context)``; returns the function that removes it."""
    try:
        return optimizer.register_knot_context(context).remove
    except TypeError:
        # chainopt 0.1.0's register_knot_context builds a RemovableHandle over Chain.contexts, a
        # plain dict, which cannot be weakly referenced: enter the context the same way by hand.
        contexts = optimizer.chain.contexts
        key = id(context)
        contexts[key] = context
        return lambda: contexts.pop(key, None)


def _stepped(closure: Any = None) -> None:
    """Stands in for the wrapped optimizer's ``step`` while the chain counts DeepSpeed's."""
    return None


def _shaped_like(value: object, master: Tensor) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape == master.shape


def deepspeed_knots(optimizer: ChainLoRAOptimizer, engine: Any) -> DeepSpeedChain:
    """Make the knots of ``optimizer`` exact under the DeepSpeed ``engine`` built with it.

    Call it once, right after ``deepspeed.initialize(model=model, optimizer=optimizer, ...)``
    or Accelerate's ``accelerator.prepare(model, optimizer)`` (pass the prepared model: it is the
    engine), before the first step. See the module docstring for what it changes.

    Args:
        optimizer: the chain, built on the bare model before DeepSpeed saw it.
        engine: the ``DeepSpeedEngine``.

    Returns:
        The :class:`DeepSpeedChain` (``.remove()`` undoes it).

    Raises:
        ImportError: DeepSpeed is not installed.
        TypeError: ``optimizer`` is not a ChainLoRAOptimizer.
        ValueError: the engine was built with another optimizer, or the chain's options cannot
            be made exact under this mode (the message says which and why).
        NotImplementedError: the DeepSpeed mode is not supported (offload, an unknown wrapper).
        RuntimeError: knots are already set up for this chain.
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
        raise RuntimeError("call deepspeed_knots(optimizer, engine) (or initialize) first")
    return handle


def initialize(
    *, model: nn.Module, optimizer: ChainLoRAOptimizer, config: Any = None, **kwargs: Any
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` for a chain, then :func:`deepspeed_knots`.

    The DeepSpeed config (a dict, or the path of a JSON file) gets
    ``"zero_allow_untested_optimizer": true``: DeepSpeed steps the optimizer the chain wraps,
    and only checks the type of the one it is given (Accelerate sets the same flag).

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
    out = deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
    deepspeed_knots(optimizer, out[0])
    return tuple(out)  # type: ignore[return-value]


def save_checkpoint(
    engine: Any,
    optimizer: ChainLoRAOptimizer,
    save_dir: str | os.PathLike[str],
    tag: str | None = None,
    client_state: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """``engine.save_checkpoint`` with the chain's counters, generator and history.

    Call it on every rank. ``client_state`` (yours) is saved too, under its own keys.

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

    Call it on every rank, with the engine and chain built as for the saved run.

    Returns:
        ``(path, client_state)`` as ``engine.load_checkpoint`` returns them, without the chain's
        entry; ``(None, {})`` if there was nothing to load.

    Raises:
        ValueError: the checkpoint holds no chain, or one of another config.
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
    """ZeRO-3's module load: only the buffers (merge residuals, …); DeepSpeed restores the
    partitioned parameters from its own shards and frozen fragments."""
    buffers = dict(dst.named_buffers())
    with torch.no_grad():
        for name, value in src.items():
            if name in buffers and isinstance(value, Tensor):
                buffers[name].copy_(value)

