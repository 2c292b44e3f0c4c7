"""Building a chain: ``(model, optimizer, config)`` in, the :class:`~chainopt.knot.Chain` out.

:func:`build_chain` is the whole construction, top to bottom:

1. refuse an optimizer over foreign parameters (:func:`check_optimizer`) and resolve the 4-bit
   targets' masters;
2. register the first link on every module the config names, through the builder of its layer
   kind (:mod:`chainopt._layers`), each giving a :class:`~chainopt._record.ModuleRecord`;
3. freeze everything but the factors and the ``trainable_modules``;
4. rewrite the wrapped optimizer's param groups to the factors (:func:`regroup`), or build it
   from a factory, and refuse one that would not step them (:func:`verify_steps_factors`);
5. guard the model's ``load_state_dict`` (:mod:`chainopt._load_guard`);
6. resolve the policies once (reset, non-finite, init) and assemble the ``Chain``, with the
   wrapped optimizer's own knot context (schedule-free) first;
7. a Hugging Face model (one with ``save_pretrained``) saves the merged model from then on, and
   a quantized one may be trained by the ``Trainer``
   (:func:`chainopt._hf_save.prepare_hf_model`).

Every mark this leaves on the model is listed in :mod:`chainopt._marks`.

If anything raises (a factory, a check, a warning turned into an error, a later step of the
optimizer's own construction that holds an :class:`Undo`), the construction is undone: the links
are removed, every hook and instance attribute it added goes, ``requires_grad`` flags and the
wrapped optimizer's param groups and state are restored: model and optimizer are as they were.
The optimizer holds the ``Chain`` and nothing that aliases its parts.
:func:`rebind` is the one later rebuild: FSDP2's ``fully_shard`` replaced Parameters, so the
records are looked up again (``chain.records`` is assigned, never edited in place).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt.config import ChainConfig
    >>> model = nn.Sequential(nn.Linear(4, 4).half())
    >>> config = ChainConfig.from_kwargs(model, target_modules=["0"], rank=2, knot_every=5)
    >>> chain = build_chain(model, torch.optim.SGD(model.parameters(), lr=0.1), config)
    >>> [record] = chain.records
    >>> record.link.lora_A.dtype, record.link.merge_residual.dtype  # float32 factors, exact merges
    (torch.float32, torch.float32)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._dtensor import is_sharded, shard_like
from ._experts import ParameterBuilder
from ._hf_save import prepare_hf_model
from ._layers import builder_for
from ._load_guard import guard_loads
from ._marks import merged_rank
from ._record import LinkSpec, ModuleRecord, RecordBuilder
from ._schedule_free import resolve_iterates
from ._validate import type_name
from .advice import warn_frozen_head, warn_rounding_knots
from .config import ChainConfig
from .history import ChainHistory
from .init import resolve_init
from .knot import Chain, resolve_non_finite
from .quantized import resolve_master_weights
from .reset import FreshState, InitialState, resolve_reset

__all__ = [
    "Undo",
    "adapt_modules",
    "build_chain",
    "check_optimizer",
    "drop_params",
    "link_spec",
    "rebind",
    "regroup",
    "verify_steps_factors",
]


def build_chain(
    model: nn.Module,
    optimizer: Optimizer | Callable[[list[nn.Parameter]], Optimizer],
    config: ChainConfig,
    master_weights: nn.Module | Mapping[str, Tensor] | None = None,
    undo: Undo | None = None,
) -> Chain:
    """Adapt ``model`` as ``config`` says and return the chain a knot works on.

    Args:
        model: the model (checked against ``config`` already: :meth:`ChainConfig.from_kwargs`).
        optimizer: an optimizer over ``model.parameters()`` (its groups are rewritten), or a
            factory ``params -> Optimizer``.
        config: the chain's config.
        master_weights: the original float weights of 4-bit targets (see
            :func:`~chainopt.quantized.resolve_master_weights`).
        undo: the caller's :class:`Undo`, taken before this call, when the caller has more to
            do that may fail (it then calls it); by default one of this call's own.

    Raises:
        TypeError: ``optimizer`` is neither an optimizer nor a callable, or a factory returned
            no ``torch.optim.Optimizer``.
        ValueError: an optimizer over foreign parameters, one that would not step the factors,
            or bad ``master_weights`` (or any with no 4-bit target, or with
            ``quantized_master="none"``). Nothing is changed then (see :class:`Undo`).
    """
    check_optimizer(optimizer, model)
    layers = [n for n in config.modules if n not in config.parameters]
    masters = resolve_master_weights(master_weights, model, layers)
    if master_weights is not None and not masters:
        raise ValueError(
            f"master_weights (a {type_name(master_weights)}) starts the host masters of 4-bit "
            f"targets, but none of {list(layers)[:4]} is a 4-bit layer (bitsandbytes "
            "Linear4bit, torchao NF4); omit it"
        )
    if masters and config.quantized_master == "none":
        raise ValueError(
            'master_weights with quantized_master="none": that keeps no master to start from '
            'the original weights; use quantized_master="host" (the default) or omit '
            "master_weights"
        )
    own = undo is None
    undo = Undo(model, optimizer) if undo is None else undo
    try:
        return _build(model, optimizer, config, masters, undo)
    except BaseException:
        if own:
            undo()
        raise


def _build(
    model: nn.Module,
    optimizer: Optimizer | Callable[[list[nn.Parameter]], Optimizer],
    config: ChainConfig,
    masters: Mapping[str, Tensor] | None,
    undo: Undo,
) -> Chain:
    generator = torch.Generator().manual_seed(config.seed)
    keep = [p for name in config.trainable for p in model.get_submodule(name).parameters()]
    keep = list({id(p): p for p in keep}.values())
    records, base = _wrap(model, optimizer, config, generator, keep, masters)
    undo.records = records
    if any(r.quant is not None and r.quant.master is None for r in records):
        warn_rounding_knots()  # quantized_master="none"
    fresh = FreshState(base.state, [p for r in records for p in r.factors()])
    chain = Chain(
        records=records,
        config=config,
        history=ChainHistory(keep_factors=config.keep_history),
        generator=generator,
        optimizer=base,
        reset_state=resolve_reset(config.reset, config.prune_ratio, fresh, InitialState(base)),
        drop_state=resolve_reset("full", fresh=fresh),
        on_bad=resolve_non_finite(config.non_finite),
        link_init=resolve_init(config.init, [(r.name, r.module) for r in records]),
        merged_before={r.name: merged_rank(model, r.name) for r in records},
    )
    iterates = resolve_iterates(base)
    if iterates is not None:
        chain.add_context(iterates)  # entered first, around the registered ones
    warn_frozen_head(model, config.modules, config.trainable)
    prepare_hf_model(model)  # a model with save_pretrained saves merged; a 4-bit HF one may train
    return chain


class Undo:
    """What building a chain may change, taken before it changes anything; calling it puts all
    of it back.

    A call unloads the links built so far (:attr:`records`); then, on the model and every module
    it held, removes each hook added since (forward, backward, ``state_dict`` and
    ``load_state_dict`` hooks alike: every hook dict in the module's ``__dict__``) and each
    instance attribute added since, and puts back each one replaced; restores every parameter's
    ``requires_grad``; and puts back the wrapped optimizer's param groups (each ``params`` list
    edited in place, as :func:`regroup` edits it) and state. A second call does nothing.

    Args:
        model: the model about to be chained.
        optimizer: the optimizer about to be wrapped (a factory has nothing to restore).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> base = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> undo = Undo(model, base)
        >>> handle = model.register_forward_hook(lambda *args: None)
        >>> _ = model[0].weight.requires_grad_(False)
        >>> base.param_groups[0]["params"].clear()
        >>> undo()
        >>> hooks, params = len(model._forward_hooks), len(base.param_groups[0]["params"])
        >>> hooks, model[0].weight.requires_grad, params
        (0, True, 2)
    """

    def __init__(self, model: nn.Module, optimizer: object) -> None:
        self.records: list[ModuleRecord] = []
        self._done = False
        self._modules = [
            (m, dict(vars(m)), {k: list(v) for k, v in vars(m).items() if _is_hooks(k, v)})
            for m in model.modules()
        ]
        self._requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self._optimizer = optimizer if isinstance(optimizer, Optimizer) else None
        self._groups: list[tuple[dict[str, Any], list[Tensor], dict[str, Any]]] = []
        self._state: dict[Any, Any] = {}
        if self._optimizer is not None:
            self._groups = [(g, list(g["params"]), dict(g)) for g in self._optimizer.param_groups]
            self._state = dict(self._optimizer.state)

    def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        for r in self.records:
            r.unload()
        for module, attributes, hooks in self._modules:
            current = vars(module)
            for key, value in list(current.items()):
                if _is_hooks(key, value):
                    for hook_id in [h for h in value if h not in hooks.get(key, ())]:
                        del value[hook_id]
                if key not in attributes:
                    del current[key]
                elif value is not attributes[key]:
                    current[key] = attributes[key]
            for key in attributes.keys() - current.keys():
                current[key] = attributes[key]
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        if self._optimizer is not None:
            for group, params, entries in self._groups:
                group["params"][:] = params
                group.clear()
                group.update(entries)
            self._optimizer.param_groups[:] = [g for g, _p, _e in self._groups]
            self._optimizer.state.clear()
            self._optimizer.state.update(self._state)


def _is_hooks(key: str, value: object) -> bool:
    """A module's hook dict (``_forward_hooks``, ``_load_state_dict_pre_hooks``, ...)."""
    return "hook" in key and isinstance(value, dict)


