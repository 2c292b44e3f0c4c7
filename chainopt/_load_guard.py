"""The load guard of a chained model: ``load_state_dict`` checks every key before loading any.

:func:`guard_loads` registers one ``load_state_dict`` pre-hook on the chained model (a mark
listed with the others in :mod:`chainopt._record`). Before torch loads anything the hook

0. refuses ``load_state_dict(..., assign=True)``, which would replace the Parameters the
   optimizer holds (``ValueError``, nothing loaded),
1. takes a plain checkpoint's keys (``….weight``, as ``from_pretrained`` writes) as the frozen
   originals, the link restarting at zero (:func:`accept_plain_keys`), and restarts a merge
   residual at zero where its weight is loaded without it (:func:`restart_residuals`), and
2. checks the whole state dict against the model (:func:`check_incoming_state`): factors of a
   rank the link may take, every other tensor of its exact shape, nothing on the meta device,
   no NaN/Inf under a link, no factors of a link the model does not have (torch would skip
   them); a problem raises ``ValueError`` before any tensor is written.

A post-hook then settles what the load wrote: each 4-bit weight's host master follows the loaded
weight (:meth:`~chainopt.quantized.QuantizedWeight.follow_loaded_weight`), and a plain checkpoint
marks the model (:func:`loaded_plain_weights`: the chain's history no longer describes it) until
the chain's own state is loaded whole again.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=1)
    >>> check_incoming_state(model, {"0.bias": torch.zeros(3)})
    ["'0.bias' has shape (3,) there and (4,) in the model"]
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ._attach import plist_of
from ._fingerprint import Fingerprint, fingerprint, same_weights
from ._layers import find_adapted
from ._marks import (
    EXPECTED_WEIGHTS,
    INNER_LOAD_GUARDS,
    LOAD_GUARD,
    LOAD_SETTLE,
    LOADING,
    PLAIN_LOAD,
    STATE_RESTORED,
)
from ._peft_save import foreign_factors_problem
from ._quant_backends import backend_for
from ._record import Link, ModuleRecord
from .lora import BiasDelta

__all__ = [
    "accept_plain_keys",
    "check_incoming_state",
    "guard_loads",
    "loaded_plain_weights",
    "restart_residuals",
    "state_restored",
]


def check_incoming_state(
    model: nn.Module, state_dict: Mapping[str, Any], prefix: str = ""
) -> list[str]:
    """What keeps ``state_dict`` (keys under ``prefix``) from loading into ``model`` whole.

    Every tensor for a key the model has must fit it: a link's factors of a rank the link may
    take and the right other dimensions (:meth:`~chainopt.lora.LoRAParametrization.check_factors`),
    anything else its exact shape; none on the meta device; a frozen tensor under a link (a
    weight, a bias under a delta, a merge residual) finite. A link's factors (or bias delta)
    the model does not have (the state of a chain with other targets) fit nowhere: torch would
    report them as unexpected only after loading the rest, or skip them (``strict=False``),
    leaving that module's weights as they were. Returns the problems (empty: fits).
    """
    current = model.state_dict()
    problems: list[str] = []
    factor_keys: set[str] = set()
    layers = {  # a quantized layer's weight: its library's format (_check_quantized_weight)
        f"{prefix}{n}.weight" if n else f"{prefix}weight": m for n, m in _quantized_layers(model)
    }
    own_format = tuple(layers)
    for r in find_adapted(model):
        base = f"{prefix}{r.module_name}." if r.module_name else prefix
        a_key, b_key = f"{base}{r.link_prefix}lora_A", f"{base}{r.link_prefix}lora_B"
        factor_keys |= {a_key, b_key}
        if a_key in state_dict or b_key in state_dict:
            why = r.link.check_factors(state_dict.get(a_key), state_dict.get(b_key))
            if why is not None:
                problems.append(f"{r.name}: {why}")
    for key, mine in current.items():
        theirs = state_dict.get(prefix + key)
        if prefix + key in factor_keys or not isinstance(theirs, Tensor):
            continue
        if own_format and (prefix + key).startswith(own_format):
            layer = layers.get(prefix + key)
            why = (
                "a tensor on the meta device (no data)"
                if theirs.is_meta
                else None
                if layer is None
                else _check_quantized_weight(layer, theirs)
            )
            if why is not None:
                problems.append(f"{key!r} is {why}")
            continue
        if theirs.is_meta and not mine.is_meta:
            problems.append(f"{key!r} is a tensor on the meta device (no data)")
        elif tuple(theirs.shape) != tuple(mine.shape):
            problems.append(
                f"{key!r} has shape {tuple(theirs.shape)} there and {tuple(mine.shape)} in the "
                "model"
            )
    _, frozen = _chain_keys(model, prefix)
    for key in frozen:  # what a knot merges into (4-bit: checked dense, _quantize_dense_weights)
        theirs = state_dict.get(key)
        if (
            key not in layers
            and isinstance(theirs, Tensor)
            and theirs.is_floating_point()
            and not theirs.is_meta
            and not bool(torch.isfinite(theirs).all())
        ):
            problems.append(
                f"{key[len(prefix) :]!r}, a frozen tensor under a link, holds NaN/Inf (no "
                "knot could merge into it)"
            )
    foreign = sorted(
        k
        for k in state_dict
        if k.startswith(prefix) and k[len(prefix) :] not in current and _LINK_KEY.search(k)
    )
    if foreign:
        problems.append(
            f"{foreign[:2]} ({len(foreign)} in all) are factors of links this chain does not "
            "have (a chain's state with other targets, or with lora_bias): the plain weights "
            "there cannot take them"
        )
    return problems


_LINK_KEY = re.compile(r"(?:^|\.)parametrizations\.[^.]+\.\d+\.(?:lora_[AB]|delta)$")  # a factor


def _check_quantized_weight(layer: nn.Module, tensor: Tensor) -> str | None:
    """Why ``tensor`` cannot be the 4-bit ``layer``'s weight (``None``: it can). A dense float
    ``(out, in)`` weight is quantized into it; a quantized tensor subclass (a torchao
    ``NF4Tensor``) has the layer's shape; packed bytes are half a byte per weight element."""
    out, inp = int(getattr(layer, "out_features", 0)), int(getattr(layer, "in_features", 0))
    if _quantized_format(layer, tensor) or (
        tensor.is_floating_point() and tuple(tensor.shape) == (out, inp)
    ):
        return (
            None
            if tuple(tensor.shape) == (out, inp)
            else (f"a quantized weight of shape {tuple(tensor.shape)}; the layer's is {(out, inp)}")
        )
    packed = tensor.numel() * tensor.element_size()
    if packed != (out * inp + 1) // 2:
        return (
            f"{packed} bytes of packed 4-bit weight; the ({out}, {inp}) layer holds "
            f"{(out * inp + 1) // 2}"
        )
    return None


