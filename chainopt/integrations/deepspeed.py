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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..optimizer import ChainLoRAOptimizer
from ._deepspeed_chain import _ATTACHED, _CLIENT_KEY, DeepSpeedChain
from ._deepspeed_layouts import _deepspeed

__all__ = [
    "DeepSpeedChain",
    "deepspeed_knots",
    "initialize",
    "load_checkpoint",
    "save_checkpoint",
]


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
