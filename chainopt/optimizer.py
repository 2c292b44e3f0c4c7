"""``ChainLoRAOptimizer``: COLA as a wrapper around any ``torch.optim.Optimizer``.

The wrapper registers a LoRA link on every chosen ``nn.Linear``, freezes everything else, rewrites
the wrapped optimizer's param groups to the factors, and ties knots inside :meth:`step` on a
schedule: merge ``s·B·A`` into the frozen weight (float32, exact for half-precision weights),
re-initialise the factors in place from a seeded generator it owns, and drop the optimizer state
of the factors so the next link starts fresh.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    >>> base = torch.optim.AdamW(model.parameters(), lr=1e-2)
    >>> opt = ChainLoRAOptimizer(model, base, target_modules=["0", "2"], rank=2, alpha=4,
    ...                          knot_every=5)
    >>> x, y = torch.randn(16, 8), torch.randn(16, 4)
    >>> for _ in range(10):
    ...     nn.functional.mse_loss(model(x), y).backward()
    ...     opt.step()
    ...     opt.zero_grad()
    >>> opt.optimizer_steps, opt.knots_tied
    (10, 2)
    >>> model = opt.merge_and_unload()
    >>> type(model[0]) is nn.Linear
    True
"""

from __future__ import annotations

import math
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeAlias, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from .export import adapted_modules, guard_save_pretrained, merge_and_unload
from .history import ChainHistory, KnotRecord, LinkFactors
from .init import GradientProbe, InitPolicy, a_from_gradient
from .lora import (
    BiasDelta,
    LoRAParametrization,
    attach,
    bias_delta,
    detach,
    full_tensor,
    is_sharded,
    lora_parametrization,
    original,
    parametrization_count,
    reset_links,
    shard_like,
)
from .merge import NonFiniteUpdateError, inspect_links, merge_into_weight, pending_links
from .reset import ResetPolicy, reset_state
from .schedule import KnotSchedule
from .targets import ModuleSpec, describe_spec, select_modules

__all__ = ["ChainConfig", "ChainLoRAOptimizer", "KnotHook", "NonFinitePolicy", "OptimizerSpec"]

OptimizerSpec: TypeAlias = Optimizer | Callable[[list[nn.Parameter]], Optimizer]
"""An optimizer built over the model's parameters, or a factory ``params -> Optimizer``."""

NonFinitePolicy: TypeAlias = Literal["raise", "skip"]
"""At a knot, a link holding NaN/Inf either raises (``"raise"``) or is dropped unmerged with a
warning while the finite links are merged (``"skip"``). No non-finite value reaches a weight."""