def accept_plain_keys(
    model: nn.Module, state_dict: dict[str, Any], prefix: str = ""
) -> bool | None:
    """Let a plain checkpoint (``….weight``, as ``from_pretrained`` writes) load into a chain.

    For each adapted module whose link (or bias delta) is a parametrization and whose plain weight
    (or bias) ``state_dict`` holds instead of the parametrized keys, the plain tensor becomes the
    frozen original and the link restarts at zero (A as it is, B, bias delta and residual zero):
    the model then computes exactly what the checkpoint's model computes. A 4-bit layer's weight
    without its link's keys restarts the link the same way (its master follows the loaded weight
    after the load). Edits ``state_dict`` in place.

    Returns:
        ``True`` when a plain tensor replaced a module's chain state, or a partial load replaces
        a frozen tensor under a link (a weight, a bias under a delta, a merge residual): the
        chain's history then no longer describes ``W - W₀``. ``False`` when ``state_dict`` holds
        every adapted module's own link keys, ``None`` otherwise (a partial load of factors or
        of tensors outside the links).
    """
    factor_keys, frozen_keys = _chain_keys(model, prefix)
    complete = all(b in state_dict for b in factor_keys)
    replaced = not complete and any(k in state_dict for k in frozen_keys)
    for r in find_adapted(model):
        base = f"{prefix}{r.module_name}." if r.module_name else prefix
        if r.quant is not None:
            replaced = _restart_quantized_link(r, state_dict, base) or replaced
        parts: list[tuple[str, Link | BiasDelta]] = [(r.param, r.link)]
        if r.delta is not None:
            parts.append(("bias", r.delta))
        for kind, part in parts:
            plist = plist_of(r.module, kind)  # only a parametrization moves the plain key (not a
            if plist is None or plist[0] is not part:  # 4-bit weight, nor another layer kind's)
                continue
            plain, stem = base + kind, f"{base}parametrizations.{kind}."
            if plain not in state_dict or stem + "original" in state_dict:
                continue
            replaced = True
            state_dict[stem + "original"] = state_dict.pop(plain)
            tensors = (
                [("delta", part.delta)]
                if isinstance(part, BiasDelta)
                else [("lora_A", part.lora_A), ("lora_B", part.lora_B)]
            )
            for name, tensor in tensors:
                restart = tensor.detach().clone() if name == "lora_A" else torch.zeros_like(tensor)
                state_dict.setdefault(f"{stem}0.{name}", restart)
            if part.merge_residual is not None:
                state_dict.setdefault(
                    f"{stem}0.merge_residual", torch.zeros_like(part.merge_residual)
                )
    return True if replaced else (False if complete else None)


