"""Folding a link into its frozen weight, exactly, in place.

The update ``s·B·A`` is computed in float32. A float32 weight takes it with one ``addmm_``. A
half-precision weight would lose most of a small update if rounded at every knot, so such weights
carry a *merge residual*: the part of ``W₀ + Σ sᵢ·Bᵢ·Aᵢ`` that rounding ``W`` to its dtype left out.
Each knot adds the residual back before rounding and stores what the new rounding leaves out, so
``W`` stays ``W₀ + Σ sᵢ·Bᵢ·Aᵢ`` rounded once, up to the residual's own rounding (measured in
docs/faq.md: after 1,000 knots a small fraction of elements end one ulp away).

Sharded parameters (``DTensor``, FSDP2's ``fully_shard``) are gathered, merged whole and written
back shard by shard; every rank computes the same merge. Gathering is a collective: every rank
ties the knot.

The caller checks first that the merge is finite (:func:`chainopt.guard.check_links`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt._attach import attach
    >>> from chainopt._layers import record_of
    >>> lin = nn.Linear(6, 4)
    >>> link = attach(lin, rank=2, alpha=2.0)
    >>> with torch.no_grad():
    ...     _ = link.lora_B.normal_()
    >>> record = record_of("fc", lin)
    >>> expected = merged_weight(record)
    >>> merge_(record)
    >>> torch.allclose(record.weight, expected)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._dtensor import copy_full_, full_tensor, is_sharded
from ._experts import split_experts
from ._record import Link, ModuleRecord
from .lora import BiasDelta

__all__: list[str] = []  # the public names (chainopt re-exports them); the rest is internal


def exact_sum(target: Tensor, part: Link | BiasDelta) -> Tensor:
    """``target + residual + update`` in at least float32, as a new whole tensor.

    ``update`` is ``s·B·A`` (transposed for a ``fan_in_fan_out`` link; each expert's
    ``s·Bₑ·Aₑ`` in its slice of a fused-experts ``(E, ·, ·)`` weight) or the bias delta. A
    convolution's factors ``(r, in, *k)``, ``(out, r, 1, …)`` are matrices flattened after their
    first dimension, and ``B·A`` is the kernel's update flattened the same way.
    """
    dt = torch.promote_types(target.dtype, torch.float32)
    exact = full_tensor(target.detach()).to(dt, copy=True)
    if part.merge_residual is not None:
        exact.add_(full_tensor(part.merge_residual).to(dt))
    if not isinstance(part, BiasDelta) and target.dim() == 3 and part.lora_A.dim() == 2:
        # fused experts: each expert's s·Bₑ·Aₑ accumulated into its slice of the copy
        a, b = full_tensor(part.lora_A.detach()).to(dt), full_tensor(part.lora_B.detach()).to(dt)
        b_e, a_e = split_experts(a, b, part.experts)  # (E, out, r), (E, r, in)
        if part.fan_in_fan_out:  # stored (E, in, out): (E, in, r) @ (E, r, out)
            exact.baddbmm_(a_e.mT, b_e.mT, alpha=part.scale)
        else:
            exact.baddbmm_(b_e, a_e, alpha=part.scale)
    elif not isinstance(part, BiasDelta):  # a link
        a, b = full_tensor(part.lora_A.detach()).to(dt), full_tensor(part.lora_B.detach()).to(dt)
        # accumulated into the copy: no separate (out, in) update tensor
        if part.fan_in_fan_out:
            exact.addmm_(a.T, b.T, alpha=part.scale)  # (in, r) @ (r, out)
        else:  # (out, r) @ (r, in); a kernel (out, in, *k) as (out, in·∏k)
            exact.view(exact.shape[0], -1).addmm_(b.flatten(1), a.flatten(1), alpha=part.scale)
    else:
        exact.add_(full_tensor(part.delta.detach()).to(dt))
    return exact


def _store_(target: Tensor, exact: Tensor, residual: Tensor | None) -> None:
    """Round ``exact`` into ``target`` in place; keep what rounding dropped in ``residual``."""
    if is_sharded(target):
        rounded = exact.to(target.dtype, copy=True)
        copy_full_(target, rounded)  # this rank's shard only
    else:
        target.copy_(exact)
        rounded = target
    if residual is not None:
        copy_full_(residual, _residual(exact, rounded, residual.dtype))


_BITS = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def _residual(exact: Tensor, rounded: Tensor, dtype: torch.dtype) -> Tensor:
    """What rounding ``exact`` to ``rounded`` dropped, in ``dtype``, such that ``rounded +
    residual`` rounds back to ``rounded``.

    The residual's own rounding can land on exactly half a spacing of the weight (a tie, or past
    it at a binade edge); the next knot, even of a zero link, would then round ``W + residual``
    to a neighbour of ``W`` and move the function. Such entries are nudged one step of their own
    dtype toward zero (the integer view of a float minus one is the next value toward zero, for
    either sign): a change far below the residual's own rounding, and no host sync.
    """
    work = exact.dtype
    dropped = exact.sub_(rounded.to(work)).to(dtype)
    back = (rounded.to(work) + dropped.to(work)).to(rounded.dtype)
    nudged = (dropped.view(_BITS[dtype]) - 1).view(dtype)  # never chosen where dropped == 0
    return torch.where(back == rounded, dropped, nudged)


def require_mergeable(
    records: Sequence[ModuleRecord], what: str, model: nn.Module | None = None
) -> None:
    """Raise unless merging every record's link now keeps the model's function.

    A link whose module's forward does not add ``s·B·A`` at the moment (PEFT merged, disabled,
    deleted or switched away from its adapter: :meth:`~chainopt._record.Link.merge_problem`), or
    whose module is no longer part of ``model`` (replaced, or unloaded by PEFT's ``unload()``),
    must not be merged: the merge would add an update the model does not compute.

    Args:
        records: the records about to be merged (or read as merged).
        what: what was about to happen, for the message ("tie a knot", ...).
        model: the model the records must still be part of (``None``: not checked).

    Raises:
        RuntimeError: naming each such module and why; nothing was changed.
    """
    problems = [(r.name, why) for r in records if (why := r.link.merge_problem()) is not None]
    if model is not None:
        live = {id(m) for m in model.modules()}
        problems += [
            (r.name, "it is no longer part of the model (replaced, or unloaded by PEFT's unload())")
            for r in records
            if id(r.module) not in live
        ]
    if problems:
        by_why: dict[str, list[str]] = {}
        for name, why in problems:
            by_why.setdefault(why, []).append(name)
        listed = "; ".join(
            f"{names[:3]}{f' and {len(names) - 3} more' if len(names) > 3 else ''}: {why}"
            for why, names in by_why.items()
        )
        raise RuntimeError(
            f"cannot {what}: merging the chain's links now would change the model's function. "
            f"{listed}. Nothing was changed"
        )


@torch.no_grad()
def merge_(record: ModuleRecord) -> None:
    """Fold the module's pending ``s·B·A`` (and bias delta) into the frozen originals, in place.

    The factors are left as they are; restart them afterwards. A quantized layer's link goes
    into its master, and the 4-bit weight becomes ``quantize(master)`` (:mod:`chainopt.quantized`).

    Raises:
        RuntimeError: the module's forward does not add the link now (:func:`require_mergeable`).
    """
    require_mergeable([record], "merge the link")
    if record.quant is not None:
        record.quant.merge_(record.link)
    for part, target in record.parts():
        if record.quant is not None and not isinstance(part, BiasDelta):
            continue  # merged into the master above
        if (
            not isinstance(part, BiasDelta)
            and part.merge_residual is None
            and target.dtype == part.lora_A.dtype == torch.float32
            and not is_sharded(target)
            and part.lora_A.dim() == 2
            and target.dim() == 2  # not fused experts (3-D), not a kernel
        ):
            a, b = part.lora_A, part.lora_B  # in place, no temporary
            if part.fan_in_fan_out:
                target.addmm_(a.T, b.T, alpha=part.scale)
            else:
                target.addmm_(b, a, alpha=part.scale)
        else:
            _store_(target, exact_sum(target, part), part.merge_residual)


@torch.no_grad()
def merged_weight(record: ModuleRecord, dtype: torch.dtype | None = None) -> Tensor:
    """The adapted weight ``W + residual + s·B·A`` as a new, whole tensor, in the stored layout.

    Args:
        record: the adapted module.
        dtype: the result's dtype (default: the weight's). ``torch.float32`` keeps what rounding
            into a half-precision weight would drop.

    Raises:
        RuntimeError: the module's forward does not add the link now (:func:`require_mergeable`).
    """
    require_mergeable([record], "read the merged weight")
    if record.quant is not None:  # float32 (the master's) unless asked otherwise
        return record.quant.merged(record.link).to(dtype or torch.float32)
    return exact_sum(record.weight, record.link).to(dtype or record.weight.dtype)


@torch.no_grad()
def merged_bias(record: ModuleRecord, dtype: torch.dtype | None = None) -> Tensor | None:
    """The adapted bias ``b + residual + δ`` (``None`` without a bias), dtype as above."""
    if record.bias is None:
        return None
    if record.delta is None:
        return full_tensor(record.bias.detach()).to(dtype or record.bias.dtype, copy=True)
    return exact_sum(record.bias, record.delta).to(dtype or record.bias.dtype)