KnotHook: TypeAlias = Callable[["ChainLoRAOptimizer", KnotRecord], None]
"""Called after each knot with the optimizer and the knot's :class:`~chainopt.KnotRecord`."""

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ChainConfig:
    """What a chain was built with; saved in the optimizer state and checked on load."""

    modules: tuple[str, ...]
    ranks: tuple[int, ...]
    alpha: float
    knot_every: int | None
    knots: tuple[int, ...]
    lora_bias: bool
    seed: int
    factor_dtype: str | None
    exact_merge: bool | None
    keep_history: bool
    reset: str
    prune_ratio: float
    init: str

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists for tuples), as stored in ``state_dict()``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    wrappers: tuple[type, ...] = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    if isinstance(model, wrappers):
        raise ValueError(
            f"model is already wrapped in {type(model).__name__}: wrap the bare model with "
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
    wrapped = adapted_modules(model)
    if wrapped:
        raise ValueError(
            f"model is already wrapped by a ChainLoRAOptimizer (chainopt links on "
            f"{[n for n, _ in wrapped][:4]}); build one ChainLoRAOptimizer per model"
        )


def _check_ranks(rank: int | Sequence[int]) -> tuple[int, ...]:
    ranks: tuple[object, ...] = (
        (rank,) if not isinstance(rank, Sequence) else tuple(rank) if rank else (None,)
    )
    if not all(_is_int(r) and r > 0 for r in ranks):  # type: ignore[operator]
        raise ValueError(
            f"rank must be a positive int (or a non-empty list of them, a rank per link), "
            f"got {rank!r}"
        )
    checked = tuple(int(r) for r in ranks)  # type: ignore[call-overload]
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if len(set(checked)) > 1 and distributed:
        raise ValueError(
            f"rank={list(checked)} changes the factors' shapes at knots, which "
            "DistributedDataParallel's buckets cannot follow; use one rank under DDP"
        )
    return checked


def _check_schedule(
    knot_every: int | None,
    knots: Sequence[int] | None,
    num_links: int | None,
    total_steps: int | None,
    steps_per_epoch: int | None,
) -> KnotSchedule:
    if num_links is None and total_steps is None:
        if steps_per_epoch is not None:
            raise ValueError("steps_per_epoch goes with num_links and total_steps")
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


def _check_targets(
    model: nn.Module, spec: ModuleSpec, rank: int, lora_bias: bool
) -> list[tuple[str, nn.Linear]]:
    found = select_modules(model, spec, "target_modules")
    if not found:
        raise ValueError(f"target_modules={describe_spec(spec)!r} matches no module of the model")
    targets: list[tuple[str, nn.Linear]] = []
    for name, module in found:
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"target_modules={describe_spec(spec)!r} matches {name!r}, a "
                f"{type(module).__name__}; only torch.nn.Linear modules can be adapted"
            )
        if parametrization_count(module) or parametrization_count(module, "bias"):
            raise ValueError(
                f"target_modules matches {name!r}, whose weight or bias is already parametrized; "
                "chainopt's link must be registered first"
            )
        limit = min(module.in_features, module.out_features)
        if rank > limit:
            raise ValueError(
                f"rank must be a positive int no larger than min(in_features, out_features)="
                f"{limit} of {name!r}, got {rank}"
            )
        targets.append((name, module))
    if lora_bias and all(m.bias is None for _, m in targets):
        raise ValueError("lora_bias=True but none of the target modules has a bias")
    return targets


def _check_optimizer(optimizer: object, model: nn.Module) -> None:
    if isinstance(optimizer, Optimizer):
        if isinstance(optimizer, ChainLoRAOptimizer):
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
            f"callable params -> Optimizer, got {type(optimizer).__name__}"
        )


def _residual_dtype(weight: torch.dtype, exact_merge: bool | None) -> torch.dtype | None:
    if exact_merge is False:
        return None
    if weight == torch.bfloat16:
        return torch.bfloat16  # same exponent range as float32: enough for what rounding drops
    if weight == torch.float16:
        return torch.float32  # a float16 residual would be subnormal
    return weight if exact_merge else None


