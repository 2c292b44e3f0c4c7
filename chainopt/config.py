"""What a chain is built with: one frozen :class:`ChainConfig`, validated once.

:meth:`ChainConfig.from_kwargs` holds every check of the constructor's arguments and of the model
they refer to, and raises ``TypeError``/``ValueError`` naming the argument and the value before
anything is changed. The config is saved in the optimizer's state dict (:meth:`ChainConfig.to_dict`)
and compared on load.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> config = ChainConfig.from_kwargs(model, target_modules=["0"], rank=[4, 2], knot_every=10)
    >>> config.modules, config.ranks, config.link_rank(5)
    (('0',), (4, 2), 2)
    >>> ChainConfig.from_kwargs(model, target_modules=["0"], rank=0)
    Traceback (most recent call last):
    ...
    ValueError: rank must be a positive int (or a non-empty list of them, a rank per link), got 0
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from itertools import pairwise
from typing import Any, Literal, TypeAlias, cast, get_args

import torch
from torch import nn

from ._dtensor import is_sharded
from ._layers import find_adapted
from ._peft_layers import (
    PeftLink,
    active_adapter,
    choose_peft_layers,
    peft_config_of,
    peft_lora_layers,
    peft_trainable,
)
from ._validate import (
    FLOAT_DTYPES,
    PARALLEL_WRAPPERS,
    is_distributed,
    is_int,
    not_python_number,
    type_name,
)
from .init import InitPolicy
from .quantized import QuantizedMaster
from .reset import ResetPolicy
from .schedule import KnotSchedule
from .targets import (
    ModuleSpec,
    choose_parameters,
    choose_targets,
    choose_trainable,
    describe_spec,
    model_storages,
    readable_twice,
    select_parameters,
    shared_parameters,
    sharing_problem,
    warn_peft_left_out,
)

__all__ = [
    "ChainConfig",
    "NonFinitePolicy",
]  # the public names (chainopt re-exports them); the rest is internal

NonFinitePolicy: TypeAlias = Literal["raise", "skip"]
"""At a knot, a link that must not be merged (NaN/Inf, or an overflow of the weight's dtype) either
raises (``"raise"``) or is dropped unmerged with a warning while the others are merged
(``"skip"``). No non-finite value reaches a weight."""

FACTOR_DTYPES = FLOAT_DTYPES
"""Dtypes the factors may have."""

_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
_SAVED_BEFORE_V2 = (
    "modules", "ranks", "alpha", "knot_every", "knots", "lora_bias", "seed", "factor_dtype",
    "exact_merge", "keep_history", "reset", "prune_ratio", "init",
)  # fmt: skip


@dataclass(frozen=True)
class ChainConfig:
    """What a chain was built with.

    Attributes:
        modules: the records' names, in model order: the qualified name of each adapted
            module, and ``"<module>.<param>"`` of each adapted parameter (after its module's).
        ranks: rank of each link; the last repeats (rank step-down).
        alpha: LoRA alpha; link ``i`` has scale ``alpha / ranks[i]``.
        knot_every: the interval schedule, or ``None``.
        knots: the step list schedule (empty with ``knot_every``).
        lora_bias: bias deltas are trained.
        seed: seed of the factors' generator.
        factor_dtype: dtype of the factors (``None``: float32 for half-precision weights, the
            weight's dtype otherwise).
        exact_merge: merge residuals for half-precision weights (``None``: on; float32 and
            float64 weights need none and never get one).
        keep_history: host copies of merged links are kept.
        reset: what a knot does to the factors' optimizer state.
        prune_ratio: fraction zeroed by ``reset="prune"``.
        init: how a new link's A is chosen.
        non_finite: what a knot does with a link that must not be merged.
        trainable: qualified names of modules trained as they are (``trainable_modules``).
        quantized_master: how knots merge into 4-bit weights (see :mod:`chainopt.quantized`).
        parameters: the entries of ``modules`` that are bare parameters
            (``target_parameters``), named ``"<module>.<param>"``.

    Build one with :meth:`from_kwargs` (every check) rather than directly; a chain's is
    ``opt.config``.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> config = ChainConfig.from_kwargs(model, target_modules=["0", "2"], rank=2,
        ...                                  num_links=3, total_steps=30)
        >>> config.modules, config.knots, config.alpha
        (('0', '2'), (10, 20), 16.0)
        >>> ChainConfig.from_dict(config.to_dict()) == config
        True
    """

    modules: tuple[str, ...]
    ranks: tuple[int, ...]
    alpha: float
    knot_every: int | None
    knots: tuple[int, ...]
    lora_bias: bool
    seed: int
    factor_dtype: torch.dtype | None
    exact_merge: bool | None
    keep_history: bool
    reset: ResetPolicy
    prune_ratio: float
    init: InitPolicy
    non_finite: NonFinitePolicy = "raise"
    trainable: tuple[str, ...] = ()
    quantized_master: QuantizedMaster = "host"
    parameters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Refuse a config no construction makes (a hand-built one, or a corrupt save).

        Raises:
            TypeError: a field of the wrong type.
            ValueError: a field's value is out of range.
        """
        for name in ("modules", "trainable", "parameters"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(n, str) for n in value):
                raise TypeError(f"ChainConfig.{name} must be a tuple of str, got {value!r}")
        if not set(self.parameters) <= set(self.modules):
            raise ValueError(
                f"ChainConfig.parameters must be entries of modules, got {self.parameters!r}"
            )
        if not (
            isinstance(self.ranks, tuple)
            and self.ranks
            and all(is_int(r) and r > 0 for r in self.ranks)
        ):
            raise ValueError(
                f"ChainConfig.ranks must be a tuple of positive ints, got {self.ranks!r}"
            )
        alpha = self.alpha
        if not isinstance(alpha, float) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"ChainConfig.alpha must be a positive finite float, got {alpha!r}")
        if self.knot_every is not None and (not is_int(self.knot_every) or self.knot_every <= 0):
            raise ValueError(
                f"ChainConfig.knot_every must be None or a positive int, got {self.knot_every!r}"
            )
        knots = self.knots
        if (
            not isinstance(knots, tuple)
            or not all(is_int(k) and k > 0 for k in knots)
            or any(b <= a for a, b in pairwise(knots))
            or (self.knot_every is not None and knots)
        ):
            raise ValueError(
                "ChainConfig.knots must be a strictly increasing tuple of positive ints (empty "
                f"with knot_every), got {knots!r} with knot_every={self.knot_every!r}"
            )
        for name in ("lora_bias", "keep_history"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ChainConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not (self.exact_merge is None or isinstance(self.exact_merge, bool)):
            raise TypeError(
                f"ChainConfig.exact_merge must be None or a bool, got {self.exact_merge!r}"
            )
        if not is_int(self.seed) or not _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]:
            raise ValueError(f"ChainConfig.seed must be a 64-bit int, got {self.seed!r}")
        if self.factor_dtype is not None and self.factor_dtype not in FACTOR_DTYPES:
            raise TypeError(
                f"ChainConfig.factor_dtype must be None or one of {[str(d) for d in FACTOR_DTYPES]}"
                f", got {self.factor_dtype!r}"
            )
        for name, options in (
            ("reset", ResetPolicy), ("init", InitPolicy), ("non_finite", NonFinitePolicy),
            ("quantized_master", QuantizedMaster),
        ):  # fmt: skip
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in get_args(
                options
            ):
                raise ValueError(
                    f"ChainConfig.{name} must be one of {get_args(options)}, "
                    f"got {getattr(self, name)!r}"
                )
        ratio = self.prune_ratio
        if not isinstance(ratio, float) or not 0 <= ratio < 1:
            raise ValueError(f"ChainConfig.prune_ratio must be a float in [0, 1), got {ratio!r}")

    def link_rank(self, link: int) -> int:
        """Rank of link ``link`` (0-based): ``ranks[link]``, the last entry repeating.

        Raises:
            ValueError: ``link`` is not a non-negative int.
        """
        if not is_int(link) or link < 0:
            raise ValueError(f"link must be a non-negative int (0 is the first link), got {link!r}")
        return self.ranks[min(link, len(self.ranks) - 1)]

    def schedule(self) -> KnotSchedule:
        """The knot schedule."""
        if self.knot_every is not None:
            return KnotSchedule(knot_every=self.knot_every)
        return KnotSchedule.from_steps(self.knots)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists for tuples, ``"torch.float32"`` for a dtype), as saved."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        out["factor_dtype"] = None if self.factor_dtype is None else str(self.factor_dtype)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChainConfig:
        """The inverse of :meth:`to_dict` (fields missing from older saves take defaults).

        Raises:
            ValueError: ``data`` is not a saved config.
        """
        try:
            kw = {f.name: data[f.name] for f in fields(cls) if f.name in data}
            for key in ("modules", "ranks", "knots", "trainable", "parameters"):
                if key in kw:
                    kw[key] = tuple(kw[key])
            dtype = kw.get("factor_dtype")
            kw["factor_dtype"] = (
                None if dtype is None else getattr(torch, str(dtype).split(".")[-1])
            )
            return cls(**kw)
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"not a saved chain config: {data!r:.200}") from err

    def differences(self, saved: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
        """``{key: (saved, current)}`` where a saved config differs from this one.

        ``non_finite`` may change between runs; keys a save lacks (older versions) are skipped,
        but every key versions before 2 saved must be there.
        """
        mine = self.to_dict()
        keys = [k for k in mine if k != "non_finite" and (k in saved or k in _SAVED_BEFORE_V2)]
        return {k: (saved.get(k), mine[k]) for k in keys if saved.get(k) != mine[k]}

    @classmethod
    def from_kwargs(
        cls,
        model: nn.Module,
        *,
        target_modules: ModuleSpec | None = None,
        target_parameters: ModuleSpec | None = None,
        rank: int | Sequence[int] | None = None,
        alpha: float | None = None,
        knot_every: int | None = None,
        knots: Sequence[int] | None = None,
        num_links: int | None = None,
        total_steps: int | None = None,
        steps_per_epoch: int | None = None,
        lora_bias: bool = False,
        trainable_modules: ModuleSpec | None = None,
        seed: int = 0,
        factor_dtype: torch.dtype | None = None,
        exact_merge: bool | None = None,
        keep_history: bool = False,
        non_finite: NonFinitePolicy = "raise",
        reset: ResetPolicy = "full",
        prune_ratio: float = 0.9,
        init: InitPolicy = "kaiming",
        quantized_master: QuantizedMaster = "host",
    ) -> ChainConfig:
        """Check every argument of :class:`~chainopt.ChainLoRAOptimizer` against ``model``.

        Nothing is changed. See :class:`~chainopt.ChainLoRAOptimizer` for the arguments.

        Raises:
            TypeError: an argument of the wrong type, or a matched module that cannot be adapted.
            ValueError: a bad value, no matching module, a model already wrapped (by chainopt,
                DDP or FSDP), a weight shared with another module.
        """
        check_model(model)
        target_modules, target_parameters, trainable_modules = (
            readable_twice(spec) for spec in (target_modules, target_parameters, trainable_modules)
        )
        peft = _peft_choice(
            model, target_modules, trainable_modules, rank, alpha, lora_bias, factor_dtype, init
        )
        if peft is not None:
            if target_parameters is not None:
                raise ValueError(
                    f"target_parameters={describe_spec(target_parameters)!r} on a model that "
                    "holds PEFT LoRA layers: chainopt chains PEFT's own layers there; put the "
                    "parameters in the LoraConfig's target_parameters instead"
                )
            rank, alpha, keep_history = peft.rank, peft.alpha, True
        elif target_modules is None and target_parameters is None:
            raise TypeError(
                "target_modules is required: name the modules to adapt (PEFT-style suffixes such "
                "as ['q_proj', 'v_proj'], a regex, a callable or 'all-linear'), or the bare "
                "parameters with target_parameters (fused experts: ['experts.gate_up_proj']); "
                "it may be omitted only for a model that holds PEFT LoRA layers (a PeftModel), "
                "whose layers are then chained"
            )
        rank = _DEFAULT_RANK if rank is None else rank
        alpha = _DEFAULT_ALPHA if alpha is None else alpha
        ranks = _ranks(rank)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(
                f"alpha must be a positive number, got {alpha!r}{not_python_number(alpha)}"
            )
        if not (isinstance(alpha, float) or alpha < 2**1023) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha!r}")  # (10**400: no float)
        low, high = alpha / max(ranks), alpha / min(ranks)  # the links' scales s = alpha / r
        f32 = torch.finfo(torch.float32)
        if peft is None and not f32.tiny <= low <= high <= f32.max:
            raise ValueError(
                f"alpha={alpha!r} with rank={list(ranks)} gives link scales alpha / r from "
                f"{low:.3g} to {high:.3g}, outside float32's normal range [{f32.tiny:.3g}, "
                f"{f32.max:.3g}] that a link is computed in: a scale that rounds to 0 trains "
                "nothing, an infinite one makes the model's output NaN; give an alpha within "
                "that range times the rank (LoRA's usual alpha is 1 to 4 times the rank)"
            )
        schedule = _schedule(knot_every, knots, num_links, total_steps, steps_per_epoch)
        if schedule.knots is not None and len(ranks) > len(schedule.knots) + 1:
            links = len(schedule.knots) + 1
            which = (
                f"{links} links (knots after steps {list(schedule.knots)}, then the last link "
                "until merge_and_unload)"
                if schedule.knots
                else "1 link (no knot: plain LoRA until merge_and_unload)"
            )
            raise ValueError(
                f"rank={list(ranks)} gives {len(ranks)} link ranks, but the schedule has "
                f"{which}: the ranks after the first {links} would never be used; give at most "
                f"{links}"
            )
        for name, value in (("lora_bias", lora_bias), ("keep_history", keep_history)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if not is_int(seed):
            raise TypeError(f"seed must be an int, got {seed!r}{not_python_number(seed)}")
        if not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1] (a 64-bit seed), got {seed!r}")
        if factor_dtype is not None and factor_dtype not in FACTOR_DTYPES:
            raise TypeError(
                f"factor_dtype must be a floating torch.dtype, None or one of "
                f"{[str(d) for d in FACTOR_DTYPES]}, "
                f"got {factor_dtype!r}"
            )
        if not (exact_merge is None or exact_merge is True or exact_merge is False):
            raise TypeError(f"exact_merge must be None or a bool, got {exact_merge!r}")
        policies: tuple[tuple[str, object, object], ...] = (
            ("non_finite", non_finite, NonFinitePolicy),
            ("reset", reset, ResetPolicy),
            ("init", init, InitPolicy),
            ("quantized_master", quantized_master, QuantizedMaster),
        )
        for arg, choice, options in policies:
            if not isinstance(choice, str) or choice not in get_args(options):
                raise ValueError(f"{arg} must be one of {get_args(options)}, got {choice!r}")
        if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)):
            raise TypeError(
                f"prune_ratio must be a number in [0, 1), got {prune_ratio!r}"
                f"{not_python_number(prune_ratio)}"
            )
        if not 0 <= prune_ratio < 1:
            raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio!r}")
        if init == "gradient" and target_parameters is not None:
            raise ValueError(
                "init='gradient' with target_parameters: a parameter link has no layer output "
                "to take the gradient's singular vectors from; use init='kaiming'"
            )
        trainable = choose_trainable(model, trainable_modules)
        params: list[tuple[str, str, nn.Module]] = []
        if peft is not None:
            targets, kept = peft.layers, tuple(peft.trainable)
        else:
            covered = (
                []
                if target_parameters is None
                else [n for n, *_ in select_parameters(model, target_parameters)]
            )
            targets = (
                []
                if target_modules is None
                else choose_targets(
                    model, target_modules, max(ranks), lora_bias, trainable, covered
                )
            )
            if target_parameters is not None:
                if lora_bias and not targets:
                    raise ValueError(
                        "lora_bias=True but target_parameters adapts no bias (only "
                        "target_modules' layers get bias deltas)"
                    )
                params = choose_parameters(model, target_parameters, max(ranks), targets, trainable)
            kept = ()
        return cls(
            modules=_model_order(model, targets, params),
            ranks=ranks,
            alpha=float(alpha),
            knot_every=schedule.knot_every,
            knots=schedule.knots or (),
            lora_bias=lora_bias,
            seed=seed,
            factor_dtype=factor_dtype,
            exact_merge=exact_merge,
            keep_history=keep_history,
            reset=reset,
            prune_ratio=float(prune_ratio),
            init=init,
            non_finite=non_finite,
            trainable=tuple(dict.fromkeys([*(n for n, _ in trainable), *kept])),
            quantized_master=quantized_master,
            parameters=tuple(n for n, _p, _m in params),
        )