def link_spec(config: ChainConfig) -> LinkSpec:
    """What the builders read of ``config``."""
    return LinkSpec(
        ranks=config.ranks,
        alpha=config.alpha,
        lora_bias=config.lora_bias,
        factor_dtype=config.factor_dtype,
        exact_merge=config.exact_merge,
        quantized_master=config.quantized_master,
    )


def adapt_modules(
    model: nn.Module,
    config: ChainConfig,
    generator: torch.Generator,
    masters: Mapping[str, Tensor] | None = None,
) -> list[ModuleRecord]:
    """Attach the first link to every module of ``config.modules``; all of them or none.

    Each module goes to the builder of its kind (:data:`chainopt._layers.BUILDERS`), each
    parameter of ``config.parameters`` (``"<module>.<param>"``) to a
    :class:`~chainopt._experts.ParameterBuilder`; a quantized layer's master starts from
    ``masters[name]`` if given (see :mod:`chainopt.quantized`).
    """
    spec = link_spec(config)
    records: list[ModuleRecord] = []
    parameters = set(config.parameters)
    try:
        for name in config.modules:
            builder: RecordBuilder | None
            if name in parameters:
                owner, _, param = name.rpartition(".")
                module, builder = model.get_submodule(owner), ParameterBuilder(param)
            else:
                module = model.get_submodule(name)
                builder = builder_for(module)
            if builder is None:  # pragma: no cover - the config checked it
                raise TypeError(f"{name!r} is a {type_name(module)}, which no builder adapts")
            records.append(builder.attach(name, module, spec, generator, (masters or {}).get(name)))
    except BaseException:
        for r in records:
            r.unload()
        raise
    return records


