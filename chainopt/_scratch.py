"""Scratch copies of an optimizer: the same class and hyperparameters over one zero parameter.

What an optimizer keeps for a parameter, and what it starts that state at, is its own business
(Adagrad's sums start at ``initial_accumulator_value``, Rprop's step sizes at ``lr``, a
bitsandbytes 8-bit moment is quantized); a scratch copy that steps once with a zero gradient tells
it without knowing the optimizer. The saved-state check (:mod:`chainopt._saved_state`) and the
knot's reset policies (:mod:`chainopt.reset`) ask it.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(3))
    >>> rprop = torch.optim.Rprop([p], lr=0.5)
    >>> start = initial_state(rprop, 0, p)
    >>> start["step_size"].tolist(), start["prev"].tolist()
    ([0.5, 0.5, 0.5], [0.0, 0.0, 0.0])
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["initial_state", "scratch_copy"]


def scratch_copy(optimizer: Optimizer, group: int, param: Tensor) -> Optimizer:
    """A copy of ``optimizer`` over ``param`` alone, in a copy of param group ``group`` (its
    hyperparameters), with no state and no hooks; nothing of the original is shared or copied
    beyond its settings."""
    source = optimizer.param_groups[group]
    new_group = {**{k: copy.deepcopy(v) for k, v in source.items() if k != "params"}}
    new_group["params"] = [param]
    memo: dict[int, Any] = {id(optimizer.param_groups): [new_group], id(source): new_group}
    memo[id(source["params"])] = new_group["params"]
    for g in optimizer.param_groups:
        for p in g["params"]:
            memo[id(p)] = param
    memo[id(optimizer.state)] = defaultdict(dict)
    for name, value in vars(optimizer).items():
        if name.startswith("_optimizer_") and name.endswith("_hooks"):
            memo[id(value)] = type(value)()
        elif isinstance(value, nn.Module):  # an optimizer that holds the model: shared, not copied
            memo[id(value)] = value
    # Every attribute, not what Optimizer.__getstate__ keeps (bitsandbytes keeps its settings in
    # attributes of its own).
    clone = object.__new__(type(optimizer))
    clone.__dict__.update(copy.deepcopy(dict(vars(optimizer)), memo))
    clone.param_groups = [new_group]
    clone.state = defaultdict(dict)
    return clone


def initial_state(optimizer: Optimizer, group: int, like: Tensor) -> dict[str, Any] | None:
    """The state a scratch copy of ``optimizer`` (param group ``group``'s hyperparameters) holds
    for a zero parameter shaped like ``like`` after one step with a zero gradient: what it starts
    each state tensor at. ``None`` when no scratch copy can step (a sharded parameter, an
    optimizer that cannot be copied or fails here); the caller falls back to zeros."""
    if type(like) not in (Tensor, nn.Parameter) or like.device.type == "meta":
        return None
    param = torch.zeros_like(like, requires_grad=True)
    param.grad = torch.zeros_like(param)
    devices = [like.device] if like.device.type == "cuda" else []
    try:  # an optimizer that draws random numbers draws them from a fork: the RNGs stay as they are
        scratch = scratch_copy(optimizer, group, param)
        train = getattr(scratch, "train", None)  # schedule-free optimizers step in train mode
        if callable(train):
            train()
        with torch.random.fork_rng(devices=devices):
            try:
                scratch.step()
            except TypeError:  # an optimizer that needs a closure (LBFGS)
                scratch.step(lambda: 0.0)
        return dict(scratch.state.get(param, {}))
    except Exception:
        return None