def _model_order(
    model: nn.Module, targets: list[tuple[str, nn.Module]], params: list[tuple[str, str, nn.Module]]
) -> tuple[str, ...]:
    """The record names in model order: each module's own, then its parameters' (in the
    module's parameter order), as :func:`~chainopt._layers.find_adapted` finds them."""
    if not params:
        return tuple(n for n, _ in targets)
    index = {id(m): i for i, (_n, m) in enumerate(model.named_modules())}
    keyed = [((index[id(m)], -1), n) for n, m in targets]
    for n, pname, m in params:
        order = [p for p, _ in m.named_parameters(recurse=False)]
        keyed.append(((index[id(m)], order.index(pname) if pname in order else len(order)), n))
    return tuple(n for _k, n in sorted(keyed, key=lambda kv: kv[0]))


CONFIG_ARGUMENTS: tuple[str, ...] = tuple(
    name for name, p in inspect.signature(ChainConfig.from_kwargs).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY
)  # fmt: skip
"""The keyword arguments of :meth:`ChainConfig.from_kwargs`, which declares them once (names,
types, defaults): ``ChainLoRAOptimizer.__init__`` takes the same (``tests/test_config.py``
checks that they match) and forwards them by these names."""


def check_model(model: object) -> None:
    """Refuse what is not a bare, unwrapped, unsharded, not yet chained ``nn.Module``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type_name(model)}")
    if isinstance(model, PARALLEL_WRAPPERS):
        raise ValueError(
            f"model is already wrapped in {type_name(model)}: wrap the bare model with "
            "ChainLoRAOptimizer first, then wrap it in DistributedDataParallel (the factors must "
            "exist before DDP registers its parameters)"
        )
    fsdp = sys.modules.get("torch.distributed.fsdp")  # imported by whoever sharded the model
    fsdp_types = () if fsdp is None else (fsdp.FullyShardedDataParallel, fsdp.FSDPModule)
    sharded = [n for n, p in model.named_parameters() if is_sharded(p)]
    if sharded or any(isinstance(m, fsdp_types) for m in model.modules()):
        raise ValueError(
            f"model is already sharded (FSDP, DTensor parameters such as {sharded[:2]}): wrap "
            "the bare model with ChainLoRAOptimizer first, then shard it with fully_shard and "
            "call opt.rebind_parameters()"
        )
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            "model was built under deepspeed.zero.Init (its parameters are ZeRO-3 partitions): "
            "build it without zero.Init, wrap it with ChainLoRAOptimizer, then hand both to "
            "chainopt.integrations.deepspeed.initialize (ZeRO-3 partitions it there)"
        )
    wrapped = find_adapted(model)
    if wrapped:
        raise ValueError(
            f"model is already wrapped by a ChainLoRAOptimizer (chainopt links on "
            f"{[r.name for r in wrapped][:4]}; a copy.deepcopy of a wrapped model carries "
            "them too); build one ChainLoRAOptimizer per model. If the code that built it runs "
            "again (Lightning calls configure_optimizers() at every fit, Tuner.lr_find's and "
            "scale_batch_size's included), build the chain once and return that optimizer again. "
            "To train a copy, copy the optimizer: copy.deepcopy(opt) copies its model along "
            "(opt_copy.model); or unload the links first (chainopt.merge_and_unload(model) merges "
            "them) and chain the plain model"
        )


_DEFAULT_RANK, _DEFAULT_ALPHA = 8, 16.0  # rank and alpha when not given (a plain model)


@dataclass(frozen=True)
class _PeftChoice:
    """What a model holding PEFT LoRA layers gives a chain: the layers, and PEFT's rank (of the
    first layer; each layer keeps its own) and alpha (for the config; the scales are PEFT's)."""

    layers: list[tuple[str, nn.Module]]
    rank: int
    alpha: float
    trainable: list[str]


def _peft_choice(
    model: nn.Module,
    target_modules: object,
    trainable_modules: object,
    rank: object,
    alpha: object,
    lora_bias: object,
    factor_dtype: object,
    init: object,
) -> _PeftChoice | None:
    """``None`` for a model without PEFT LoRA layers; else the layers to chain, checked.

    A model holding PEFT's LoRA layers is chained through them (:mod:`chainopt._peft_layers`):
    ``target_modules`` would nest links inside PEFT's ``lora_A``/``lora_B``/``base_layer``,
    and the rank, alpha, factor dtype and the modules trained whole (``modules_to_save``) are
    the ``LoraConfig``'s.
    """
    layers = peft_lora_layers(model)
    if not layers:
        return None
    if target_modules is not None:
        raise ValueError(
            f"target_modules={describe_spec(cast(ModuleSpec, target_modules))!r} on a model that "
            "holds PEFT LoRA "
            f"layers ({len(layers)}, e.g. {layers[0][0]!r}): omit target_modules and chainopt "
            "chains PEFT's own layers of the active adapter (their rank, alpha, dropout and "
            "rsLoRA scaling from the LoraConfig); target_modules would put chainopt links inside "
            "PEFT's lora_A, lora_B and base_layer. To chain other modules, build the chain on "
            "the model without PEFT"
        )
    if trainable_modules is not None:
        raise ValueError(
            f"trainable_modules={describe_spec(cast(ModuleSpec, trainable_modules))!r} on a "
            "model that holds PEFT LoRA layers: PEFT's save_pretrained writes the adapter and what "
            "its LoraConfig trains, not these modules, so the saved adapter would silently lack "
            "their training; name them in LoraConfig(modules_to_save=[...]) instead (PEFT trains "
            "and saves a copy of each; the chain trains it as it is)"
        )
    given = {"rank": rank, "alpha": alpha, "factor_dtype": factor_dtype}
    given = {k: v for k, v in given.items() if v is not None}
    if given or lora_bias is not False or init == "gradient":
        what = given or ({"lora_bias": lora_bias} if lora_bias is not False else {"init": init})
        raise ValueError(
            f"{', '.join(f'{k}={v!r}' for k, v in what.items())} on a model that holds PEFT "
            "LoRA layers: a chain of PEFT's layers takes rank, alpha and the factors' dtype "
            "from the LoraConfig (r, lora_alpha, rank_pattern, alpha_pattern, use_rslora), "
            "has no bias deltas (LoraConfig's lora_bias is not supported either) and starts new "
            "links with init='kaiming'; set them in the LoraConfig or omit them"
        )
    layers = choose_peft_layers(model, _lora_config(model, layers))
    shared, storages = shared_parameters(model), model_storages(model)
    weights = []  # what each layer's knots merge into
    for name, layer in layers:
        link = PeftLink.of(layer)
        weights.append(link.weight)
        full = link.weight_name(name)
        why = sharing_problem(link.weight, full, shared, storages)
        if why is not None:
            raise ValueError(
                f"cannot chain the PEFT LoRA layer {name!r}: the weight a knot merges into "
                f"({full!r}) {why}; leave it out of the LoraConfig's target_modules (tied "
                "embeddings: target the other layers); nothing was changed"
            )
    warn_peft_left_out(model, _lora_config(model, layers), [m for _, m in layers], weights)
    first = cast(Any, layers[0][1])
    adapter = active_adapter(first)
    return _PeftChoice(
        layers, int(first.r[adapter]), float(first.lora_alpha[adapter]), peft_trainable(model)
    )


def _lora_config(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> Any:
    return peft_config_of(model, layers[0][1])


def _ranks(rank: int | Sequence[int]) -> tuple[int, ...]:
    ranks: tuple[object, ...] = (
        (rank,) if not isinstance(rank, Sequence) else tuple(rank) if rank else (None,)
    )
    if isinstance(rank, str) or not all(is_int(r) and r > 0 for r in ranks):  # type: ignore[operator]
        raise ValueError(
            f"rank must be a positive int (or a non-empty list of them, a rank per link), "
            f"got {rank!r}{not_python_number(rank)}"
        )
    checked = tuple(int(r) for r in ranks)  # type: ignore[call-overload]
    if len(set(checked)) > 1 and is_distributed():
        raise ValueError(
            f"rank={list(checked)} changes the factors' shapes at knots, which "
            "DistributedDataParallel's buckets cannot follow; use one rank under DDP"
        )
    return checked


def _schedule(
    knot_every: int | None,
    knots: Sequence[int] | None,
    num_links: int | None,
    total_steps: int | None,
    steps_per_epoch: int | None,
) -> KnotSchedule:
    if num_links is None and total_steps is None:
        if steps_per_epoch is not None:
            raise ValueError(
                "steps_per_epoch goes with num_links and total_steps (it puts their knots on "
                "epoch ends), not with knot_every or knots; got "
                f"steps_per_epoch={steps_per_epoch!r}"
            )
        if knot_every is None and knots is None:
            raise ValueError(
                "give exactly one of knot_every and knots, or num_links with total_steps: a "
                "chain needs a knot schedule, got knot_every=None, knots=None, num_links=None"
            )
        return KnotSchedule(knot_every=knot_every, knots=knots)
    if knot_every is not None or knots is not None:
        raise ValueError(
            "give one schedule: knot_every, knots, or num_links with total_steps; got "
            f"knot_every={knot_every!r}, knots={knots!r}, num_links={num_links!r}"
        )
    if num_links is None or total_steps is None:
        raise ValueError(
            f"num_links and total_steps go together, got num_links={num_links!r}, "
            f"total_steps={total_steps!r}"
        )
    return KnotSchedule.even(num_links, total_steps, steps_per_epoch)