def _wrap(
    model: nn.Module,
    optimizer: Optimizer | Callable[[list[nn.Parameter]], Optimizer],
    config: ChainConfig,
    generator: torch.Generator,
    keep: list[nn.Parameter],
    masters: Mapping[str, Tensor] | None = None,
) -> tuple[list[ModuleRecord], Optimizer]:
    """Adapt the modules, freeze the rest, build or regroup the optimizer; undo all on failure.

    Returns:
        The records and the optimizer that steps their factors (and ``keep``).
    """
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    records: list[ModuleRecord] = []
    try:
        before = {id(m) for m in model.modules()}
        records = adapt_modules(model, config, generator, masters)
        for r in records:  # the link's modules train or evaluate as the module holding them
            for m in r.module.modules():
                if id(m) not in before:
                    m.training = r.module.training
        factors = [p for r in records for p in r.factors()]
        trainable = {id(p) for p in factors} | {id(p) for p in keep}
        for p in model.parameters():
            p.requires_grad_(id(p) in trainable)
        if isinstance(optimizer, Optimizer):
            regroup(optimizer, records, keep)
            base = optimizer
        else:
            base = optimizer([*factors, *keep])
            if not isinstance(base, Optimizer):
                raise TypeError(
                    f"optimizer factory must return a torch.optim.Optimizer, got {type_name(base)}"
                )
        verify_steps_factors(base, factors, keep)
        guard_loads(model)
        return records, base
    except BaseException:
        for r in records:
            r.unload()
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        raise


