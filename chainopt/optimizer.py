"""``ChainLoRAOptimizer``: COLA as a wrapper around any ``torch.optim.Optimizer``.

The constructor checks its arguments into a :class:`~chainopt.ChainConfig` and builds the chain
(:func:`chainopt._build.build_chain`: a LoRA link on every chosen module, everything else frozen,
the wrapped optimizer's param groups rewritten to the factors); the optimizer holds that
:class:`~chainopt.knot.Chain` as ``self.chain`` and ties a knot (:mod:`chainopt.knot`) inside
:meth:`~ChainLoRAOptimizer.step` when the schedule says so.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer
    >>> _ = torch.manual_seed(0)
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

import copy
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter
from typing import Any, TypeAlias

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ._build import Undo, build_chain, drop_params, rebind
from ._liveness import TrainingWatch, own_factor_steps
from ._load_guard import state_restored
from ._marks import merged_save_pending
from ._peft_layers import PeftLink
from ._peft_save import AWAITING, ChainSave, install_whole_chain_save, warn_no_adapter_save
from ._saved_state import chain_entry, check_saved_state, restore
from ._schedule_free import KnotContext
from ._state_probe import is_state_probe
from ._validate import type_name
from ._wrapper import WrappedOptimizer, own_instance_patches
from .advice import DtypeWatch
from .config import CONFIG_ARGUMENTS, ChainConfig, NonFinitePolicy
from .export import chain_tensors, unload_merged
from .history import ChainHistory, KnotRecord
from .init import InitPolicy
from .knot import tie_knot
from .merge import require_mergeable
from .quantized import QuantizedMaster
from .reset import ResetPolicy
from .summary import ChainSummary, summarize
from .targets import ModuleSpec

__all__ = ["ChainLoRAOptimizer", "KnotHook", "OptimizerSpec"]

OptimizerSpec: TypeAlias = Optimizer | Callable[[list[nn.Parameter]], Optimizer]
"""An optimizer built over the model's parameters, or a factory ``params -> Optimizer``."""

KnotHook: TypeAlias = Callable[["ChainLoRAOptimizer", KnotRecord], None]
"""Called after each knot with the optimizer and the knot's :class:`~chainopt.KnotRecord`."""

_STATE_VERSION = 2
_requires_grad = attrgetter("requires_grad")


