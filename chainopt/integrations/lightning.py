"""Lightning with a chain built in ``configure_optimizers()``.

``configure_optimizers()`` is where a Lightning module builds its optimizer, so it is where a
:class:`~chainopt.ChainLoRAOptimizer` is built too. Lightning loads a checkpoint's weights into
the module, strictly, *before* it calls ``configure_optimizers()``, when the module has no links
yet, so a checkpoint holding the chain's keys (``….parametrizations.weight.original``, the
factors) does not fit it. So Lightning's own checkpoints of a chained module (``ModelCheckpoint``,
``trainer.save_checkpoint``) hold the merged model, plain keys, and the chain's own tensors
travel in its optimizer state, with or without a callback: chainopt's state-dict hook
(``chainopt._hf_save.guard_state_dict_saves``) recognises Lightning's checkpoint
dump, unless the trainer has a :class:`ChainLoRACheckpoint` (which then decides) or a strategy
whose state dict is not the module's own (FSDP, DeepSpeed). Resuming such a checkpoint needs no
callback either, and ``load_from_checkpoint`` gives the fine-tuned model.

With :class:`ChainLoRACheckpoint` among the trainer's callbacks, it decides what is saved (and
can keep the parametrized keys) and resumes any checkpoint bitwise:

- **Saving** (``merged=True``, the default): the checkpoint's ``"state_dict"`` holds the merged
  model, plain keys with every link merged (:func:`chainopt.merged_state_dict`), so
  ``LightningModule.load_from_checkpoint`` and ``validate``/``test``/``predict`` with
  ``ckpt_path`` give the fine-tuned model with no chain in the module; the chain's own tensors
  (frozen originals, factors, merge residuals) travel in the chain's optimizer state (see
  :func:`chainopt._marks.mark_merged_save`). Resuming such a checkpoint needs no callback: the
  plain keys load into the unchained module, ``configure_optimizers()`` builds the chain on top,
  and Lightning's load of the optimizer state puts the originals and factors back.
- **Resuming** a checkpoint that holds the chain's parametrized keys (``merged=False``, a
  sharded strategy's, or an older chainopt's): a ``load_state_dict`` pre-hook on the module sets the
  chain's tensors aside and loads each frozen original under its plain key; ``on_fit_start``
  (after ``configure_optimizers()``, before Lightning restores the optimizer state) loads them
  into the now chained module.

A module that builds its chain in ``__init__`` resumes bitwise with or without the callback.
Lightning calls ``configure_optimizers()`` at every ``fit`` (``Tuner.lr_find`` and
``scale_batch_size`` run one first): build the chain there once and return it again, as a
second chain on the chained module is refused.
A ``save_weights_only`` checkpoint holds the merged model too, the callback's ``merged=False``
the parametrized keys (and it cannot resume training: it holds no optimizer state). Outside
``fit``, nothing builds the chain, so with the callback ``validate``/``test``/``predict`` refuse
a parametrized checkpoint for an unchained module with a ``ValueError`` that says so.

Tested on one device; under DDP every rank runs the same hooks on the same state. Strategies
that restore the checkpoint after ``configure_optimizers()`` (FSDP, DeepSpeed, model parallel)
load into the chained module themselves; for them the callback changes nothing, saves included.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning.pytorch import LightningModule, Trainer
    >>> from chainopt import ChainLoRAOptimizer
    >>> from chainopt.integrations.lightning import ChainLoRACheckpoint
    >>> class Regressor(LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return nn.functional.mse_loss(self.net(x), y)
    ...     def configure_optimizers(self):
    ...         base = torch.optim.AdamW(self.parameters(), lr=1e-2)
    ...         return ChainLoRAOptimizer(self, base, target_modules=["net.0"], rank=2,
    ...                                   knot_every=2)
    >>> data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    >>> trainer = Trainer(accelerator="cpu", max_steps=4, logger=False,
    ...                   enable_checkpointing=False, enable_progress_bar=False,
    ...                   enable_model_summary=False, callbacks=[ChainLoRACheckpoint()])
    >>> module = Regressor()
    >>> trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    >>> trainer.optimizers[0].knots_tied
    2
    >>> # later: trainer.fit(Regressor(), loader, ckpt_path="last.ckpt") resumes bitwise
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as err:
    raise ImportError(
        "chainopt.integrations.lightning needs Lightning: pip install lightning"
    ) from err

from .._layers import find_adapted
from .._marks import LINK_NAME, mark_merged_save
from .._quant_backends import backend_for
from ..export import merged_state_dict
from ..guard import NonFiniteUpdateError
from ..optimizer import ChainLoRAOptimizer

__all__ = ["ChainLoRACheckpoint"]

_PARAMETRIZED = "parametrizations."  # torch.nn.utils.parametrize's key: <tensor>.original, …


class ChainLoRACheckpoint(Callback):
    """Resume a chain built in ``configure_optimizers()`` bitwise; save loadable checkpoints.

    Add it to the ``Trainer``'s callbacks (or return it from the module's
    ``configure_callbacks()``), in the run that saves and in the run that resumes. See
    :mod:`chainopt.integrations.lightning` for what it does when.

    Args:
        merged: write each checkpoint's ``"state_dict"`` as the merged model (plain keys, every
            link merged), with the chain's own tensors in its optimizer state, so that
            ``load_from_checkpoint`` gives the fine-tuned model; ``False`` keeps the module's own
            (parametrized) state dict. Either resumes bitwise. A merged checkpoint holds each
            adapted weight twice (merged, and the frozen original in the optimizer state).

    Raises:
        RuntimeError: from ``on_fit_start``: the checkpoint held a chain and
            ``configure_optimizers()`` built none over those modules.
        ValueError: from the module's ``load_state_dict`` outside ``fit``: the checkpoint holds
            an unmerged chain and nothing will build it.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning.pytorch.callbacks import ModelCheckpoint
        >>> from chainopt.integrations.lightning import ChainLoRACheckpoint
        >>> callbacks = [ModelCheckpoint(dirpath="ckpts", every_n_train_steps=10,
        ...                              save_last=True), ChainLoRACheckpoint()]
        >>> trainer = Trainer(accelerator="cpu", max_steps=40, callbacks=callbacks,
        ...                   logger=False, enable_progress_bar=False)
        >>> # trainer.fit(module, loader, ckpt_path="last") resumes from ckpts/last.ckpt
    """

    def __init__(self, merged: bool = True) -> None:
        if not isinstance(merged, bool):
            raise TypeError(f"merged must be a bool, got {merged!r}")
        self.merged = merged
        self._stage = "fit"
        self._handle: RemovableHandle | None = None
        self._stash: dict[str, Tensor] = {}

    # --- loading: set the chain's tensors aside until configure_optimizers() built the chain ---
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Install the module's ``load_state_dict`` pre-hook (before Lightning restores it)."""
        self._stage = stage
        self._stash = {}
        self._remove_hook()  # left by a run that ended in an exception
        self._handle = pl_module.register_load_state_dict_pre_hook(  # type: ignore[no-untyped-call]
            self._defer_chain_keys
        )

    def _defer_chain_keys(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        if self._stage == "fit":  # 4-bit layers: the chained module loads them (on_fit_start)
            for key, tensor in _deferred_quantized(module, state_dict, prefix).items():
                self._stash[key[len(prefix) :]] = tensor
        deferred = _deferred(module, state_dict, prefix)
        if not deferred:
            return
        if self._stage != "fit":
            names = sorted({k.partition(_PARAMETRIZED)[0].rstrip(".") for k in deferred})
            raise ValueError(
                f"the checkpoint holds an unmerged chain on {names[:3]} and the module has no "
                f"links; {self._stage}() does not call configure_optimizers(), so nothing would "
                "build them. Load a checkpoint saved with ChainLoRACheckpoint() (merged weights), "
                "or build the chain in the module's __init__"
            )
        for key, plain in deferred.items():
            self._stash[key[len(prefix) :]] = state_dict.pop(key)
            if plain is not None:  # the frozen original loads as the plain tensor for now
                state_dict[plain] = self._stash[key[len(prefix) :]]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Load the chain's tensors set aside at restore into the module, now chained.

        The pre-hook is removed: later loads (a strategy that restores after setup, the user's
        own) find the module chained and go through chainopt's own load checks.
        """
        self._remove_hook()
        stash, self._stash = self._stash, {}
        if not stash:
            return
        missing = sorted(set(stash) - set(pl_module.state_dict()))
        if missing:
            raise RuntimeError(
                "the checkpoint holds a chain that configure_optimizers() did not build: the "
                f"module has no {missing[:3]}; build the ChainLoRAOptimizer there with the same "
                "target_modules (or in __init__)"
            )
        pl_module.load_state_dict(stash, strict=False)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the pre-hook (still there after ``validate``, ``test``, ``predict``)."""
        self._remove_hook()
        self._stash = {}

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # --- saving: the merged model under "state_dict", the chain's tensors with the optimizer ---
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Write the merged model as the checkpoint's ``"state_dict"`` (with ``merged=True``).

        Left as it is when the module has no links, when a link is not covered by a chain among
        ``trainer.optimizers``, or under a sharded strategy (FSDP, DeepSpeed), whose state dict
        is not the module's own. A link holding NaN/Inf keeps the parametrized keys, with a
        warning.
        """
        adapted = {id(r.module) for r in find_adapted(pl_module)}
        states = checkpoint.get("optimizer_states")
        chains = [
            (i, o) for i, o in enumerate(trainer.optimizers) if isinstance(o, ChainLoRAOptimizer)
        ]
        covered = {id(m) for _, o in chains for _, m in o.adapted_modules()}
        if not (self.merged and adapted and adapted <= covered and isinstance(states, list)):
            return
        if trainer.strategy.restore_checkpoint_after_setup:  # sharded: not the module's own
            return
        if checkpoint.get("state_dict", {}).keys() != pl_module.state_dict().keys():
            return
        try:
            merged = merged_state_dict(pl_module)
        except NonFiniteUpdateError as err:
            warnings.warn(
                f"ChainLoRACheckpoint: the checkpoint keeps the parametrized state dict ({err})",
                stacklevel=2,
            )
            return
        for i, opt in chains:
            mark_merged_save(opt.model)  # its state_dict() now carries the chain's own tensors
            states[i] = trainer.strategy.optimizer_state(opt)
        checkpoint["state_dict"] = merged


def _deferred_quantized(
    model: nn.Module, state_dict: dict[str, Any], prefix: str
) -> dict[str, Tensor]:
    """Take out of ``state_dict`` what an unchained 4-bit layer cannot load but the chained one
    will (a merged checkpoint's dense weight, the layer's quantization state, its link), and
    return it. The layer's weight key stays, holding the layer's current weight (a no-op load);
    the chained module's own load then writes weight, state and link together."""
    out: dict[str, Tensor] = {}
    for name, module in model.named_modules():
        if backend_for(module) is None or LINK_NAME in dict(module.named_children()):
            continue
        base = f"{prefix}{name}." if name else prefix
        weight = f"{base}weight"
        if weight not in state_dict:
            continue
        for key in [
            k
            for k in state_dict
            if k == weight or k.startswith((f"{weight}.", f"{base}{LINK_NAME}."))
        ]:
            out[key] = state_dict.pop(key)
        state_dict[weight] = module.weight.detach()
    return out


def _deferred(
    model: nn.Module, state_dict: Mapping[str, Any], prefix: str
) -> dict[str, str | None]:
    """The keys of ``state_dict`` that parametrize a tensor of ``model`` that is not parametrized.

    Maps each such key (``<module>.parametrizations.<tensor>.…``) to the plain key its frozen
    original loads under for now (``<module>.<tensor>``), or to ``None`` for the other keys
    (factors, residuals). Only tensors whose plain key ``state_dict`` lacks are taken.
    """
    out: dict[str, str | None] = {}
    for name, module in model.named_modules():
        base = f"{prefix}{name}." if name else prefix
        own = [n for n, _ in module.named_parameters(recurse=False)]
        own += [n for n, _ in module.named_buffers(recurse=False)]
        for tensor in own:
            stem = f"{base}{_PARAMETRIZED}{tensor}."
            if (
                parametrize.is_parametrized(module, tensor)
                or base + tensor in state_dict
                or stem + "original" not in state_dict
            ):
                continue
            for key in state_dict:
                if key.startswith(stem):
                    out[key] = base + tensor if key == stem + "original" else None
    return out