def regroup(optimizer: Optimizer, records: Sequence[ModuleRecord], keep: Sequence[Tensor]) -> None:
    """Rewrite ``optimizer``'s groups in place: the factors join their weight's group.

    A and B join the group that held the module's weight, the bias delta the group that held
    its bias (a no-weight-decay group for biases, as the ``Trainer`` builds, stays free of decay
    for the delta too); one whose tensor is in no group joins the weight's group, else the
    first group. A factor the optimizer already holds (PEFT's own factors, with LoRA+'s
    separate groups for B, say) stays in its group.

    Frozen parameters leave (with any state); ``keep`` stays, and a parameter of ``keep`` the
    optimizer does not hold (a module frozen before and left out of the optimizer, named in
    ``trainable_modules``) joins the first group: it would get gradients and never a step.
    Each group's ``params`` list is edited in place, so an optimizer that holds on to that list
    (LBFGS) sees the change.
    """
    kept = {id(p) for p in keep}
    home: dict[int, int] = {}
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            home.setdefault(id(p), i)
    joins: list[list[Tensor]] = [[] for _ in optimizer.param_groups]
    if joins:
        joins[0] += [p for p in keep if id(p) not in home]
    held: set[int] = set()
    for r in records:
        weights = home.get(id(r.weight), 0)
        biases = home.get(id(r.bias), weights) if r.bias is not None else weights
        for factor in r.factors():
            if id(factor) in home:
                held.add(id(factor))
            elif r.delta is not None and factor is r.delta.delta:
                joins[biases].append(factor)
            else:
                joins[weights].append(factor)
    for group, extra in zip(optimizer.param_groups, joins, strict=True):
        for p in group["params"]:
            if id(p) not in kept | held:
                optimizer.state.pop(p, None)
        group["params"][:] = [p for p in group["params"] if id(p) in kept | held] + extra


def verify_steps_factors(
    optimizer: Optimizer, factors: Sequence[Tensor], keep: Sequence[Tensor]
) -> None:
    """Raise unless ``optimizer`` steps every factor and nothing outside the chain.

    Raises:
        ValueError: a factor is in no param group, a group holds a parameter that is neither a
            factor nor kept trainable, or the optimizer keeps a list of its own that still holds
            frozen parameters (it would step those, not the factors).
    """
    allowed = {id(p) for p in [*factors, *keep]}
    held = [p for g in optimizer.param_groups for p in g["params"]]
    held_ids = {id(p) for p in held}
    missing = sum(id(p) not in held_ids for p in factors)
    if missing:
        raise ValueError(
            f"the optimizer does not step {missing} of the chain's {len(factors)} factors: "
            "an optimizer factory must build the optimizer over the parameters it is given"
        )
    foreign = [tuple(p.shape) for p in held if id(p) not in allowed]
    if foreign:
        raise ValueError(
            f"the optimizer holds {len(foreign)} parameter(s) outside the chain (shapes "
            f"{foreign[:3]}): an optimizer factory must use only the parameters it is given"
        )
    for attr, value in vars(optimizer).items():
        if attr in ("param_groups", "state", "defaults") or not isinstance(value, (list, tuple)):
            continue
        stale = [v for v in value if isinstance(v, nn.Parameter) and id(v) not in allowed]
        if stale:
            raise ValueError(
                f"{type_name(optimizer)} keeps its own list of parameters ({attr!r}) that still "
                "holds the frozen weights, so it would never step the chain's factors; pass a "
                f"factory instead: optimizer=lambda params: {type_name(optimizer)}(params, ...)"
            )


