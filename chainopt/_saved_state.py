"""Checking a saved ``ChainLoRAOptimizer`` state, and writing it back.

:func:`chain_entry` is the ``"chainopt"`` entry of the optimizer's state dict;
:func:`check_saved_state` checks a saved state whole before any of it is loaded, and
:func:`restore` writes the checked state into the optimizer, the model and the chain. (The
wrapped optimizer's param groups are rewritten at construction: :mod:`chainopt._build`.)

Example:
    >>> import torch
    >>> from torch import nn
    >>> from chainopt import ChainLoRAOptimizer
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> opt = ChainLoRAOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1),
    ...                          target_modules=["0"], rank=2, knot_every=1)
    >>> entry = opt.state_dict()["chainopt"]
    >>> entry["optimizer_steps"], entry["knots_tied"], entry["config"]["ranks"]
    (0, 0, [2])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ._load_guard import check_incoming_state
from ._validate import is_int, type_name
from .history import KnotRecord, parse_history
from .knot import Chain

__all__ = [
    "CheckedState",
    "chain_entry",
    "check_saved_state",
    "restore",
]


@dataclass(frozen=True)
class CheckedState:
    """A saved state, checked and split: what ``load_state_dict`` then writes."""

    base: dict[str, Any]
    optimizer_steps: int
    knots_tied: int
    generator: Tensor
    history: tuple[bool, list[KnotRecord]]
    model: dict[str, Tensor]
    masters: dict[str, Tensor]


def chain_entry(chain: Chain, optimizer_steps: int, version: int) -> dict[str, Any]:
    """The ``"chainopt"`` entry of a state dict: config, counters, generator, history, masters."""
    entry: dict[str, Any] = {
        "version": version,
        "config": chain.config.to_dict(),
        "optimizer_steps": optimizer_steps,
        "knots_tied": chain.knots_tied,
        "generator": chain.generator.get_state(),
        "history": chain.history.state_dict(),
    }
    masters = {
        r.name: r.quant.master for r in chain.records if r.quant and r.quant.master is not None
    }
    if masters:  # 4-bit targets: the float32 masters are the chain's state
        entry["masters"] = masters
    return entry


def restore(chain: Chain, model: nn.Module, checked: CheckedState) -> None:
    """Write a checked state into the wrapped optimizer, the model and the chain."""
    chain.optimizer.load_state_dict(checked.base)
    if checked.model:
        model.load_state_dict(checked.model, strict=False)
    for r in chain.records:
        if r.quant is not None and r.quant.master is not None:
            r.quant.master.copy_(checked.masters[r.name])
    chain.knots_tied = checked.knots_tied
    chain.generator.set_state(checked.generator)
    chain.history.keep_factors, chain.history.knots = checked.history
    chain.pending = None


def check_saved_state(
    state_dict: object,
    chain: Chain,
    param_groups: list[dict[str, Any]],
    version: int,
    model: nn.Module,
) -> CheckedState:
    """Check all of a saved ``ChainLoRAOptimizer`` state against ``chain``; change nothing.

    ``param_groups`` are the wrapped optimizer's; ``version`` the newest state format read;
    ``model`` the chained model (the state may carry its chain tensors).

    Raises:
        TypeError: ``state_dict`` is not a dict.
        ValueError: what is wrong, first found.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type_name(state_dict)}")
    entry = state_dict.get("chainopt")
    if not isinstance(entry, dict):
        raise ValueError(
            "state_dict has no 'chainopt' entry: it was not saved by "
            "ChainLoRAOptimizer.state_dict()"
        )
    saved_version = entry.get("version")
    if saved_version not in range(1, version + 1):
        raise ValueError(
            f"state_dict was saved by a chainopt state format of version {saved_version!r}; this "
            f"chainopt reads versions 1 to {version}"
        )
    saved_config = entry.get("config")
    if not isinstance(saved_config, dict):
        raise ValueError("state_dict['chainopt'] has no 'config' dict")
    diff = chain.config.differences(saved_config)
    if diff:
        raise ValueError(
            "state_dict was saved with a different chain config (saved, current): "
            + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
        )
    steps, knots = entry.get("optimizer_steps"), entry.get("knots_tied")
    for name, value in (("optimizer_steps", steps), ("knots_tied", knots)):
        if not is_int(value) or value < 0:  # type: ignore[operator]
            raise ValueError(f"state_dict['chainopt'][{name!r}] must be an int >= 0, got {value!r}")
    generator = entry.get("generator")
    expected = chain.generator.get_state()
    if not (
        isinstance(generator, Tensor)
        and generator.dtype == expected.dtype
        and generator.shape == expected.shape
    ):
        raise ValueError(
            f"state_dict['chainopt']['generator'] must be a {expected.dtype} tensor of shape "
            f"{tuple(expected.shape)} (a CPU generator state), got {generator!r:.80}"
        )
    history = parse_history(entry.get("history"))
    tensors = entry.get("model", {})
    if not isinstance(tensors, dict) or not all(isinstance(t, Tensor) for t in tensors.values()):
        raise ValueError("state_dict['chainopt']['model'] must map keys to tensors")
    problems = check_incoming_state(model, tensors)
    unknown = sorted(set(tensors) - set(model.state_dict()))
    if problems or unknown:
        raise ValueError(
            f"state_dict['chainopt']['model'] does not fit the model: {(problems + unknown)[:3]}"
        )
    base = {k: v for k, v in state_dict.items() if k != "chainopt"}
    _check_base(base, chain, param_groups, int(knots))  # type: ignore[arg-type]
    masters = _check_masters(entry.get("masters", {}), chain)
    return CheckedState(base, int(steps), int(knots), generator.cpu(), history, tensors, masters)  # type: ignore[arg-type]