def restart_residuals(model: nn.Module, state_dict: dict[str, Any], prefix: str = "") -> None:
    """A frozen tensor under a link loaded without its merge residual (a float32 chain's state
    into a bfloat16 one, a partial load of ``….original``): the residual restarts at zero in
    ``state_dict``. It holds what rounding dropped from the weight it was kept with, and the
    next knot would add it to the loaded one (a bfloat16 ulp off, silently). Found by
    identity (:func:`_keys_by_id`)."""
    keys = _keys_by_id(model, prefix)
    for frozen, residual in _frozen_pairs(find_adapted(model)):
        if frozen is None or residual is None:
            continue
        theirs = keys.get(id(residual), [])
        if any(k in state_dict for k in keys.get(id(frozen), [])) and not any(
            k in state_dict for k in theirs
        ):
            for k in theirs:
                state_dict[k] = torch.zeros_like(residual)


def _frozen_pairs(records: Sequence[ModuleRecord]) -> list[tuple[Tensor | None, Tensor | None]]:
    """Each frozen tensor under a link (a weight, a bias under a delta) with its merge residual
    (``None`` where there is none)."""
    pairs: list[tuple[Tensor | None, Tensor | None]] = []
    for r in records:
        pairs.append((r.weight, r.link.merge_residual))
        if r.delta is not None:
            pairs.append((r.bias, r.delta.merge_residual))
    return pairs


def _keys_by_id(model: nn.Module, prefix: str) -> dict[int, list[str]]:
    """``id`` of each of ``model``'s parameters and buffers -> its keys (under ``prefix``) in
    ``model.state_dict()``, every one of a tensor held at several places: any layer kind's own
    key names (PEFT's ``lora_B.<adapter>.weight`` and ``base_layer.weight`` included)."""
    keys: dict[int, list[str]] = {}
    for k, t in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        keys.setdefault(id(t), []).append(prefix + k)
    return keys


def _chain_keys(model: nn.Module, prefix: str) -> tuple[list[str], list[str]]:
    """The keys (under ``prefix``) of each link's ``lora_B`` and of the frozen tensors under the
    links (weights, biases under deltas, merge residuals), found by identity
    (:func:`_keys_by_id`)."""
    records = find_adapted(model)
    keys = _keys_by_id(model, prefix)
    factor_keys = sorted({k for r in records for k in keys.get(id(r.link.lora_B), [])})
    frozen = [t for pair in _frozen_pairs(records) for t in pair if t is not None]
    frozen_keys = sorted({k for t in frozen for k in keys.get(id(t), [])})
    return factor_keys, frozen_keys


def _restart_quantized_link(r: ModuleRecord, state_dict: dict[str, Any], base: str) -> bool:
    """A quantized layer's weight without its link's keys: the link restarts at zero (A as it
    is, B zero), as for a plain weight; the master follows the weight after the load."""
    stem = f"{base}{r.link_prefix}"
    factors = [("lora_A", r.link.lora_A), ("lora_B", r.link.lora_B)]
    if f"{base}weight" not in state_dict or any(f"{stem}{n}" in state_dict for n, _ in factors):
        return False
    for name, tensor in factors:
        restart = tensor.detach().clone() if name == "lora_A" else torch.zeros_like(tensor)
        state_dict[f"{stem}{name}"] = restart
    if r.link.merge_residual is not None:
        state_dict.setdefault(f"{stem}merge_residual", torch.zeros_like(r.link.merge_residual))
    return True


def loaded_plain_weights(model: nn.Module) -> bool:
    """Whether a load replaced the chained ``model``'s tensors (a plain, merged checkpoint, or
    the chain's own keys without its optimizer state) since its optimizer state was last
    loaded: its frozen weights then hold that checkpoint's weights, so the chain's history (the
    links merged since ``W₀``) no longer describes ``W - W₀``."""
    return bool(model.__dict__.get(PLAIN_LOAD))