def check_optimizer(optimizer: object, model: nn.Module) -> None:
    """Refuse an optimizer over foreign parameters, a chain, or something not an optimizer."""
    if isinstance(optimizer, Optimizer):
        if hasattr(optimizer, "chain") and hasattr(optimizer, "optimizer"):
            raise ValueError("optimizer is already a ChainLoRAOptimizer; wrap the plain optimizer")
        owned = {id(p) for p in model.parameters()}
        for i, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if id(p) not in owned:
                    raise ValueError(
                        f"optimizer holds a parameter of shape {tuple(p.shape)} (param group {i}) "
                        "that is not a parameter of model; build it over model.parameters()"
                    )
    elif not callable(optimizer):
        raise TypeError(
            "optimizer must be a torch.optim.Optimizer built over model.parameters() or a "
            f"callable params -> Optimizer, got {type_name(optimizer)}"
        )


def drop_params(optimizer: Optimizer, params: Sequence[Tensor]) -> None:
    """Take ``params`` out of ``optimizer``'s groups and state (in place)."""
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"][:] = [p for p in group["params"] if id(p) not in ids]
    for p in list(optimizer.state):
        if id(p) in ids:
            del optimizer.state[p]


def rebind(chain: Chain, model: nn.Module, names: dict[int, str]) -> dict[int, str]:
    """Point ``chain`` at the Parameters ``model`` holds now (after FSDP2's ``fully_shard``).

    In the wrapped optimizer's groups each Parameter ``model`` no longer holds is replaced by its
    new one; ``names`` maps ``id`` of the Parameters the optimizer was built with to their
    qualified names. ``chain.records`` becomes the records looked up again, and merge residuals
    are sharded like their (now sharded) weights. Returns the new ``id → name`` map.

    Raises:
        RuntimeError: a parameter the optimizer holds left the model, was replaced after it
            got optimizer state, or is a sharded 4-bit weight. Nothing is changed then.
    """
    optimizer = chain.optimizer
    for r in chain.records:
        weight = getattr(r.module, "weight", None)
        if r.quant is not None and isinstance(weight, Tensor) and is_sharded(weight):
            raise RuntimeError(
                f"fully_shard sharded the 4-bit weight of {r.name!r}: a bitsandbytes Params4bit "
                "or torchao NF4Tensor loses its quantization state when sharded; keep the 4-bit "
                "weights whole with fully_shard(..., ignored_params={the 4-bit weights}) (the "
                "factors and other parameters are still sharded), or use DDP"
            )
    current = dict(model.named_parameters())
    moves: list[tuple[list[Any], int, Tensor]] = []
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            new = current.get(names.get(id(p), ""))
            if new is None:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} held by the optimizer is no "
                    "longer in the model"
                )
            if new is not p and p in optimizer.state:
                raise RuntimeError(
                    f"parameter {names[id(p)]!r} was replaced after it got optimizer state: "
                    "shard the model before the first step"
                )
            if new is not p:
                moves.append((group["params"], i, new))
    for params, i, replacement in moves:
        params[i] = replacement
    chain.records = [r.refreshed() for r in chain.records]
    for r in chain.records:  # FSDP2 leaves buffers whole: shard the residuals
        for part, target in r.parts():
            residual = part.merge_residual
            if residual is not None and is_sharded(target) and not is_sharded(residual):
                part.merge_residual = shard_like(residual, target)
    return {id(p): n for n, p in current.items()}
