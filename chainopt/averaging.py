"""Weight averaging (EMA, SWA) across a chain's knots: the averaged copy ties the same knot.

``torch.optim.swa_utils.AveragedModel`` keeps a deep copy of the model and averages each of its
Parameters separately: on a chained model the frozen weight ``W`` and the factors ``A`` and
``B``. Within one link that is the product-of-averages approximation plain LoRA has
(``avg(B·A) ≈ avg(B)·avg(A)``). At a knot the live model sets ``W += s·B·A``, ``B = 0`` and draws
a new ``A``; averaged factor by factor, the copy's ``avg(B)·avg(A)`` then mixes the old ``B``
with the new ``A``: for ``k`` updates after the knot (EMA of decay ``d``) the last link's
contribution is off by ``dᵏ(1 − dᵏ)·s·B̄·(A_new − Ā)``, a quarter of ``s·B̄·(A_new − Ā)`` at
``dᵏ = ½``: more than a quarter of the link's update, as the new ``A`` is drawn independently of
the old (``A_new − Ā`` is larger than ``Ā``). ``experiments/ema_knots.py`` measures it; see
``docs/integrations.md``.

:func:`track_average` makes the copy tie the same knot, so its function is unchanged by it:
in the copy, each link's averaged ``s·B̄·Ā`` is merged into its averaged ``W̄`` (exactly as the
live knot merges: :func:`chainopt.merge.merge_`), ``B̄`` becomes zero and ``Ā`` the live
link's new ``A`` (resized with a rank step-down). The averaging then goes on linearly: ``W̄``
follows the live ``W`` (which holds the earlier links), ``B̄`` grows from zero with the new
link. For any averaging that is an affine combination of the updates (torch's EMA and SWA
functions) the copy's merged weight stays the average of the live merged weights up to the
same product-of-averages error as within a link.

Checks run before the live knot changes anything (the tracking is a knot context,
:meth:`~chainopt.ChainLoRAOptimizer.register_knot_context`): the copy must still hold the
chain's links, in the same shapes (else ``RuntimeError``: a copy unloaded for export, or loaded
from another link's state); a copy link whose merge would not be finite (the average took a NaN
in) raises :class:`~chainopt.NonFiniteUpdateError` under ``non_finite="raise"`` or is dropped
unmerged with a warning under ``"skip"``. A refused knot is tied by neither model, and the
step that was due to tie it has been counted: ``opt.tie_knot()`` ties it once the copy is
fixed or the tracking removed. A link the live knot drops (``"skip"``) is merged in the copy
all the same: the average holds its past updates. The checks read the copy alone (no
collective), so an average kept on one rank of a distributed run is tracked there only.

Refused when tracking starts (nothing is changed then): 4-bit layers (the copy would average the
packed 4-bit weight) and half-precision weights or factors (``AveragedModel`` averages in the
weights' own dtype: a bfloat16 ``W̄`` stalls wherever ``(1 − decay)·(W − W̄)`` is under half an
ulp, which no knot can repair; ``experiments/ema_knots.py --dtype bfloat16``). Chains of PEFT's own
LoRA layers (a ``PeftModel``, DoRA included: merging keeps ``V`` and the magnitude) and fused
experts are handled like any other link; a ``PeftModel`` copy's own adapter save
(``save_pretrained``, deep-copied with the whole-chain save) refuses from then on, since its
weights hold averaged links no adapter holds (a mark on the copy, listed in
:mod:`chainopt._marks`).

The tracking has no state of its own: it is not in any state dict, stays registered through
``opt.load_state_dict`` and :func:`~chainopt.load_checkpoint`, and goes with ``handle.remove()``.
Save ``averaged.state_dict()`` with the chain's checkpoint and load it into the rebuilt
``AveragedModel`` (a link of another rank is resized on load), then track again.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    >>> from chainopt import ChainLoRAOptimizer, merged_state_dict, track_average
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-2),
    ...                          target_modules=["0", "2"], rank=2, knot_every=5)
    >>> ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    >>> handle = track_average(opt, ema)
    >>> x, y = torch.randn(16, 8), torch.randn(16, 2)
    >>> for _ in range(12):
    ...     nn.functional.mse_loss(model(x), y).backward()
    ...     opt.step()
    ...     opt.zero_grad()
    ...     ema.update_parameters(model)
    >>> opt.knots_tied
    2
    >>> plain = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> _ = plain.load_state_dict(merged_state_dict(ema.module))  # the averaged model, plain
    >>> with torch.no_grad():
    ...     torch.allclose(plain(x), ema(x), atol=1e-6)
    True
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.hooks import RemovableHandle

from ._layers import find_adapted
from ._marks import PEFT_SAVE
from ._peft_save import adapter_save_method
from ._record import ModuleRecord
from ._validate import type_name
from .guard import NonFiniteUpdateError
from .merge import exact_sum, merge_
from .optimizer import ChainLoRAOptimizer

__all__ = ["track_average"]


def track_average(optimizer: ChainLoRAOptimizer, averaged: nn.Module) -> RemovableHandle:
    """Make ``averaged`` (an EMA or SWA copy of the chained model) tie every knot the chain ties.

    At each knot of ``optimizer``, in the copy: ``W̄ += s·B̄·Ā`` (exactly as the live merge),
    ``B̄ = 0``, ``Ā = A`` (the live link's new factor, in its new shape), so the averaged
    function is unchanged by the knot and ``update_parameters`` goes on averaging the merged
    weights. See :mod:`chainopt.averaging`.

    Args:
        optimizer: the chain.
        averaged: a ``torch.optim.swa_utils.AveragedModel`` of the chained model (its
            ``module`` is the copy), or a copy of the chained model itself (``copy.deepcopy``,
            a hand-written EMA): it must hold the chain's links under the same names and shapes
            and the same parameters in the same order (what ``AveragedModel`` pairs).

    Returns:
        A handle; ``handle.remove()`` stops the tracking.

    Raises:
        TypeError: ``optimizer`` is not a :class:`~chainopt.ChainLoRAOptimizer`, or
            ``averaged`` not an ``nn.Module``.
        ValueError: ``averaged`` is the live model or shares its links, does not hold the
            chain's links (names, shapes, parameters), is tracked already, or the chain has a
            4-bit layer or a half-precision weight or factor; or the chain was unloaded. Nothing is
            changed.

    At each knot, before it changes anything, the tied knot's own call (``opt.step()``,
    ``opt.tie_knot()``) raises ``RuntimeError`` if the copy no longer holds the chain's links
    as above, or :class:`~chainopt.NonFiniteUpdateError` if a copy link would merge NaN/Inf and
    the chain has ``non_finite="raise"`` (see :mod:`chainopt.averaging`).

    Example:
        >>> import copy
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer, track_average
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, knot_every=1)
        >>> ema = copy.deepcopy(model)
        >>> with torch.no_grad():
        ...     _ = ema[0].parametrizations.weight[0].lora_B.fill_(0.1)  # an averaged B
        ...     before = ema(torch.ones(1, 4))
        >>> handle = track_average(opt, ema)
        >>> _ = opt.tie_knot()
        >>> with torch.no_grad():
        ...     torch.allclose(ema(torch.ones(1, 4)), before, atol=1e-6)
        True
        >>> track_average(opt, model)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: averaged must be a copy of the chained model ...
    """
    if not isinstance(optimizer, ChainLoRAOptimizer):
        raise TypeError(f"optimizer must be a ChainLoRAOptimizer, got {type_name(optimizer)}")
    if not isinstance(averaged, nn.Module):
        flat = (
            " (an EMA over a flat list of parameters, such as diffusers' EMAModel, copies the "
            "frozen weights instead of averaging them and cannot follow a knot)"
            if hasattr(averaged, "shadow_params")
            else ""
        )
        raise TypeError(
            "averaged must be a torch.optim.swa_utils.AveragedModel or a copy of the chained "
            f"model (an nn.Module), got {type_name(averaged)}{flat}"
        )
    copy = averaged.module if isinstance(averaged, AveragedModel) else averaged
    if not isinstance(copy, nn.Module):  # pragma: no cover - AveragedModel holds a module
        raise TypeError(f"averaged.module must be an nn.Module, got {type_name(copy)}")
    knot = _AveragedKnot(optimizer, copy)
    tracked = [c for c in optimizer.chain.contexts.values() if isinstance(c, _AveragedKnot)]
    if any(c.copy is copy for c in tracked):
        raise ValueError(
            f"averaged ({type_name(averaged)}) is tracked by this optimizer already: its knots "
            "are tied once; remove the first handle to track it anew"
        )
    method = adapter_save_method(copy)
    if method is not None and PEFT_SAVE in copy.__dict__:  # the copied whole-chain save
        copy.__dict__[method] = _AveragedAdapterSave(type(copy).__name__)
    return optimizer.register_knot_context(knot)


@dataclass(frozen=True)
class _AveragedAdapterSave:
    """The adapter save of an averaged copy of a chained ``PeftModel``: it refuses.

    The copy's own whole-chain save (deep-copied with the model) would write the history as it
    was when the copy was made plus the copy's averaged factors, over base weights that now hold
    averaged links no adapter holds: another model. A plain object, so the copy still pickles and
    deep-copies; :func:`chainopt.merge_and_unload` of the copy replaces it by its own refusal.

    Attributes:
        owner: the model's class name, for the message.
    """

    owner: str

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """Refuse; nothing is written."""
        raise ValueError(
            f"refusing to save an adapter of this averaged {self.owner}: its base weights hold "
            "averaged links that no adapter holds, so an adapter saved from it would compute "
            "another model; nothing was written. Save the averaged model itself: "
            "chainopt.merge_and_unload(ema.module), then PEFT's merge_and_unload() and "
            "save_pretrained, or chainopt.merged_state_dict(ema.module)"
        )


def _bad_links(records: list[ModuleRecord]) -> list[str]:
    """The copy's links whose merge would not be finite in the weight's dtype (NaN/Inf factors,
    bias delta or weight, or an overflow). Checked on this process alone: an average kept on
    one rank only must not wait for a collective the others never join."""
    return [
        r.name
        for r in records
        if not all(
            bool(torch.isfinite(exact_sum(target, part).to(target.dtype)).all())
            for part, target in r.parts()
        )
    ]


class _AveragedKnot:
    """The knot context that ties the live knot in an averaged copy (see the module docstring).

    Args:
        optimizer: the chain.
        copy: the averaged copy of the chained model.

    Raises:
        ValueError: as :func:`track_average`.
    """

    def __init__(self, optimizer: ChainLoRAOptimizer, copy: nn.Module) -> None:
        self.optimizer = optimizer
        self.copy = copy
        self.raise_on_bad = optimizer.config.non_finite == "raise"  # resolved once
        live = optimizer.chain.records
        if not live:
            raise ValueError(
                "optimizer has no chain left (merge_and_unload() was called): there are no knots "
                "to track"
            )
        if copy is optimizer.model:
            raise ValueError(
                "averaged must be a copy of the chained model (AveragedModel(model) deep-copies "
                "it), not the live model itself"
            )
        quantized = [r.name for r in live if r.quant is not None]
        if quantized:
            raise ValueError(
                f"cannot track an average of a chain over 4-bit layers ({quantized[:3]}): "
                "AveragedModel would average the packed 4-bit weights, and no knot in the copy "
                "can make that the average of the fine-tuned weights. Average a float copy "
                "instead (chainopt.merged_state_dict(model) at the points you average)"
            )
        low = (torch.bfloat16, torch.float16)
        half = [r.name for r in live if any(t.dtype in low for t in (r.weight, *r.factors()))]
        if half:
            raise ValueError(
                f"cannot track an average of a chain over half-precision weights or factors "
                f"({half[:3]}): "
                "AveragedModel averages in the weights' own dtype, where a step of "
                "(1 - decay)·(W - W̄) under half an ulp rounds away, so the averaged weights "
                "stall (a bfloat16 EMA of decay 0.999 of a weight moved by 1% does not move in "
                "1,000 steps; untracked, a bfloat16 chain's EMA 0.99 was up to 78% of its update "
                "away from the average of the merged weights: experiments/ema_knots.py). Keep the "
                "weights in float32 to average them, or average float32 copies of "
                "chainopt.merged_state_dict(model) yourself"
            )
        self._check(self._records(), live)

    def _records(self) -> list[ModuleRecord]:
        return find_adapted(self.copy)

    def _check(self, mine: list[ModuleRecord], live: list[ModuleRecord]) -> None:
        """Raise unless the copy holds the live chain's links: same names, factor shapes, and
        parameters (names, shapes, order), none of them shared."""
        names = [r.name for r in live]
        have = {r.name: r for r in mine}
        missing = [n for n in names if n not in have]
        if not mine:
            raise ValueError(
                "averaged holds none of the chain's links (an AveragedModel built before the "
                "ChainLoRAOptimizer, a copy of another model, or one unloaded by "
                "chainopt.merge_and_unload): it cannot tie the chain's knots. Build the "
                "AveragedModel after the optimizer; to export a tracked copy while training, use "
                "chainopt.merged_state_dict(ema.module), which leaves the copy as it is"
            )
        if missing or len(mine) != len(live):
            raise ValueError(
                f"averaged must be a copy of the chained model holding its {len(live)} links "
                f"under the same names; it holds {len(mine)} ({[r.name for r in mine][:3]}), "
                f"missing {missing[:3]}. Pass AveragedModel(model) of the model the optimizer "
                "chains (or its .module), built after the optimizer"
            )
        ids = {id(p) for r in live for p in r.factors()} | {id(r.weight) for r in live}
        for r in live:
            m = have[r.name]
            if any(id(p) in ids for p in (*m.factors(), m.weight)):
                raise ValueError(
                    f"averaged must be a copy of the chained model (AveragedModel(model) "
                    f"deep-copies it), but its {r.name!r} holds the live model's tensors"
                )
            shapes = [tuple(p.shape) for p in r.factors()]
            theirs = [tuple(p.shape) for p in m.factors()]
            if shapes != theirs:
                raise ValueError(
                    f"averaged's link {r.name!r} has factors of shapes {theirs}, the chain's "
                    f"{shapes}: the copy is of another link (load its state saved at the same "
                    "step as the chain's, or build it anew from the model)"
                )
        own = [(n, tuple(p.shape)) for n, p in self.optimizer.model.named_parameters()]
        copied = [(n, tuple(p.shape)) for n, p in self.copy.named_parameters()]
        if own != copied:
            first = next((a, b) for a, b in zip_longest(own, copied) if a != b)
            raise ValueError(
                "averaged must hold the chained model's parameters in the same order and shapes "
                f"(AveragedModel pairs them by position); first difference: the model's "
                f"{first[0]} and the copy's {first[1]}"
            )

    @contextmanager
    def __call__(self, chain: Any) -> Iterator[None]:
        """Checked before the live knot, tied in the copy after it (not if the knot raised)."""
        mine = self._records()
        try:
            self._check(mine, chain.records)
        except ValueError as err:
            raise RuntimeError(
                f"{err}. The knot was refused before anything changed, live or averaged: "
                "stop tracking (handle.remove()) or give the copy back its links, then "
                "opt.tie_knot() ties the knot that was due"
            ) from None
        bad = _bad_links(mine)
        if bad and self.raise_on_bad:
            raise NonFiniteUpdateError(
                f"the averaged copy's links {bad} would merge non-finite values (the average "
                "took a NaN/Inf in, or the merge overflows the weight's dtype); refusing to tie "
                "the knot: no weight was changed, live or averaged. Build the average anew from "
                "the model (then opt.tie_knot() ties the knot that was due), or use "
                "non_finite='skip'"
            )
        yield
        self._tie(mine, chain.records, set(bad))

    @torch.no_grad()
    def _tie(self, mine: list[ModuleRecord], live: list[ModuleRecord], bad: set[str]) -> None:
        if bad:
            warnings.warn(
                f"the averaged copy's links {sorted(bad)} would merge non-finite values: "
                "dropped them unmerged at this knot",
                RuntimeWarning,
                stacklevel=5,
            )
        have = {r.name: r for r in mine}
        for r in live:
            m = have[r.name]
            if r.name not in bad:
                merge_(m)  # W̄ += s·B̄·Ā, exactly as the live knot merges
            m.link.lora_B.zero_()
            if m.delta is not None:
                m.delta.reset_parameters()
            if m.link.lora_A.shape != r.link.lora_A.shape:  # a rank step-down
                m.link.resize_(r.link.lora_A.shape[0] // r.link.experts)
                m.link.lora_B.zero_()
            m.link.lora_A.copy_(r.link.lora_A.detach().to(m.link.lora_A.device))