def _prepare_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of a chained model: take plain keys, and check everything
    before anything is loaded."""
    module.__dict__.pop(LOADING, None)
    metadata = args[0] if args and isinstance(args[0], Mapping) else {}
    if metadata.get("assign_to_params_buffers"):
        raise ValueError(
            "load_state_dict(..., assign=True) into a chained model would replace its "
            "Parameters (the frozen weights and the factors) by the state dict's tensors, which "
            "the optimizer does not hold: its steps would train nothing and the next knot would "
            "refuse; nothing was loaded. Load without assign (the tensors are copied in place)"
        )
    restarted = {
        id(r.module)
        for r in find_adapted(module)
        if r.quant is not None
        and f"{prefix}{r.name}.weight" in state_dict
        and f"{prefix}{r.name}.{r.link_prefix}lora_B" not in state_dict
    }
    plain = accept_plain_keys(module, state_dict, prefix)
    restart_residuals(module, state_dict, prefix)
    dense, problems = _quantize_dense_weights(module, state_dict, prefix)
    problems += check_incoming_state(module, state_dict, prefix)
    foreign = foreign_factors_problem(module, state_dict, prefix)
    problems += [foreign] if foreign is not None else []
    if not problems:  # 4-bit weights this load writes: their masters follow after it
        module.__dict__[LOADING] = (
            plain,
            [
                (r.quant, dense.get(id(r.module)), id(r.module) in restarted)
                for r in find_adapted(module)
                if r.quant is not None and f"{prefix}{r.name}.weight" in state_dict
            ],
        )
    if not problems:  # 4-bit weights their own modules cannot load (adapted or not)
        for name, layer in _quantized_layers(module):
            backend = backend_for(layer)
            if backend is not None:
                backend.load_(
                    layer, state_dict, f"{prefix}{name}.weight" if name else f"{prefix}weight"
                )
    if problems:
        raise ValueError(
            "state_dict does not fit the chained model; nothing was loaded: "
            + "; ".join(problems[:5])
        )


def _quantize_dense_weights(
    model: nn.Module, state_dict: dict[str, Any], prefix: str
) -> tuple[dict[int, Tensor], list[str]]:
    """A dense float weight ``(out, in)`` for a 4-bit layer (what ``save_pretrained`` of a chain
    over layers quantized by hand writes: the merged model): quantized once into the layer's own
    format in ``state_dict``, so that it loads as the layer's weight. Returns the dense weights
    by ``id`` of the layer (an adapted layer's master becomes it) and the problems (no data,
    NaN or Inf). Changes no module."""
    dense: dict[int, Tensor] = {}
    problems: list[str] = []
    for name, layer in _quantized_layers(model):
        key = f"{prefix}{name}.weight" if name else f"{prefix}weight"
        tensor = state_dict.get(key)
        shape = (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
        if not (
            isinstance(tensor, Tensor)
            and tensor.is_floating_point()
            and tuple(tensor.shape) == shape
            and not _quantized_format(layer, tensor)
        ):
            continue
        if tensor.is_meta or not bool(torch.isfinite(tensor).all()):
            problems.append(f"{key!r} is a dense weight without data or with NaN/Inf")
            continue
        backend = backend_for(layer)
        assert backend is not None  # a quantized layer
        entries = backend.serialize(layer, tensor.detach())
        base = key[: -len("weight")]
        for k, v in entries.items():
            state_dict[f"{base}{k}"] = v
        dense[id(layer)] = tensor.detach().to("cpu", torch.float32, copy=True)
    return dense, problems


def _quantized_format(layer: nn.Module, tensor: Tensor) -> bool:
    """``tensor`` is already a quantized weight: a tensor subclass (a torchao ``NF4Tensor``)."""
    return type(tensor) not in (Tensor, nn.Parameter)


def _quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if backend_for(m) is not None]


def _finish_load(module: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook of a chained model: each 4-bit weight the load wrote and
    its host master agree again (``QuantizedWeight.follow_loaded_weight``), and the plain-load
    mark (:func:`loaded_plain_weights`) is set or cleared."""
    plain, quants = module.__dict__.pop(LOADING, (None, ()))
    for quant, dense, restarted in quants:
        quant.follow_loaded_weight(dense, restarted)
    if plain is not None:  # the chain's tensors replaced: by its own state, or not
        if module.__dict__.pop(STATE_RESTORED, False) and not plain:
            expected = module.__dict__.pop(EXPECTED_WEIGHTS, None)
            if expected is None:
                module.__dict__.pop(PLAIN_LOAD, None)
            else:  # the weights the state was saved with, or another run's
                _settle_weights(module, expected, fingerprint(find_adapted(module)))
        else:
            module.__dict__[PLAIN_LOAD] = True