class ChainLoRAOptimizer(Optimizer):
    """Chain of LoRA (COLA) around an existing optimizer.

    It is a ``torch.optim.Optimizer`` sharing ``param_groups``, ``state`` and ``defaults`` with
    the optimizer it wraps, so LR schedulers, ``GradScaler``, Accelerate and the HF ``Trainer``
    take it as they take any optimizer. A training loop only calls ``backward()``, ``step()`` and
    ``zero_grad()``.

    Args:
        model: the model to adapt (not yet wrapped in DistributedDataParallel).
        optimizer: an optimizer built over ``model.parameters()``, or a callable
            ``params -> Optimizer``. An instance's param groups are rewritten: adapted weights and
            other frozen parameters leave, each module's factors join the group that held its
            weight (the first group if none did), hyperparameters are kept.
        target_modules: which ``nn.Linear`` modules to adapt: PEFT-style name suffixes
            (``"q_proj"``), a compiled regex (full match on the qualified name) or a callable
            ``(name, module) -> bool``.
        rank: rank ``r`` of each link, or a list: link ``i`` has rank ``rank[i]`` and the last
            entry repeats (rank step-down, e.g. ``[8, 4]``; not under DDP).
        alpha: LoRA alpha; the scale of a link of rank ``r`` is ``s = alpha / r``.
        knot_every: tie a knot after optimizer steps N, 2N, … Give one schedule: this,
            ``knots``, or ``num_links`` with ``total_steps``.
        knots: tie a knot after these optimizer step counts.
        num_links: split ``total_steps`` into this many links of equal length (``num_links - 1``
            knots; ``merge_and_unload`` merges the last link).
        total_steps: optimizer steps of the whole run, with ``num_links``.
        steps_per_epoch: with ``num_links``: put knots on epoch ends.
        lora_bias: also train a delta on each adapted module's bias (modules with a bias only).
        trainable_modules: modules whose parameters stay trainable as they are (a classification
            head, say), in the same forms as ``target_modules``.
        seed: seed of the generator the factors are drawn from; the same seed gives the same
            factors in every process (DDP ranks stay identical).
        factor_dtype: dtype of the factors; ``None`` is float32 for half-precision weights and
            the weight's dtype otherwise.
        exact_merge: keep a merge residual so knots are exact in the weight's precision;
            ``None`` turns it on for bfloat16/float16 weights (one residual element per weight
            element: bfloat16 for bfloat16 weights, float32 for float16 ones).
        keep_history: keep float32 copies of every merged link in host memory
            (``opt.history``), so the chain can be exported exactly as one adapter from the
            optimizer alone; costs one link's factors of CPU memory per knot, none on an
            accelerator. Off by default (PEFT's memory); without it
            :func:`~chainopt.export_peft_adapter` takes the original base model instead. Update
            norms are recorded either way.
        non_finite: what a knot does with a link holding NaN/Inf: ``"raise"`` (default) raises
            :class:`~chainopt.NonFiniteUpdateError` and changes nothing; ``"skip"`` merges the
            finite links, drops the others unmerged and warns.
        reset: the factors' optimizer state at a knot: ``"full"`` (drop it, the default),
            ``"none"`` (keep it) or ``"prune"`` (zero the smallest ``prune_ratio`` of every
            moment, ReLoRA-style). See :mod:`chainopt.reset`.
        prune_ratio: fraction zeroed by ``reset="prune"``, in ``[0, 1)``.
        init: A of a new link: ``"kaiming"`` (default) or ``"gradient"`` (top singular vectors
            of the weight's gradient on the step before the knot; see :mod:`chainopt.init`).

    Raises:
        TypeError: a wrong type for ``model``, ``optimizer``, ``target_modules`` or a matched
            module that is not ``nn.Linear``.
        ValueError: no matching module, a bad ``rank``/``alpha``/schedule, a foreign parameter in
            the optimizer, a model already wrapped (by chainopt or DDP). Nothing is changed.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerSpec,
        *,
        target_modules: ModuleSpec,
        rank: int | Sequence[int] = 8,
        alpha: float = 16.0,
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
    ) -> None:
        # --- validate everything before touching the model or the optimizer ---
        _check_model(model)
        ranks = _check_ranks(rank)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {alpha!r}")
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha!r}")
        schedule = _check_schedule(knot_every, knots, num_links, total_steps, steps_per_epoch)
        if not _is_int(seed):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if factor_dtype is not None and not (
            isinstance(factor_dtype, torch.dtype) and factor_dtype.is_floating_point
        ):
            raise TypeError(f"factor_dtype must be a floating torch.dtype, got {factor_dtype!r}")
        if exact_merge not in (None, True, False):
            raise TypeError(f"exact_merge must be None or a bool, got {exact_merge!r}")
        if not isinstance(keep_history, bool):
            raise TypeError(f"keep_history must be a bool, got {keep_history!r}")
        for arg, value, options in (
            ("non_finite", non_finite, NonFinitePolicy),
            ("reset", reset, ResetPolicy),
            ("init", init, InitPolicy),
        ):
            if value not in get_args(options):
                raise ValueError(f"{arg} must be one of {get_args(options)}, got {value!r}")
        if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)):
            raise TypeError(f"prune_ratio must be a number in [0, 1), got {prune_ratio!r}")
        if not 0 <= prune_ratio < 1:
            raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio!r}")
        targets = _check_targets(model, target_modules, max(ranks), lora_bias)
        target_ids = {id(m) for _, m in targets}
        keep: list[nn.Parameter] = []
        if trainable_modules is not None:
            extra = select_modules(model, trainable_modules, "trainable_modules")
            if not extra:
                raise ValueError(
                    f"trainable_modules={describe_spec(trainable_modules)!r} matches no module"
                )
            for name, module in extra:
                if id(module) in target_ids:
                    raise ValueError(f"{name!r} is in both target_modules and trainable_modules")
                keep.extend(p for p in module.parameters() if all(p is not k for k in keep))
        _check_optimizer(optimizer, model)

        self.model = model
        self.config = ChainConfig(
            modules=tuple(n for n, _ in targets),
            ranks=ranks,
            alpha=float(alpha),
            knot_every=schedule.knot_every,
            knots=schedule.knots or (),
            lora_bias=lora_bias,
            seed=seed,
            factor_dtype=None if factor_dtype is None else str(factor_dtype),
            exact_merge=exact_merge,
            keep_history=keep_history,
            reset=reset,
            prune_ratio=float(prune_ratio),
            init=init,
        )
        self.schedule = schedule
        self.reset: ResetPolicy = reset
        self.init: InitPolicy = init
        self.non_finite: NonFinitePolicy = non_finite
        self.history = ChainHistory(keep_factors=keep_history)
        self._knot_hooks: dict[int, KnotHook] = OrderedDict()
        self.optimizer_steps = 0
        self.knots_tied = 0
        self._generator = torch.Generator().manual_seed(seed)
        self._adapted: list[tuple[str, nn.Module]] = []
        self._base: Optimizer

        # --- mutate: register links, freeze, build or regroup the optimizer; undo on failure ---
        requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        try:
            for name, module in targets:
                weight_dtype = module.weight.dtype
                fdt = factor_dtype or (torch.float32 if weight_dtype in _HALF else weight_dtype)
                attach(
                    module,
                    ranks[0],
                    float(alpha),
                    bias=lora_bias and module.bias is not None,
                    factor_dtype=fdt,
                    residual_dtype=_residual_dtype(weight_dtype, exact_merge),
                    generator=self._generator,
                )
                self._adapted.append((name, module))
            trainable = {id(p) for p in self.factors()} | {id(p) for p in keep}
            for p in model.parameters():
                p.requires_grad_(id(p) in trainable)
            if isinstance(optimizer, Optimizer):
                self._base = optimizer
                self._regroup(keep)
            else:
                built = optimizer([*self.factors(), *keep])
                if not isinstance(built, Optimizer):
                    raise TypeError(
                        f"optimizer factory must return a torch.optim.Optimizer, got "
                        f"{type(built).__name__}"
                    )
                self._base = built
        except BaseException:
            for _name, module in self._adapted:
                detach(module)
            for p, flag in requires_grad:
                p.requires_grad_(flag)
            raise
        # State an optimizer builds at construction (Adagrad) is restored by a full reset.
        self._fresh_state = {
            p: {
                **{k: v.clone() if isinstance(v, Tensor) else v for k, v in self.state[p].items()},
                "__shape__": p.shape,
            }
            for p in self.factors()
            if p in self.state
        }
        self._probe = GradientProbe(self._adapted) if init == "gradient" else None
        self._arm_probe()
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        self._init_optimizer_hooks()
        guard_save_pretrained(model)  # a plain save_pretrained of a chained HF model warns

    # --- Optimizer plumbing: share the wrapped optimizer's groups, state and defaults ---
    def _init_optimizer_hooks(self) -> None:
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    @property
    def optimizer(self) -> Optimizer:
        """The wrapped optimizer."""
        return self._base

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._base.param_groups = value

    @property
    def state(self) -> Any:
        return self._base.state

    @state.setter
    def state(self, value: Any) -> None:
        self._base.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self._base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._base.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (its parameters are not chained)."""
        self._base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients through the wrapped optimizer."""
        self._base.zero_grad(set_to_none)

    def _regroup(self, keep: Iterable[nn.Parameter]) -> None:
        base = self._base
        kept = {id(p) for p in keep}
        home: dict[int, int] = {}
        for i, group in enumerate(base.param_groups):
            for p in group["params"]:
                home.setdefault(id(p), i)
        joins: list[list[nn.Parameter]] = [[] for _ in base.param_groups]
        for _name, module in self._adapted:
            joins[home.get(id(original(module)), 0)].extend(_factors_of(module))
        for group, extra in zip(base.param_groups, joins, strict=True):
            staying = [p for p in group["params"] if id(p) in kept]
            for p in group["params"]:
                if id(p) not in kept:
                    base.state.pop(p, None)
            group["params"] = staying + extra

    # --- the chain ---
    def factors(self) -> list[nn.Parameter]:
        """Every trainable chain parameter (A, B and bias deltas), in module order."""
        return [p for _name, module in self._adapted for p in _factors_of(module)]

    def adapted_modules(self) -> list[tuple[str, nn.Module]]:
        """``(qualified_name, module)`` of the adapted modules, in model order."""
        return list(self._adapted)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step of the wrapped optimizer; then a knot if the schedule says one is due.

        Raises:
            NonFiniteUpdateError: a knot is due and a factor holds NaN/Inf (no weight changed).
        """
        if not self._adapted:
            raise RuntimeError("merge_and_unload() was called: this optimizer has no chain left")
        if closure is None:
            loss = self._base.step()
        else:
            with torch.enable_grad():
                loss = self._base.step(closure)
        self.optimizer_steps += 1
        if self.schedule.is_due(self.optimizer_steps):
            self.tie_knot()
        self._arm_probe()
        return loss

    @torch.no_grad()
    def tie_knot(self) -> KnotRecord:
        """Tie a knot now: merge ``s·B·A`` into each weight, start new links, reset their state.

        Returns:
            The knot's record (also appended to :attr:`history`).

        Raises:
            NonFiniteUpdateError: a factor holds NaN/Inf and ``non_finite="raise"``; no weight,
                factor or state was changed.
        """
        # Whole factors (gathered when FSDP2 shards them): the same record on every rank.
        links = pending_links(self._adapted)
        bad, norms = inspect_links(links)
        where = f"knot {self.knots_tied + 1} (optimizer step {self.optimizer_steps})"
        if bad and self.non_finite == "raise":
            raise NonFiniteUpdateError(
                f"non-finite LoRA factors in {bad} at {where}; refusing to merge them: "
                "no weight was changed"
            )
        if bad:
            warnings.warn(
                f"non-finite LoRA factors in {bad} at {where}: dropped those links unmerged",
                RuntimeWarning,
                stacklevel=2,
            )
        good = [(n, m) for n, m in self._adapted if n not in bad]
        record = self.history.append(
            self.optimizer_steps,
            {n: links[n] for n, _m in good},
            {n: norms[n] for n, _m in good},
            tuple(bad),
        )
        for _name, module in good:
            merge_into_weight(module)
        self._new_links()
        self.knots_tied += 1
        for hook in list(self._knot_hooks.values()):
            hook(self, record)
        return record

    def rebind_parameters(self) -> None:
        """Point the wrapped optimizer at the model's current Parameter objects, by name.

        FSDP2's ``fully_shard`` replaces the Parameters of the modules it shards by new, sharded
        ones (``DTensor``). Wrap first, shard, then call this once, before the first step::

            opt = ChainLoRAOptimizer(model, torch.optim.AdamW(model.parameters()), ...)
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
            opt.rebind_parameters()

        Merge residuals (half-precision weights) are sharded like their weights. Knots then
        gather each weight, its residual and its factors, merge them whole and write back each
        rank's shard, so every rank holds the same chain.

        Raises:
            RuntimeError: a parameter the optimizer holds left the model, or was replaced after
                it got optimizer state (shard before training). Nothing is changed then.
        """
        current = dict(self.model.named_parameters())
        moves: list[tuple[list[Any], int, Tensor]] = []
        for group in self._base.param_groups:
            for i, p in enumerate(group["params"]):
                new = current.get(self._param_names.get(id(p), ""))
                if new is None:
                    raise RuntimeError(
                        f"a parameter of shape {tuple(p.shape)} held by the optimizer is no "
                        "longer in the model"
                    )
                if new is not p and p in self._base.state:
                    raise RuntimeError(
                        f"parameter {self._param_names[id(p)]!r} was replaced after it got "
                        "optimizer state: shard the model before the first step"
                    )
                if new is not p:
                    moves.append((group["params"], i, new))
        for params, i, replacement in moves:
            params[i] = replacement
        self._param_names = {id(p): n for n, p in current.items()}
        for _name, module in self._adapted:  # FSDP2 leaves buffers whole: shard the residuals
            parts: list[tuple[LoRAParametrization | BiasDelta, Tensor]] = [
                (_link(module), original(module))
            ]
            delta = bias_delta(module)
            if delta is not None:
                parts.append((delta, original(module, "bias")))
            for part, target in parts:
                residual = part.merge_residual
                if residual is not None and is_sharded(target) and not is_sharded(residual):
                    part.merge_residual = shard_like(residual, target)

    def register_knot_hook(self, hook: KnotHook) -> RemovableHandle:
        """Call ``hook(optimizer, record)`` after every knot; ``handle.remove()`` stops it.

        Example:
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(4, 4))
            >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
            ...                          target_modules=["0"], rank=2, knot_every=1)
            >>> seen = []
            >>> handle = opt.register_knot_hook(lambda o, r: seen.append(r.step))
            >>> _ = opt.tie_knot()
            >>> seen
            [0]
        """
        handle = RemovableHandle(self._knot_hooks)
        self._knot_hooks[handle.id] = hook
        return handle

    def link_rank(self, link: int) -> int:
        """Rank of link ``link`` (0-based): ``rank[link]``, the last entry repeating."""
        ranks = self.config.ranks
        return ranks[min(link, len(ranks) - 1)]

    def _arm_probe(self) -> None:
        # Gradients for init="gradient" are gathered on the step just before a knot.
        if self._probe is not None:
            self._probe.armed = self.schedule.is_due(self.optimizer_steps + 1)

    def _new_links(self) -> None:
        """Start the next link of every module in place and reset its factors' state."""
        rank = self.link_rank(self.knots_tied + 1)
        gradients = self._probe.take() if self._probe is not None else {}
        links = [_link(module) for _name, module in self._adapted]
        for link in links:
            link.resize_(rank)
        reset_links(
            links,
            self._generator,
            [
                a_from_gradient(gradients[name], rank) if name in gradients else None
                for name, _module in self._adapted
            ],
        )
        for _name, module in self._adapted:
            if (delta := bias_delta(module)) is not None:
                delta.reset_parameters()
        reset_state(
            self._base.state, self.factors(), self.reset, self.config.prune_ratio, self._fresh_state
        )

    def chain_summary(self) -> dict[str, Any]:
        """The chain so far: links, ranks, knot steps, update norms, effective ranks.

        ``effective_rank`` per module is the rank of ``Σ sᵢ·Bᵢ·Aᵢ`` over the merged links and the
        pending one (``None`` with ``keep_history=False``).

        Example:
            >>> from torch import nn
            >>> model = nn.Sequential(nn.Linear(6, 6))
            >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
            ...                          target_modules=["0"], rank=[2, 1], knot_every=1)
            >>> _ = opt.tie_knot()
            >>> s = opt.chain_summary()
            >>> s["links"], s["ranks"], s["knot_steps"]
            (2, [2, 1], [0])
        """
        knots = self.history.knots
        modules: dict[str, dict[str, Any]] = {}
        for name, module in self._adapted:
            link = _link(module)
            pending = LinkFactors(
                full_tensor(link.lora_A.detach()).float(),
                full_tensor(link.lora_B.detach()).float(),
                link.scale,
            )
            effective = (
                self.history.effective_rank(name, pending) if self.history.keep_factors else None
            )
            modules[name] = {
                "update_norms": [k.norms.get(name) for k in knots],
                "effective_rank": effective,
            }
        return {
            "links": self.knots_tied + 1,
            "steps": self.optimizer_steps,
            "ranks": [self.link_rank(i) for i in range(self.knots_tied + 1)],
            "knot_steps": [k.step for k in knots],
            "modules": modules,
        }

    def merge_and_unload(self) -> nn.Module:
        """Merge what is pending, remove the links, and return the model with plain Linears.

        The adapted modules keep their weight Parameter objects. The factors leave the wrapped
        optimizer; this optimizer cannot step afterwards. Frozen parameters stay frozen.

        Raises:
            NonFiniteUpdateError: a factor holds NaN/Inf; nothing was changed.
        """
        factors = {id(p) for p in self.factors()}
        merge_and_unload(self.model)
        for group in self._base.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in factors]
        for p in list(self._base.state):
            if id(p) in factors:
                del self._base.state[p]
        self._adapted = []
        if self._probe is not None:
            self._probe.remove()
            self._probe = None
        return self.model

    # --- checkpointing ---
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"chainopt"`` entry.

        The entry holds the config, the step and knot counters and the generator state; with
        ``model.state_dict()`` it resumes training bitwise (on CPU).
        """
        sd = self._base.state_dict()
        sd["chainopt"] = {
            "version": 1,
            "config": self.config.to_dict(),
            "optimizer_steps": self.optimizer_steps,
            "knots_tied": self.knots_tied,
            "generator": self._generator.get_state(),
            "history": self.history.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved (load ``model.state_dict()`` too).

        Raises:
            ValueError: no ``"chainopt"`` entry, or one saved with a different config; nothing is
                loaded then.
        """
        chain = state_dict.get("chainopt")
        if not isinstance(chain, dict):
            raise ValueError(
                "state_dict has no 'chainopt' entry: it was not saved by "
                "ChainLoRAOptimizer.state_dict()"
            )
        mine = self.config.to_dict()
        saved = chain.get("config", {})
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            raise ValueError(
                "state_dict was saved with a different chain config (saved, current): "
                + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
            )
        base = {k: v for k, v in state_dict.items() if k != "chainopt"}
        self._base.load_state_dict(base)
        self.optimizer_steps = int(chain["optimizer_steps"])
        self.knots_tied = int(chain["knots_tied"])
        self._generator.set_state(chain["generator"].cpu())
        self.history.load_state_dict(chain["history"])
        self._arm_probe()

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ChainLoRAOptimizer({type(self._base).__name__}, modules={len(self._adapted)}, "
            f"rank={list(c.ranks)}, alpha={c.alpha:g}, {self.schedule!r}, "
            f"steps={self.optimizer_steps}, knots_tied={self.knots_tied})"
        )


def _link(module: nn.Module) -> LoRAParametrization:
    link = lora_parametrization(module)
    if link is None:  # pragma: no cover - the optimizer only tracks adapted modules
        raise RuntimeError("module lost its chainopt link")
    return link


def _factors_of(module: nn.Module) -> list[nn.Parameter]:
    link = _link(module)
    delta = bias_delta(module)
    return [link.lora_A, link.lora_B] + ([delta.delta] if delta is not None else [])
