"""Tying a knot: inspect → record → merge → restart → reset, for every adapted module at once.

:func:`tie_knot` is the whole knot, in that order:

1. **inspect** every pending link (:func:`chainopt.guard.check_links`): its norm, and whether it
   may be merged (finite factors, no overflow of the weight's dtype), agreed across ranks. A bad
   link raises :class:`~chainopt.guard.NonFiniteUpdateError` before anything changed
   (``non_finite="raise"``), or is dropped unmerged with a warning (``"skip"``).
2. **record** the knot: step, norms and (with ``keep_history``) host copies of the links.
3. **merge** each good link into its frozen weight (:func:`chainopt.merge.merge_`), zeroing its
   B right after, so the model computes the same function at every point of the knot.
4. **restart** every link in place: the rank of the next link, A Kaiming-uniform from the chain's
   generator (or from the gradient, ``init="gradient"``), B zero.
5. **reset** the factors' optimizer state (``reset=``); a dropped link's state always goes.

A knot is all or nothing as the model sees it: if anything raises half-way (an out-of-memory
error in one module's merge, say), the modules already merged have a zero link, the others
still hold theirs, and the function is unchanged. The chain keeps the knot pending; the next
:func:`tie_knot` finishes it (``ChainLoRAOptimizer.zero_grad()`` and ``step()`` call it),
merging no module twice and drawing the same new factors, so the result is bitwise what an
uninterrupted knot gives, recorded once.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=100)
    >>> x = torch.randn(3, 4)
    >>> with torch.no_grad():
    ...     _ = model[0].parametrizations.weight[0].lora_B.fill_(0.5)
    ...     before = model(x)
    >>> record = opt.tie_knot()  # calls tie_knot(opt.chain, step)
    >>> torch.allclose(model(x), before, atol=1e-6), record.step
    (True, 0)
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from ._record import ModuleRecord
from ._schedule_free import KnotContext
from ._surgery import forget_parameter_sizes
from .config import ChainConfig, NonFinitePolicy
from .guard import (
    LinkCheck,
    NonFiniteUpdateError,
    check_links,
    non_finite_params,
    pending_links,
)
from .history import ChainHistory, KnotRecord
from .init import LinkInit
from .lora import restart_links
from .merge import merge_, require_mergeable
from .reset import StateReset

__all__: list[str] = []  # the public names (chainopt re-exports them); the rest is internal

OnBadLinks = Callable[[LinkCheck, str], None]
"""Called with the check and ``"knot N (optimizer step S)"`` when some links must not merge."""


def _raise(check: LinkCheck, where: str) -> None:
    raise NonFiniteUpdateError(
        f"non-finite LoRA factors in {list(check.bad)} at {where} ({check.describe()}); "
        "refusing to merge them: no weight was changed"
    )


def _skip(check: LinkCheck, where: str) -> None:
    warnings.warn(
        f"non-finite LoRA factors in {list(check.bad)} at {where}: dropped those links "
        f"unmerged ({check.describe()})",
        RuntimeWarning,
        stacklevel=4,
    )


def resolve_non_finite(policy: NonFinitePolicy) -> OnBadLinks:
    """What a knot does with links that must not be merged, for ``policy``.

    Raises:
        ValueError: an unknown policy.
    """
    policies: dict[str, OnBadLinks] = {"raise": _raise, "skip": _skip}
    if policy not in policies:
        raise ValueError(f"non_finite must be one of {sorted(policies)}, got {policy!r}")
    return policies[policy]


@dataclass
class _Attempt:
    """A knot under way: what it inspected and recorded, and which modules it merged."""

    step: int
    good: list[ModuleRecord]
    bad: list[ModuleRecord]
    record: KnotRecord
    rank: int
    new_a: list[Tensor | None]
    generator_state: Tensor
    shapes: dict[int, tuple[int, ...]]  # every factor's shape before the knot, by id
    merged: set[str] = field(default_factory=set)


@dataclass
class Chain:
    """What a knot reads and changes; built once (:func:`chainopt._build.build_chain`), policies
    resolved.

    Attributes:
        records: the adapted modules (refreshed when FSDP2 replaces their Parameters).
        config: the chain's config.
        history: the knots so far.
        generator: draws every new A.
        optimizer: the wrapped optimizer (its ``state`` is reset; ``load_state_dict`` replaces
            that dict, so it is read at each knot).
        reset_state: the ``reset=`` policy.
        drop_state: the full reset, for dropped links.
        on_bad: the ``non_finite=`` policy.
        link_init: the ``init=`` policy.
        contexts: entered around every knot (:data:`chainopt._schedule_free.KnotContext`), in the
            order added (:meth:`add_context`): the wrapped optimizer's own (schedule-free) first.
        knots_tied: knots tied so far.
        pending: a knot that raised half-way, finished by the next :func:`tie_knot`.
        merged_before: per adapted module, the rank earlier chains had merged into its weights
            when this one was built (``None``: not known; see
            :func:`chainopt._marks.merged_rank`), for an export from the original base.
    """

    records: list[ModuleRecord]
    config: ChainConfig
    history: ChainHistory
    generator: torch.Generator
    optimizer: Optimizer
    reset_state: StateReset
    drop_state: StateReset
    on_bad: OnBadLinks
    link_init: LinkInit
    contexts: OrderedDict[int, KnotContext] = field(default_factory=OrderedDict)
    knots_tied: int = 0
    pending: _Attempt | None = None
    merged_before: dict[str, int | None] = field(default_factory=dict)

    def add_context(self, context: KnotContext) -> RemovableHandle:
        """Enter ``context(chain)`` around every knot, after those added before it."""
        handle = RemovableHandle(self.contexts)
        self.contexts[handle.id] = context
        return handle

    def factors(self, records: Sequence[ModuleRecord] | None = None) -> list[Tensor]:
        """The trainable factors of ``records`` (default: all), in module order."""
        return [p for r in (self.records if records is None else records) for p in r.factors()]

    def engine_steps_factors(self) -> bool:
        """Whether a knot context says an engine (DeepSpeed's) steps the factors through copies
        of its own, which also hold their gradients (its ``steps_factors`` attribute is true)."""
        return any(getattr(c, "steps_factors", False) for c in self.contexts.values())


@torch.no_grad()
def tie_knot(chain: Chain, step: int) -> KnotRecord:
    """Tie a knot of ``chain`` after optimizer step ``step`` (or finish the pending one).

    Returns:
        The knot's record, added to ``chain.history``.

    Raises:
        NonFiniteUpdateError: a link must not be merged and ``non_finite="raise"``; nothing
            was changed.
    """
    require_mergeable(chain.records, f"tie knot {chain.knots_tied + 1}")
    with ExitStack() as contexts:
        for context in list(chain.contexts.values()):  # schedule-free's eval mode, ZeRO-3, ...
            contexts.enter_context(context(chain))
        _require_factors_stepped(chain)
        attempt = chain.pending or _inspect_and_record(chain, step)
        chain.pending = attempt
        for r in attempt.good:  # merge, and zero the link at once: the function holds throughout
            if r.name not in attempt.merged:
                merge_(r)
                r.link.lora_B.zero_()
                if r.delta is not None:
                    r.delta.reset_parameters()
                attempt.merged.add(r.name)
        _restart(chain, attempt)
        resized = [p for p in chain.factors() if tuple(p.shape) != attempt.shapes.get(id(p))]
        if resized:  # (LBFGS caches its parameters' total size)
            forget_parameter_sizes(chain.optimizer)
        chain.reset_state(chain.optimizer.state, chain.factors(attempt.good), resized)
        chain.drop_state(chain.optimizer.state, chain.factors(attempt.bad), resized)
        shared = _shared_state_key(chain)  # LBFGS: one state, the factors' among the rest
        if shared:  # it follows the policy; it goes if any factor's shape changed or link dropped
            reset = chain.drop_state if resized or attempt.bad else chain.reset_state
            reset(chain.optimizer.state, shared, ())
    chain.history.add(attempt.record)
    chain.knots_tied += 1
    chain.pending = None
    return attempt.record


def _shared_state_key(chain: Chain) -> list[Tensor]:
    """The parameter an optimizer keys one state of all its parameters by, when it is no factor.

    LBFGS keeps its whole history (flat over every parameter) under its first parameter; a
    ``trainable_modules`` parameter comes first in its group, so the factors' reset never saw it
    and the next link started from the last link's curvature pairs.
    """
    optimizer = chain.optimizer
    if not isinstance(optimizer, torch.optim.LBFGS) or not optimizer.param_groups:
        return []
    params = optimizer.param_groups[0]["params"]
    factors = {id(p) for p in chain.factors()}
    return [params[0]] if params and id(params[0]) not in factors else []


def _require_factors_stepped(chain: Chain) -> None:
    """Refuse a knot the wrapped optimizer would undo: it must step the factors themselves,
    unless a knot context says an engine steps (and resets) them through copies of its own
    (its ``steps_factors`` attribute is true)."""
    if chain.engine_steps_factors():
        return
    held = {id(p) for g in chain.optimizer.param_groups for p in g["params"]}
    if not all(id(p) in held for p in chain.factors()):
        raise RuntimeError(
            "the wrapped optimizer no longer steps the chain's factors (an engine such as "
            "DeepSpeed's ZeRO replaced its param groups with copies of its own), so the next "
            "step would undo a knot; nothing was changed. Under DeepSpeed use "
            "chainopt.integrations.deepspeed.initialize(...) or deepspeed_knots(opt, engine)"
        )


def _inspect_and_record(chain: Chain, step: int) -> _Attempt:
    links = pending_links(chain.records)
    check = check_links(chain.records, links)
    if check.bad:
        where = f"knot {chain.knots_tied + 1} (optimizer step {step})"
        _require_finite_trained(chain, check, where)
        chain.on_bad(check, where)
    good = [r for r in chain.records if r.name not in check.bad]
    bad = [r for r in chain.records if r.name in check.bad]
    record = chain.history.make_record(
        step,
        {r.name: links[r.name] for r in good},
        {r.name: check.norms[r.name] for r in good},
        tuple(r.name for r in bad),
    )
    rank = chain.config.link_rank(chain.knots_tied + 1)
    new_a = chain.link_init.initial_a([r.name for r in chain.records], rank)
    shapes = {id(p): tuple(p.shape) for p in chain.factors()}
    return _Attempt(step, good, bad, record, rank, new_a, chain.generator.get_state(), shapes)


def _require_finite_trained(chain: Chain, check: LinkCheck, where: str) -> None:
    """With links that must not merge: refuse, whatever the policy, if a parameter the optimizer
    steps outside the links (``trainable_modules``: a head) took the same NaN/Inf step. A link
    can be dropped (``"skip"``), that step cannot: the model would compute NaN from then on,
    and every later link would be dropped too. Nothing is changed."""
    if chain.engine_steps_factors():  # its groups hold its own flat copies, factors in them;
        return  # and DeepSpeed skips a step whose gradient norm is not finite itself
    factors = {id(p) for p in chain.factors()}
    trained = [p for g in chain.optimizer.param_groups for p in g["params"] if id(p) not in factors]
    why = non_finite_params(trained)
    if why is not None:
        raise NonFiniteUpdateError(
            f"non-finite LoRA factors in {list(check.bad)} at {where}, and parameters the "
            f"optimizer steps outside the links (trainable_modules) hold NaN/Inf too ({why}): "
            "dropping the links cannot undo their step, so no weight was changed; resume from "
            "the last checkpoint"
        )


def _restart(chain: Chain, attempt: _Attempt) -> None:
    """Every link starts again: the next rank, a fresh A (the same draws on a retry), B zero."""
    chain.generator.set_state(attempt.generator_state)
    links = [r.link for r in chain.records]
    for link in links:
        link.resize_(attempt.rank)
    restart_links(links, chain.generator, attempt.new_a)
    for r in attempt.bad:  # a merged link's bias delta was zeroed right after its merge
        if r.delta is not None:
            r.delta.reset_parameters()