def state_restored(
    model: nn.Module,
    restored: bool = True,
    weights: Fingerprint | None = None,
    records: Sequence[ModuleRecord] = (),
) -> None:
    """Record that the chain's optimizer state (history, counters, masters) was just loaded:
    its model describes the chain again if the frozen weights are those the state was saved
    with (``weights``, their fingerprint; ``None``: a state saved before fingerprints, taken on
    trust), and the next load of the chain's own tensors before a step (``load_checkpoint``
    loads the optimizer first) completes that state, checked against the same fingerprint.
    ``False`` (an optimizer step) forgets the second part."""
    if not restored:
        model.__dict__.pop(STATE_RESTORED, None)
        model.__dict__.pop(EXPECTED_WEIGHTS, None)
        return
    model.__dict__[STATE_RESTORED] = True
    if weights is None:
        model.__dict__.pop(EXPECTED_WEIGHTS, None)
        model.__dict__.pop(PLAIN_LOAD, None)
        return
    model.__dict__[EXPECTED_WEIGHTS] = weights
    _settle_weights(model, weights, fingerprint(records))


def _settle_weights(model: nn.Module, expected: Fingerprint, now: Fingerprint) -> None:
    """Mark the history stale (:func:`loaded_plain_weights`) unless the weights match."""
    if same_weights(expected, now):
        model.__dict__.pop(PLAIN_LOAD, None)
    else:  # another run's weights, or none loaded yet: the history does not describe them
        model.__dict__[PLAIN_LOAD] = True


def guard_loads(model: nn.Module) -> None:
    """Make ``model.load_state_dict`` check a chained model's keys whole before loading any,
    and keep each 4-bit weight's host master on what a load wrote into the weight."""
    if LOAD_GUARD not in model.__dict__:  # the handles: unloading removes the hooks (_marks)
        handle = model.register_load_state_dict_pre_hook(_prepare_load)  # type: ignore[no-untyped-call]
        model.__dict__[LOAD_GUARD] = handle
    if LOAD_SETTLE not in model.__dict__:
        settle = model.register_load_state_dict_post_hook(_finish_load)  # type: ignore[no-untyped-call]
        model.__dict__[LOAD_SETTLE] = settle
    if INNER_LOAD_GUARDS not in model.__dict__:  # every module from a link up, the model apart
        names = {r.module_name for r in find_adapted(model)}
        parts = [n.split(".") for n in names if n]
        inner = {".".join(p[: i + 1]) for p in parts for i in range(len(p))}
        model.__dict__[INNER_LOAD_GUARDS] = [
            model.get_submodule(name).register_load_state_dict_pre_hook(  # type: ignore[no-untyped-call]
                partial(_refuse_inner_load, name)
            )
            for name in sorted(inner)
        ]


def _refuse_inner_load(
    path: str, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
) -> None:
    """``load_state_dict`` pre-hook of a module of a chained model that holds links: a load
    into this module alone (not part of the model's own load, whose hook checks it) that
    writes a linked module is refused, nothing loaded. Torch would load it without the chain's
    checks: a plain ``….weight`` for a linked layer is an unexpected key (skipped silently with
    ``strict=False``; with ``strict=True`` the error comes after the rest was loaded), and its
    frozen weights would change without marking the chain's history stale."""
    if prefix:
        return
    linked = [r.module_name for r in find_adapted(module)]
    touched = sorted(
        k for k in state_dict if any(not n or k == n or k.startswith(f"{n}.") for n in linked)
    )
    if touched:
        raise ValueError(
            f"load_state_dict into {path!r}, a module of a chained model, would write the "
            f"chained modules under it ({touched[:3]}) without the chain's checks; nothing was "
            "loaded. Load into the chained model itself, with the keys under their full names "
            f"(model.load_state_dict({{'{path}.' + k: v for k, v in state.items()}}, "
            "strict=False))"
        )