class ChainLoRAOptimizer(WrappedOptimizer):
    """Chain of LoRA (COLA) around an existing optimizer.

    It is a ``torch.optim.Optimizer`` sharing ``param_groups``, ``state`` and ``defaults`` with
    the optimizer it wraps, so LR schedulers, ``GradScaler``, Accelerate and the HF ``Trainer``
    take it as they take any optimizer. A training loop only calls ``backward()``, ``step()`` and
    ``zero_grad()``.

    Args:
        model: the model to adapt (not yet wrapped in DistributedDataParallel).
        optimizer: an optimizer built over ``model.parameters()``, or a callable
            ``params -> Optimizer``. An instance's param groups are rewritten: adapted weights and
            other frozen parameters leave, each module's A and B join the group that held its
            weight (the first group if none did) and its bias delta (``lora_bias``) the group
            that held its bias (else the weight's), the parameters of ``trainable_modules`` stay
            in their groups (or join the first group if the optimizer did not hold them), and
            hyperparameters are kept. A factory is called once with the factors and the
            ``trainable_modules`` parameters.
        target_modules: which ``nn.Linear`` (or transformers ``Conv1D``) modules to adapt:
            PEFT-style name suffixes (``"q_proj"``; a list, set or any iterable of them, each
            matching at least one module; a str is a suffix, not a regex), a
            compiled regex (full match on the qualified name), a callable
            ``(name, module) -> bool``, or ``"all-linear"`` (every Linear but the output
            layer and a task model's fresh head, as PEFT takes them). Omit it for a model that holds
            PEFT LoRA layers (a ``PeftModel``): the chain then trains PEFT's own layers of the
            active adapter, with their rank, alpha, dropout and rsLoRA scaling, and
            ``peft_model.save_pretrained`` writes the whole chain as one adapter (see
            :mod:`chainopt._peft_layers`); required otherwise, unless ``target_parameters``
            is given. Entries may repeat or overlap: each module is adapted once, and a module
            the model holds at two places (``nn.Sequential(lin, act, lin)``) once, under its
            first name (``model.named_modules()``'s), whichever name matched it.
        target_parameters: bare 2-D or 3-D parameters to adapt, as PEFT's option of that
            name: fused mixture-of-experts weights (transformers 5's Mixtral, Qwen3-MoE, OLMoE,
            GPT-OSS: ``["experts.gate_up_proj", "experts.down_proj"]``) and routers kept as a
            bare ``weight`` (``"mlp.gate.weight"``). Suffixes of qualified parameter names (a
            list, set or iterable of them), a compiled regex or a callable
            ``(name, parameter) -> bool``. A 3-D parameter ``(E, out, in)`` (``(E, in, out)``
            when its module has ``is_transposed = True``) gets a rank-``r`` link per expert in
            PEFT's layout and knots merge each expert exactly; its module's forward computes
            ``W + Δ`` once per call. With or without ``target_modules``; not on a module that
            also adapts, and not with ``init="gradient"``. The records are named
            ``"<module>.<param>"`` (see :mod:`chainopt._experts`).
        rank: rank ``r`` of each link (default 8), or a list: link ``i`` has rank ``rank[i]``
            and the last entry repeats (rank step-down, e.g. ``[8, 4]``; not under DDP), with
            no more entries than a ``knots`` or ``num_links`` schedule has links. Not with PEFT
            layers (the ``LoraConfig``'s).
        alpha: LoRA alpha (default 16); the scale of a link of rank ``r`` is
            ``s = alpha / r``, which must be a normal float32 (a scale that rounds to 0 trains
            nothing, an infinite one makes the output NaN). Not with PEFT layers.
        knot_every: tie a knot after optimizer steps N, 2N, … Give one schedule: this,
            ``knots``, or ``num_links`` with ``total_steps``.
        knots: tie a knot after these optimizer step counts.
        num_links: split ``total_steps`` into this many links of equal length (``num_links - 1``
            knots; ``merge_and_unload`` merges the last link).
        total_steps: optimizer steps of the whole run, with ``num_links``.
        steps_per_epoch: with ``num_links``: put knots on epoch ends.
        lora_bias: also train a delta on each adapted module's bias (modules with a bias only).
        trainable_modules: modules whose parameters stay trainable as they are (a classification
            head, say), in the same forms as ``target_modules``. Not with PEFT layers (the
            ``LoraConfig``'s ``modules_to_save``, which PEFT's save writes).
        seed: seed of the generator the factors are drawn from; the same seed gives the same
            factors in every process (DDP ranks stay identical).
        factor_dtype: dtype of the factors; ``None`` is float32 for half-precision weights and
            the weight's dtype otherwise.
        exact_merge: keep a merge residual so knots are exact in the weight's precision;
            ``None`` turns it on for bfloat16/float16 weights (one residual element per weight
            element: bfloat16 for bfloat16 weights, float32 for float16 ones). float32 and
            float64 weights never get one: their knot is already one rounding.
        keep_history: keep float32 copies of every merged link in host memory
            (``opt.history``), so the chain can be exported exactly as one adapter from the
            optimizer alone; costs one link's factors of CPU memory per knot, none on an
            accelerator. Off by default (PEFT's memory; always on for a chain of PEFT layers,
            whose ``save_pretrained`` writes every link); without it
            :func:`~chainopt.export_peft_adapter` takes the original base model instead. Update
            norms are recorded either way.
        non_finite: what a knot does with a link that must not be merged (NaN/Inf, or an
            overflow of the weight's dtype): ``"raise"`` (default) raises
            :class:`~chainopt.NonFiniteUpdateError` and changes nothing; ``"skip"`` merges the
            others, drops those links unmerged (with their optimizer state) and warns.
        reset: the factors' optimizer state at a knot: ``"full"`` (drop it, the default),
            ``"none"`` (keep it), ``"prune"`` (restart the smallest ``prune_ratio`` of every
            moment, ReLoRA-style) or ``"moments"`` (restart the moments, keep step counters);
            to restart is to set where the optimizer starts that state: zero for Adam's
            moments, ``lr`` for Rprop's step sizes. See :mod:`chainopt.reset`.
        prune_ratio: fraction zeroed by ``reset="prune"``, in ``[0, 1)``.
        init: A of a new link: ``"kaiming"`` (default) or ``"gradient"`` (top singular vectors
            of the weight's gradient on the step before the knot; see :mod:`chainopt.init`).
        quantized_master: for 4-bit targets (bitsandbytes ``Linear4bit``, torchao NF4):
            ``"host"`` (default) keeps a float32 master of each weight in host memory so that
            knots are exact (the 4-bit weight is ``quantize(M₀ + Σ sᵢ·Bᵢ·Aᵢ)``, rounded once);
            ``"none"`` dequantizes, adds and requantizes in place (no host memory; the
            quantization error compounds at every knot). See :mod:`chainopt.quantized`.
        master_weights: the original float weights of 4-bit targets (the unquantized model or
            its plain-key state dict) to start the masters from; default: the dequantized
            weights. Refused without a 4-bit target and with ``quantized_master="none"``.

    Raises:
        TypeError: a wrong type for an argument, or a matched module that cannot be adapted.
        ValueError: no matching module, a bad value, a foreign parameter in the optimizer, a
            model already wrapped (by chainopt, DDP or FSDP), a tied weight. Nothing is changed:
            model and optimizer are as they were (parameters, ``requires_grad``, hooks,
            attributes, param groups and state), whatever raised.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> base = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> opt = ChainLoRAOptimizer(model, base, target_modules=["0"], rank=4, alpha=8,
        ...                          knot_every=100)
        >>> opt  # doctest: +ELLIPSIS
        ChainLoRAOptimizer(AdamW, modules=1, rank=[4], alpha=8, KnotSchedule(knot_every=100), ...)
        >>> [tuple(p.shape) for p in opt.param_groups[0]["params"]]  # only the factors train
        [(4, 8), (8, 4)]
        >>> ChainLoRAOptimizer(nn.Sequential(nn.Linear(8, 8)), torch.optim.SGD, knot_every=5,
        ...                    target_modules=["0", "q_proj"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: target_modules entry 'q_proj' matches no module of the model ...: remove it
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerSpec,
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
        master_weights: nn.Module | Mapping[str, Tensor] | None = None,
    ) -> None:
        arguments = locals()  # forwarded by the names ChainConfig.from_kwargs declares
        config = ChainConfig.from_kwargs(model, **{k: arguments[k] for k in CONFIG_ARGUMENTS})
        self.model = model
        self.config = config
        self.schedule = config.schedule()
        self.optimizer_steps = 0
        self._knot_hooks: dict[int, KnotHook] = OrderedDict()
        undo = Undo(model, optimizer)  # whatever raises from here on leaves both as they were
        try:
            self.chain = build_chain(model, optimizer, config, master_weights, undo)
            self._watch = TrainingWatch(self._link_factors)  # bound: a deep copy watches its own
            peft = self._peft_links()
            if peft:  # the model's own adapter save writes the whole chain
                save = ChainSave(peft[0][1].adapter, self.chain.history, self.load_state_dict)
                if not install_whole_chain_save(model, save):
                    warn_no_adapter_save(model)
            self._arm()
            self._dtypes = DtypeWatch(self.chain.records)
            self._param_names = {id(p): n for n, p in model.named_parameters()}
            self._stepping = False  # inside step(): the wrapped optimizer may step others
            self._uncounted = False  # the wrapped optimizer stepped outside step(), uncounted
            super().__init__(self.chain.optimizer)
        except BaseException:
            undo()
            raise
        own_factor_steps(self)  # another optimizer stepping the factors would tie no knot

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients through the wrapped optimizer.

        A knot that raised half-way is finished first, before new gradients are computed (see
        :mod:`chainopt.knot`). A gradient left on a frozen weight or bias under a link (computed
        while something had made it require grad, which :meth:`step` refuses) goes too: no
        optimizer steps it, and ``clip_grad_norm_(model.parameters(), ...)`` would count it.
        """
        if self.chain.pending is not None:
            self.tie_knot()
        self._base.zero_grad(set_to_none)
        for frozen in self._frozen():
            if frozen.grad is not None and not frozen.requires_grad:
                frozen.grad = None

    def _frozen(self) -> tuple[Tensor, ...]:
        """The frozen weights and biases under the links, gathered once per records list (a
        rebind or an unload replaces the list), for the checks :meth:`step` and
        :meth:`zero_grad` make at every call."""
        records = self.chain.records
        if self.__dict__.get("_frozen_of") is not records:
            self._frozen_of = records
            self._frozen_tensors = tuple(
                t for r in records for t in (r.weight, r.bias) if isinstance(t, Tensor)
            )
        return self._frozen_tensors

    def _frozen_requiring_grad(self) -> list[tuple[str, Tensor]]:
        """``("<module>.weight" or "<module>.bias", tensor)`` of each frozen tensor under a link
        that requires grad (``model.requires_grad_(True)`` after wrapping, or trained directly
        through ``add_param_group``), in module order."""
        return [
            (f"{r.name}.{what}", t)
            for r in self.chain.records
            for what, t in (("weight", r.weight), ("bias", r.bias))
            if isinstance(t, Tensor) and t.requires_grad
        ]

    # --- the chain ---
    @property
    def history(self) -> ChainHistory:
        """The knots tied so far (:class:`~chainopt.ChainHistory`)."""
        return self.chain.history

    @property
    def knots_tied(self) -> int:
        """How many knots have been tied."""
        return self.chain.knots_tied

    def factors(self) -> list[nn.Parameter]:
        """Every trainable chain parameter (A, B and bias deltas), in module order."""
        return [p for r in self.chain.records for p in r.factors()]

    def _named_factors(self) -> list[tuple[str, nn.Parameter]]:
        """``(module name, factor)`` of every factor, in module order."""
        return [(r.name, p) for r in self.chain.records for p in r.factors()]

    def adapted_modules(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of the chain's links, in model order: a layer's qualified name,
        or ``"<module>.<param>"`` with the module holding it (``target_parameters``)."""
        return [(r.name, r.module) for r in self.chain.records]

    def link_rank(self, link: int) -> int:
        """Rank of link ``link`` (0-based): ``rank[link]``, the last entry repeating."""
        return self.config.link_rank(link)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step of the wrapped optimizer; then a knot if the schedule says one is due.

        The knot schedule counts the calls of this method, as an LR scheduler counts its steps,
        a call in which no parameter had a gradient included (torch's optimizers change nothing
        then; if no factor got a gradient in a whole link, the step due to tie the knot raises
        rather than merge nothing, neither taken nor counted). A step a ``GradScaler`` skips for
        inf/NaN gradients is not counted: it does not call an unfused step, and a fused one
        (``fused=True``) it calls skips itself.

        ``torch.distributed.checkpoint``'s state probe (``get_state_dict`` and
        ``set_state_dict`` step an optimizer without state once, at learning rate 0 with zero
        gradients) is not counted and does not step the wrapped optimizer (see
        :mod:`chainopt._state_probe`).

        A knot that failed half-way (an exception inside it) and was not finished since (by
        :meth:`tie_knot` or :meth:`zero_grad`) is finished first; this step's gradients were then
        computed before it, so prefer ``zero_grad()`` or ``tie_knot()`` after catching the error.

        Raises:
            NonFiniteUpdateError: a knot is due and a link must not be merged (no weight changed).
            RuntimeError: a knot is due and the model was cast after wrapping (see
                :meth:`accept_dtypes`), or its links were removed; or a frozen weight under a
                link requires grad again and the optimizer does not step it
                (``model.requires_grad_(True)`` after wrapping); or the model's factors are no
                longer the Parameters the wrapped optimizer steps (``model.to("meta")`` replaced
                them, or FSDP2 sharded them before :meth:`rebind_parameters`); or, on a
                ``PeftModel``, PEFT has taken the chained adapter out of the forward
                (``set_adapter`` to another, ``disable_adapter()``, ``merge_adapter()``). Nothing
                was changed.
        """
        if closure is None and is_state_probe(self._base):  # not a training step: not taken
            return None
        self._require_chain(full=self.schedule.is_due(self.optimizer_steps + 1))
        self._require_frozen_weights()
        self._require_held_factors()
        self._require_no_awaited_load()
        self._require_active_adapter()
        if self.chain.pending is not None:
            self.tie_knot()
        if closure is None:
            self._require_training()
        self._stepping = True
        try:
            if closure is None:
                loss = self._base.step()
            else:
                with torch.enable_grad():
                    loss = self._base.step(closure)
        finally:
            self._stepping = False
        if not self._stepped():
            return loss
        self.count_step()
        return loss

    def _link_factors(self) -> list[tuple[str, Tensor, Tensor]]:
        """``(name, A, B)`` of every link, what the liveness watch reads."""
        return [(r.name, r.link.lora_A, r.link.lora_B) for r in self.chain.records]

    def _require_training(self) -> None:
        """Before a step that would tie a knot, refuse (nothing changed) if the knot would merge
        nothing: the gradients this step uses are already there (without a closure), so the
        check :meth:`count_step` makes after the step is made before it, and a refused step is
        neither taken (a trained head does not move) nor counted (the knot stays due)."""
        if not self.schedule.is_due(self.optimizer_steps + 1) or not self._holds_factors():
            return
        if self.chain.engine_steps_factors():
            return  # an engine keeps the factors' gradients in copies of its own
        self._watch.on_step()
        self._watch.before_knot(self.knots_tied + 1)

    def _stepped(self) -> bool:
        """Whether the wrapped optimizer's step just now was taken: not when a ``GradScaler``
        found inf/NaN gradients and a fused step (fused Adam, SGD) skipped itself. The scaler
        sets ``found_inf`` for such a step; an unfused step it skips is never called. A skipped
        step is not counted by the knot schedule either way."""
        found_inf = self._base.__dict__.get("found_inf")
        return not (isinstance(found_inf, Tensor) and bool(found_inf.detach().ne(0).any()))

    def _require_held_factors(self) -> None:
        """Refuse a step while the wrapped optimizer holds Parameters the model had and has
        replaced since, instead of the model's factors: it would train the old ones, which the
        model no longer uses, and nothing would train. ``model.to(...)`` replaces Parameters where
        it cannot move them in place (to or from the meta device, or under ``torch.__future__.
        set_overwrite_module_params_on_conversion(True)``), as FSDP2's ``fully_shard`` does before
        :meth:`rebind_parameters`. An engine's own copies in the groups (DeepSpeed) are not the
        model's Parameters: those are left to the knot, which refuses what it would undo.

        Such a move replaces every Parameter, so the first and last factors stand for all of them:
        the check costs nothing until one of them is not a Parameter the chain was built (or
        rebound) with."""
        records, names = self.chain.records, self._param_names
        if not records or (
            id(records[0].link.lora_A) in names and id(records[-1].link.lora_B) in names
        ):
            return
        if self._holds_factors():
            return
        model_now = dict(self.model.named_parameters())
        stale = [
            names[id(p)]
            for g in self._base.param_groups
            for p in g["params"]
            if id(p) in names and model_now.get(names[id(p)]) is not p
        ]
        if stale:
            raise RuntimeError(
                f"the wrapped optimizer steps {stale[0]!r} ({len(stale)} parameter(s) in all) as "
                "the model had it, but the model's Parameter was replaced after the chain was "
                "built (model.to(...) to or from the meta device, or with torch.__future__."
                "set_overwrite_module_params_on_conversion(True); fully_shard without "
                "opt.rebind_parameters()), so the optimizer would train copies the model no "
                "longer uses. Nothing was changed. Move the model before building the "
                "ChainLoRAOptimizer, or call opt.rebind_parameters() after sharding"
            )

    def _require_no_awaited_load(self) -> None:
        """Refuse while ``load_adapter`` of a chain's own save waits for the chain's state
        (:func:`chainopt._peft_save._load_adapter`)."""
        awaiting = self.model.__dict__.get(AWAITING)
        if awaiting is not None:
            raise RuntimeError(
                f"load_adapter({awaiting!r}) loaded a chain's own save, which the chained adapter "
                "takes from the chain's state: load the optimizer's state_dict saved with it "
                "(a Trainer checkpoint's optimizer.pt; Trainer's resume_from_checkpoint does) "
                "before stepping; nothing was changed. To use the saved adapter elsewhere, load "
                "it onto the original base model: PeftModel.from_pretrained(base, path), with "
                "is_trainable=True to chain and train it further"
            )

    def _require_active_adapter(self) -> None:
        """Refuse a step while PEFT has taken the chained adapter out of the forward
        (``set_adapter`` to another adapter, ``disable_adapter()``, ``merge_adapter()``,
        ``delete_adapter``): the chain's factors got no gradient, so the step would train
        nothing, yet count towards the next knot (PEFT switches every layer at once, so the
        first link tells)."""
        first = self.chain.records[0].link if self.chain.records else None
        if not isinstance(first, PeftLink) or first.unloaded:
            return
        why = first.merge_problem()
        if why is not None:
            raise RuntimeError(
                f"cannot step the chain: {why}. PEFT's forward does not use the chained "
                f"adapter {first.adapter!r} now, so its factors got no gradient and the step "
                "would train nothing of the chain (another adapter's factors are not in this "
                "optimizer); nothing was changed. Train another adapter with its own optimizer"
            )

    def _require_frozen_weights(self) -> None:
        """Refuse a step while a weight under a link requires grad and the optimizer does not
        step it (``model.requires_grad_(True)`` after wrapping): it would never train, yet its
        gradient would be computed every step, never cleared by ``zero_grad()`` and counted by
        ``clip_grad_norm_(model.parameters(), ...)``, silently shrinking the factors' updates.
        A weight added to the optimizer (``add_param_group``) trains as in any optimizer.
        """
        if not any(map(_requires_grad, self._frozen())):
            return
        held = {id(p) for g in self._base.param_groups for p in g["params"]}
        loose = [
            n.rpartition(".")[0] for n, t in self._frozen_requiring_grad() if id(t) not in held
        ]
        if loose:
            raise RuntimeError(
                f"the frozen weight (or bias) under the link of {loose[0]!r} requires grad again "
                f"({len(loose)} such tensors in all; model.requires_grad_(True) after the chain "
                "was built?), but the optimizer does not step it: it would never train, while its "
                "gradient would be computed every step, never cleared by zero_grad() and counted "
                "by clip_grad_norm_(model.parameters(), ...). Nothing was changed. Freeze it again "
                "(model.requires_grad_(False), then requires_grad_(True) on every parameter in "
                "opt.param_groups), or add it to the optimizer with opt.add_param_group(...) to "
                "train it directly"
            )

    def count_step(self) -> None:
        """Count an optimizer step the wrapped optimizer took outside :meth:`step` (an engine
        that steps it itself, such as DeepSpeed's), and tie a knot if one is due.

        Call it after each such step: a second step of the wrapped optimizer over the factors
        outside :meth:`step` with no ``count_step()`` since the first raises ``RuntimeError``
        before it changes anything (nothing would count those steps; so does any step of
        another optimizer over the factors, see :mod:`chainopt._liveness`)."""
        self._require_chain(full=self.schedule.is_due(self.optimizer_steps + 1))
        self._require_no_awaited_load()
        self._uncounted = False
        self.optimizer_steps += 1
        merged_save_pending(self.model, clear=True)  # a later state_dict is of a later state
        for r in self.chain.records:  # masters restored with a state: only the next model load
            if r.quant is not None:  # of that state's weights may keep them
                r.quant.restored = False
        state_restored(self.model, False)
        engine = self.chain.engine_steps_factors()
        if not engine:  # an engine (DeepSpeed) keeps the factors' gradients in copies of its own
            self._watch.on_step()
        if self.schedule.is_due(self.optimizer_steps):
            if not engine and self._holds_factors():  # else the knot says what is wrong
                self._watch.before_knot(self.knots_tied + 1)
            self.tie_knot()
            self._watch.after_knot()
        self._arm()

    def accept_dtypes(self) -> None:
        """Take the weights', factors' and residuals' current dtypes as intended (an engine that
        keeps float32 masters of half-precision factors, or a model cast after wrapping on
        purpose): :meth:`step` and :meth:`tie_knot` then stop refusing them.

        Without it, a cast after wrapping (``model.to(torch.bfloat16)``) makes the next
        :meth:`step` or :meth:`count_step` that would tie a knot (and :meth:`tie_knot`) raise
        ``RuntimeError`` before anything changes: a float32 chain cast to half precision has no
        merge residual, so every knot after it rounds the weight (over 30 knots of a 64-wide
        layer it lost 5.7 times what the weight rounded once loses; ``tests/test_advice.py``).
        """
        self._dtypes = DtypeWatch(self.chain.records)

    def tie_knot(self) -> KnotRecord:
        """Tie a knot now (see :mod:`chainopt.knot`); the hooks run after it.

        Returns:
            The knot's record (also appended to :attr:`history`).

        Raises:
            NonFiniteUpdateError: a link must not be merged and ``non_finite="raise"``; no weight,
                factor or state was changed.
            RuntimeError: ``merge_and_unload()`` was called (the method, or the function on the
                model), or the links were removed from the model otherwise, or the model was
                cast after wrapping (see :meth:`accept_dtypes`); nothing was changed.
        """
        self._require_chain(full=True)
        pending = self.chain.pending
        record = tie_knot(self.chain, pending.step if pending else self.optimizer_steps)
        for hook in list(self._knot_hooks.values()):
            hook(self, record)
        return record

    def _require_chain(self, full: bool = False) -> None:
        """Raise unless the model still carries this optimizer's links.

        Every call reads each link's ``unloaded`` mark (what chainopt's unloading sets); ``full``
        (before a knot) also checks that each module still holds its link (what removing
        parametrizations by other means undoes), is still part of the model, and adds its link
        now (:func:`chainopt.merge.require_mergeable`: PEFT merged, disabled or switched adapters).
        """
        records = self.chain.records
        if not records:
            raise RuntimeError("merge_and_unload() was called: this optimizer has no chain left")
        gone = [r.name for r in records if r.link.unloaded or (full and not r.attached())]
        if gone:
            raise RuntimeError(
                f"the model no longer carries this optimizer's links ({len(gone)} of "
                f"{len(records)} modules, first {gone[0]!r}): chainopt.merge_and_unload("
                "model) or another removal of its parametrizations merged or dropped them; this "
                "optimizer cannot step, tie a knot or merge again (nothing was changed). Build a "
                "new ChainLoRAOptimizer on the model to train on"
            )
        if full:
            self._dtypes.check(records)  # a cast after wrapping: refused before the knot
            require_mergeable(records, "tie a knot", self.model)

    def _holds_factors(self) -> bool:
        """Whether the wrapped optimizer still steps the factors themselves (not an engine's
        copies): only then is a link that got no gradient a link that trained nothing."""
        held = {id(p) for g in self._base.param_groups for p in g["params"]}
        return all(id(p) in held for p in self.factors())

    def _peft_links(self) -> list[tuple[str, PeftLink]]:
        return [(r.name, r.link) for r in self.chain.records if isinstance(r.link, PeftLink)]

    def _arm(self) -> None:
        # Gradients for init="gradient" are gathered on the step just before a knot.
        self.chain.link_init.arm(self.schedule.is_due(self.optimizer_steps + 1))

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

        4-bit targets keep their weights whole: pass them in ``fully_shard(...,
        ignored_params=...)`` (their factors are still sharded; see ``docs/qlora.md``).

        Raises:
            RuntimeError: a parameter the optimizer holds left the model, was replaced after it
                got optimizer state (shard before training), or is a sharded 4-bit weight.
                Nothing is changed then.
        """
        self._param_names = rebind(self.chain, self.model, self._param_names)

    def register_knot_hook(self, hook: KnotHook) -> RemovableHandle:
        """Call ``hook(optimizer, record)`` after every knot; ``handle.remove()`` stops it.

        Raises:
            TypeError: ``hook`` is not callable.

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
        if not callable(hook):
            raise TypeError(f"hook must be callable (optimizer, record) -> None, got {hook!r}")
        handle = RemovableHandle(self._knot_hooks)
        self._knot_hooks[handle.id] = hook
        return handle

    def register_knot_context(self, context: KnotContext) -> RemovableHandle:
        """Enter ``context(chain)`` around every knot (an integration's hook: gather sharded
        weights first, re-partition after); ``handle.remove()`` stops it.

        Raises:
            TypeError: ``context`` is not callable.
        """
        if not callable(context):
            raise TypeError(f"context must be callable chain -> context manager, got {context!r}")
        return self.chain.add_context(context)

    def chain_summary(self) -> ChainSummary:
        """The chain so far: links, ranks, knot steps, update norms, effective ranks.

        ``effective_rank`` per module is the rank of ``Σ sᵢ·Bᵢ·Aᵢ`` over the merged links and the
        pending one (``None`` with ``keep_history=False``). See :class:`~chainopt.ChainSummary`.
        """
        return summarize(self.chain, self.optimizer_steps)

    def merge_and_unload(self) -> nn.Module:
        """Merge what is pending, remove the links, and return the model with plain modules.

        The adapted modules keep their weight Parameter objects. The factors leave the wrapped
        optimizer; this optimizer cannot step afterwards. Frozen parameters stay frozen.

        Raises:
            NonFiniteUpdateError: a link must not be merged; nothing was changed.
        """
        factors = self.factors()
        rank = sum(self.link_rank(i) for i in range(self.knots_tied + 1))  # the pending link too
        unload_merged(self.model, {r.name: rank for r in self.chain.records})
        drop_params(self.chain.optimizer, factors)
        self.chain.records = []
        self.chain.link_init.remove()
        return self.model

    # --- checkpointing ---
    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"chainopt"`` entry.

        The entry holds the config, the step and knot counters, the generator state and the
        history; with ``model.state_dict()`` it resumes training bitwise (on CPU). Right after a
        ``save_pretrained`` of the model (which writes the merged, deployable weights) it also
        holds the chain's own tensors under ``"model"`` (frozen originals, factors, residuals), so
        that the two files together (a ``Trainer`` checkpoint) resume bitwise too.
        """
        return self._hooked_state_dict(self._state_dict)

    def _state_dict(self) -> dict[str, Any]:
        sd = self._base.state_dict()
        sd["chainopt"] = chain_entry(self.chain, self.optimizer_steps, _STATE_VERSION)
        if merged_save_pending(self.model):  # save_pretrained wrote merged weights: resume needs
            sd["chainopt"]["model"] = chain_tensors(self.model)  # the originals and factors
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` saved (load ``model.state_dict()`` too); all or nothing.

        Everything is checked first — the version, the config, the counters, the generator
        state (it must load into a scratch generator), the history (every factor fits its
        module), the 4-bit masters (with data, finite), the wrapped optimizer's groups, and each
        parameter's state against what the optimizer itself keeps for such a parameter (every
        tensor a scratch copy of it holds after one step, in that shape), and each group's
        hyperparameters with one of its parameters' state loaded into a scratch copy that
        steps — then loaded.

        Raises:
            TypeError: ``state_dict`` is not a dict.
            ValueError: no ``"chainopt"`` entry, one of another version or config, or anything
                malformed; nothing is loaded then.
        """
        self._hooked_load(state_dict, self._load_state_dict)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        checked = check_saved_state(
            state_dict, self.chain, self.param_groups, _STATE_VERSION, self.model
        )
        restore(self.chain, self.model, checked)
        self.model.__dict__.pop(AWAITING, None)
        self.optimizer_steps = checked.optimizer_steps
        self._arm()

    # --- copies: deep copies carry the model along (a shallow copy shares it); no pickling ---
    def __deepcopy__(self, memo: dict[int, Any]) -> ChainLoRAOptimizer:
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = copy.deepcopy(value, memo)
        clone._param_names = {id(p): n for n, p in clone.model.named_parameters()}
        own_instance_patches(clone, self)  # a scheduler's step wrapper: the copy's own
        own_instance_patches(clone._base, self._base)
        own_factor_steps(clone)
        return clone

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "a ChainLoRAOptimizer is not pickled: its model's parametrized modules cannot be "
            "(torch.nn.utils.parametrize); save opt.state_dict() and model.state_dict(), or use "
            "chainopt.save_checkpoint"
        )

    def __repr__(self) -> str:
        c = self.config
        return (
            f"ChainLoRAOptimizer({type_name(self._base)}, modules={len(self.chain.records)}, "
            f"rank={list(c.ranks)}, alpha={c.alpha:g}, {self.schedule!r}, "
            f"steps={self.optimizer_steps}, knots_tied={self.knots_tied})"
        )