def _check_masters(saved: object, chain: Chain) -> dict[str, Tensor]:
    """The saved float32 masters of the chain's 4-bit targets, one per target, shapes checked."""
    wanted = {
        r.name: r.quant.master for r in chain.records if r.quant and r.quant.master is not None
    }
    if not isinstance(saved, dict) or set(saved) != set(wanted):
        got = sorted(saved) if isinstance(saved, dict) else saved
        raise ValueError(
            f"state_dict['chainopt']['masters'] must hold the masters of {sorted(wanted)}, "
            f"got {got!r:.200}"
        )
    for name, master in wanted.items():
        tensor = saved[name]
        if not (
            isinstance(tensor, Tensor)
            and tensor.shape == master.shape
            and tensor.is_floating_point()
        ):
            raise ValueError(
                f"state_dict['chainopt']['masters'][{name!r}] must be a float tensor of shape "
                f"{tuple(master.shape)}, got {tensor!r:.80}"
            )
    return dict(saved)


def _check_base(
    base: dict[str, Any], chain: Chain, current: list[dict[str, Any]], knots_tied: int
) -> None:
    """The wrapped optimizer's saved groups and per-parameter state fit the chain's parameters.

    Factors are expected in the shape of the saved link's rank; a state tensor with as many
    dimensions as its parameter (a moment, a momentum buffer) must have the parameter's shape.
    """
    groups, state = base.get("param_groups"), base.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise ValueError("the wrapped optimizer's state has no 'param_groups' list / 'state' dict")
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
    if sizes != [len(g["params"]) for g in current]:
        raise ValueError(
            f"the saved optimizer has param groups of sizes {sizes}, this one "
            f"{[len(g['params']) for g in current]}"
        )
    rank = chain.config.link_rank(knots_tied)
    shapes: dict[int, tuple[int, ...]] = {}
    for r in chain.records:
        # The link's logical sizes, not the tensors' shapes: an engine may hold a partition.
        # A link of one fixed rank (a PEFT layer's, rank_pattern) keeps its own.
        link = r.link
        own = rank if rank in getattr(link, "ranks", (rank,)) else getattr(link, "rank", rank)
        if link.lora_A.dim() == 2:
            shapes[id(link.lora_A)] = (own, link.in_features)
            shapes[id(link.lora_B)] = (link.out_features, own)
    by_index = {
        i: p
        for saved, group in zip(groups, current, strict=True)
        for i, p in zip(saved["params"], group["params"], strict=True)
    }
    for index, entry in state.items():
        param = by_index.get(index)
        if param is None or not isinstance(entry, dict):
            raise ValueError(f"the saved optimizer state has an entry {index!r} for no parameter")
        want = shapes.get(id(param), tuple(param.shape))
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.dim() == len(want) and value.dim() > 0:
                if tuple(value.shape) != want:
                    raise ValueError(
                        f"the saved optimizer state {key!r} of parameter {index} has shape "
                        f"{tuple(value.shape)}; the parameter's is {want}"
                    )
                if value.is_meta:
                    raise ValueError(f"the saved optimizer state {key!r} is on the meta device")
