"""Leaving the chain: merge into plain modules, or read plain-key state dicts.

A parametrized model's ``state_dict()`` holds ``….parametrizations.weight.original`` and the
factors; a loader that expects ``….weight`` (``from_pretrained``, a serving stack) silently ignores
those keys. :func:`merged_state_dict` gives the plain keys with every link merged, without touching
the model; :func:`merge_and_unload` turns the model itself back into plain modules
(:func:`chainopt.save_merged` writes a Hugging Face checkpoint of the merged model). Each checks
first that every merged tensor is finite in its dtype, and raises before writing or changing
anything.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer, merged_state_dict
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=10)
    >>> sorted(merged_state_dict(model))
    ['0.bias', '0.weight', '2.bias', '2.weight']
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ._attach import parametrization_count
from ._dtensor import full_tensor, gathered, is_sharded
from ._layers import find_adapted
from ._marks import OWN_STATE, PEFT_SAVE, mark_base_merged, nested, unmark
from ._peft_layers import PeftLink
from ._peft_save import refuse_adapter_saves
from ._quant_backends import backend_for
from ._record import ModuleRecord
from ._validate import FLOAT_DTYPES, type_name
from .guard import NonFiniteUpdateError, check_links
from .merge import merge_, merged_bias, merged_weight, require_mergeable

__all__ = [
    "adapted_modules",
    "merge_and_unload",
    "merged_state_dict",
]  # the public names (chainopt re-exports them); the rest is internal


def adapted_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every chainopt link of ``model``: a layer's qualified name, or
    ``"<module>.<param>"`` with the module holding it for a parameter link
    (``target_parameters``).

    Args:
        model: any model (a ``copy.deepcopy`` of a chained one included).

    Returns:
        The links in model order; empty for a model chainopt never adapted or unloaded.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer, adapted_modules
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0", "2"], rank=2, knot_every=1)
        >>> [(name, module is model[int(name)]) for name, module in adapted_modules(model)]
        [('0', True), ('2', True)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type_name(model)}")
    return [(r.name, r.module) for r in find_adapted(model)]


def _checked(model: object, what: str) -> list[ModuleRecord]:
    """The adapted modules of ``model``, once every pending merge is known to be finite."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type_name(model)}")
    records = find_adapted(model)
    require_mergeable(records, what)
    check = check_links(records)
    if check.bad:
        raise NonFiniteUpdateError(f"refusing to {what}: {check.describe()}")
    return records


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every pending link into its weight and remove chainopt's parametrizations.

    Works on any model carrying chainopt links, a ``copy.deepcopy`` of a wrapped model included.
    The modules become plain ``nn.Linear`` (or ``Conv1D``) again, keep their Parameter objects and
    their parameters' registration order. PEFT's own layers (a chained ``PeftModel``) stay
    PEFT's, their B zero: the model computes the merged function, and PEFT's
    ``merge_and_unload()`` then gives the plain model.

    The marks chainopt left on the model go (:mod:`chainopt._marks`; only the record that its
    weights now hold a merged chain stays); a new :class:`~chainopt.ChainLoRAOptimizer` may then
    chain it again.

    Args:
        model: the chained model.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        NonFiniteUpdateError: a link holds NaN/Inf or would overflow its weight; nothing changed.
        RuntimeError: a module's forward does not add its link now (PEFT merged, disabled or
            switched its adapter); nothing changed.
        ValueError: an adapted module is sharded by FSDP2; nothing changed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer, merge_and_unload
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, knot_every=1)
        >>> x = torch.randn(2, 4)
        >>> with torch.no_grad():
        ...     _ = opt.factors()[1].normal_()  # a trained B, say
        ...     out = model(x)
        >>> weight = model[0].parametrizations.weight.original
        >>> plain = merge_and_unload(model)
        >>> type(plain[0]) is nn.Linear, plain[0].weight is weight
        (True, True)
        >>> torch.allclose(plain(x), out, atol=1e-6)
        True
    """
    return unload_merged(model, None)


def unload_merged(model: nn.Module, ranks: Mapping[str, int] | None) -> nn.Module:
    """:func:`merge_and_unload`, recording what was merged (``ranks``: the rank each module's
    chain merged, as the optimizer knows it; ``None``: not known) so that later adapters over
    these weights can tell (:func:`chainopt._marks.mark_base_merged`)."""
    records = _checked(model, "merge (no weight was changed)")
    sharded = [r.name for r in records if is_sharded(r.weight)]
    if sharded:
        raise ValueError(
            f"refusing to merge and unload FSDP2-sharded modules ({sharded[:3]}): FSDP2 keeps "
            "the Parameters under the chain's names, and a plain module would break its "
            "forward; no weight was changed. Save with chainopt.save_checkpoint (it gathers), "
            "load the file into an unsharded copy of the model and unload there"
        )
    adapter_save = PEFT_SAVE in model.__dict__  # a PeftModel's save_pretrained wrote the chain
    for r in records:
        merge_(r)
        with torch.no_grad():
            r.link.lora_B.zero_()  # a link that stays in the module (PEFT's) must add nothing
        r.unload()
    unmark(model)  # the load guard, save_pretrained, ...: see chainopt._marks
    if records:  # the weights now hold the chain: adapters over them are not over the base
        mark_base_merged(
            model, {r.name: None if ranks is None else ranks.get(r.name) for r in records}
        )
        inner = getattr(model, "get_base_model", None)  # PEFT's merge_and_unload() returns it
        if callable(inner) and isinstance(base := inner(), nn.Module) and base is not model:
            mark_base_merged(base, {})
        if adapter_save:
            refuse_adapter_saves(model)
    return model


@torch.no_grad()
def merged_state_dict(
    model: nn.Module, quantized_dtype: torch.dtype | None = None, keep_quantized: bool = False
) -> dict[str, Tensor]:
    """``model.state_dict()`` under plain keys, with every pending link merged.

    The model is not changed. ``….parametrizations.weight.original`` becomes ``….weight`` holding
    ``W + s·B·A`` (and the bias its delta); factor and residual entries are dropped. Quantized
    (4-bit) layers become dense ``….weight`` entries in ``quantized_dtype`` (default: the layer's
    ``compute_dtype``, else float32): an adapted one its master plus the pending link, any other
    one dequantized; so the result loads into the unquantized model. With ``keep_quantized`` they
    stay 4-bit instead, in their library's own keys, an adapted one requantized from its master
    plus the pending link (what a 4-bit checkpoint of the fine-tuned model holds). Other entries
    are passed through unchanged, in order.

    PEFT's own layers (a chained ``PeftModel``) keep PEFT's keys as they are: each base layer
    holds every finished link, the factors the one under way, and DoRA's magnitude and the base
    bias are there, so the result loads into a ``PeftModel`` of the same ``LoraConfig`` to the
    trained function (what PEFT's own state dict is). The plain fine-tuned model is PEFT's
    ``merge_and_unload()`` after :func:`merge_and_unload`.

    Under FSDP2 (a model sharded by ``fully_shard``) every rank must call it: it gathers the
    shards, and each rank gets every tensor whole, the sharded ones on the CPU (a sharded model
    need not fit one device whole), as :func:`chainopt.checkpoint.save_checkpoint` does.

    Args:
        model: the chained model (a plain one gives its own state dict).
        quantized_dtype: dtype of the dense weights 4-bit layers become.
        keep_quantized: keep 4-bit layers in their library's own format.

    Returns:
        The state dict, on the model's devices (sharded tensors: whole, on the CPU).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``quantized_dtype`` not float32, float64,
            bfloat16 or float16 (float8 would silently lose a few percent of each weight), or
            ``keep_quantized`` not a bool.
        NonFiniteUpdateError: a merged weight or bias would not be finite, or a parameter that
            trains outside the links (``trainable_modules``) holds NaN/Inf.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from chainopt import ChainLoRAOptimizer, merged_state_dict
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
        ...                          target_modules=["0"], rank=2, knot_every=1)
        >>> list(model.state_dict())[:2]
        ['0.bias', '0.parametrizations.weight.original']
        >>> state = merged_state_dict(model)
        >>> sorted(state)
        ['0.bias', '0.weight']
        >>> _ = nn.Sequential(nn.Linear(4, 4)).load_state_dict(state)  # strict: plain keys
    """
    records = _checked(model, "export the merged weights")
    if quantized_dtype is not None and quantized_dtype not in FLOAT_DTYPES:
        raise TypeError(  # float8: 2.7 % (e4m3) to 5.4 % (e5m2) of a merged NF4 weight lost
            "quantized_dtype must be None or a floating torch.dtype the model can compute in "
            f"({', '.join(map(str, FLOAT_DTYPES))}), got {quantized_dtype!r}"
        )
    if not isinstance(keep_quantized, bool):
        raise TypeError(f"keep_quantized must be a bool, got {keep_quantized!r}")
    adapted = {id(r.module) for r in records}
    state = own_state_dict(model)
    groups: dict[str, dict[str, Tensor]] = {}  # first key of a group -> the entries it becomes
    owner: dict[str, str] = {}  # state-dict key -> its group

    def claim(group: str, keys: list[str], entries: dict[str, Tensor]) -> None:
        for key in keys:
            owner[key] = group
        groups[group] = entries

    def dense_dtype(module: nn.Module) -> torch.dtype:
        dtype = quantized_dtype or getattr(module, "compute_dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    names: dict[int, list[str]] = {}  # a module registered at several places: each name
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), []).append(name)
    for r in records:
        if isinstance(r.link, PeftLink):  # PEFT's own keys, as they are (see the docstring)
            continue
        param = r.param  # "weight", or a bare parameter's name (target_parameters)
        if r.quant is not None:
            weight = merged_weight(r, torch.float32)
        else:
            # With another parametrization stacked after ours, only the whole stack is the weight.
            stacked = parametrization_count(r.module, param) > 1
            weight = getattr(r.module, param).detach().clone() if stacked else merged_weight(r)
        if not bool(torch.isfinite(weight).all()):
            raise NonFiniteUpdateError(f"refusing to export {r.name!r}: its weight is not finite")
        bias = merged_bias(r) if r.delta is not None else None
        if is_sharded(r.weight):  # whole onto the CPU, like the other sharded entries (below)
            weight = full_tensor(weight).cpu()  # a stacked parametrization's is a DTensor
            bias = None if bias is None else full_tensor(bias).cpu()
        for module_name in dict.fromkeys(names.get(id(r.module), [r.module_name])):
            prefix = f"{module_name}." if module_name else ""
            if r.quant is not None:
                own = (f"{prefix}weight.", f"{prefix}{r.link_prefix}")
                keys = [k for k in state if k == f"{prefix}weight" or k.startswith(own)]
            else:
                own = (f"{prefix}parametrizations.{param}.", f"{prefix}{r.link_prefix}")
                keys = [k for k in state if k == f"{prefix}{param}" or k.startswith(own)]
            if not keys:  # a name the state dict does not reach (a registration it skips)
                continue
            if r.quant is None:
                entries = {f"{prefix}{param}": weight}
            elif keep_quantized:
                entries = {
                    prefix + k: v for k, v in r.quant.backend.serialize(r.module, weight).items()
                }
            else:
                entries = {f"{prefix}weight": weight.to(dense_dtype(r.module))}
            claim(keys[0], keys, entries)
            if bias is not None:
                keys = [k for k in state if k.startswith(f"{prefix}parametrizations.bias.")]
                claim(keys[0], keys, {f"{prefix}bias": bias})
    if not keep_quantized:  # the quantized layers the chain does not adapt: dequantized too
        for name, module in model.named_modules():
            backend = backend_for(module)
            if backend is None or id(module) in adapted:
                continue
            prefix = f"{name}." if name else ""
            keys = [k for k in state if k == f"{prefix}weight" or k.startswith(f"{prefix}weight.")]
            claim(
                keys[0],
                keys,
                {f"{prefix}weight": backend.dequantize(module).to(dense_dtype(module))},
            )
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        group = owner.get(key)
        if group is None:
            out[key] = value
        elif key == group:  # where the first of its keys stood
            out.update(groups[group])
    whole: dict[str, Tensor] = gathered(out)  # FSDP2: the other sharded entries, whole too
    bad = non_finite_trained(model, records, whole)
    if bad:
        raise NonFiniteUpdateError(f"refusing to export the merged weights: {bad}")
    return whole


def non_finite_trained(
    model: nn.Module, records: list[ModuleRecord], state: Mapping[str, Tensor]
) -> str | None:
    """What makes an export of a chained ``model`` carry NaN/Inf beyond its links: the entries
    of ``state`` (keys as in ``model.state_dict()``) of parameters that train outside the links
    (``trainable_modules``, a head) and are not finite; ``None`` if none is (or nothing is
    chained). A knot never merges such values, but they train as they are: a NaN gradient (a
    link dropped by ``non_finite="skip"``) leaves them NaN."""
    if not records:
        return None
    factors = {id(p) for r in records for p in r.factors()}
    trained = [
        n
        for n, p in model.named_parameters(remove_duplicate=False)
        if p.requires_grad and id(p) not in factors
    ]
    bad = [
        n
        for n in trained
        if isinstance(t := state.get(n), Tensor)
        and t.is_floating_point()
        and not bool(torch.isfinite(t).all())
    ]
    if not bad:
        return None
    return (
        f"{bad[:3]} ({len(bad)} in all) train outside the chain's links (trainable_modules) and "
        "hold NaN/Inf (a NaN/Inf gradient reached them: non_finite='skip' drops a bad link, "
        "not what else the step trained); resume from the last checkpoint"
    )


def chain_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The chain's own entries of ``model.state_dict()``: frozen originals, factors, residuals;
    for a 4-bit layer its link and its 4-bit weight with the quantization state (a merged
    checkpoint holds ``quantize(master + link)`` there, not the weight the link sits on).

    What a merged (deployable) checkpoint lacks to resume a link exactly; keys as in
    ``model.state_dict()``, tensors by reference.
    """
    owned: list[str] = []
    for r in find_adapted(model):
        base = f"{r.module_name}." if r.module_name else ""
        if isinstance(r.link, PeftLink):  # a PEFT layer: its base layer and factors
            owned.append(base)
            continue
        owned.append(f"{base}{r.link_prefix}")
        if r.quant is not None:
            owned.append(f"{base}weight")
        else:  # a layer's weight (and bias delta); a bare parameter's own tensor only
            owned.append(f"{base}parametrizations." + ("" if r.owner is None else f"{r.param}."))
    if not owned:
        return {}
    if getattr(model, "hf_quantizer", None) is None:  # a merged save writes every 4-bit layer
        owned += [  # dense (no quantizer to save it 4-bit): keep their 4-bit weights exactly
            f"{n}.weight" if n else "weight" for n, m in model.named_modules() if backend_for(m)
        ]
    prefixes = tuple(owned)
    return {k: v for k, v in own_state_dict(model).items() if k.startswith(prefixes)}


def own_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with the chain's own keys, also where a deploy save is on the stack
    (whose state-dict hook would give merged keys: :mod:`chainopt._hf_save`)."""
    with nested(model, OWN_STATE):
        return dict(model.state_dict())
