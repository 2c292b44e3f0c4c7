"""torch.distributed.checkpoint's state probe: one step of zero gradients at learning rate 0.

``torch.distributed.checkpoint.state_dict``'s ``get_state_dict``, ``get_optimizer_state_dict``,
``set_state_dict`` and ``set_optimizer_state_dict`` (Accelerate's ``save_state``/``load_state``
call them under FSDP2) step an optimizer that holds no state once, with the gradient of every
parameter that requires grad set to zeros and every group's ``lr`` to 0, so that it builds its
state (``_init_optim_state``). A chain holds no state before its first step, and after a knot
with ``reset="full"`` when nothing but factors trains.

Counted as a step, that probe would move the knot schedule by one; and the state it builds
(AdamW's ``step`` 1 and zero moments) would make the next link's first real step AdamW's second,
``√(1+β₂)/(1+β₁)`` ≈ 0.74 of a first step's size at AdamW's default betas. A rate of 0 does not
keep every optimizer still either: transformers' ``Adafactor`` with ``relative_step=True``
takes its own rate and applies its weight decay (a trained head moved). So the chain neither
counts the probe nor steps the wrapped optimizer for it: no state is built (what DCP then saves
holds none, as the chain's own ``state_dict()`` would not carry it), nothing moves, and
training goes on as if nothing had been probed.

Example:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> sgd = torch.optim.SGD([p], lr=0.0, momentum=0.9)
    >>> p.grad = torch.zeros(2)
    >>> is_state_probe(sgd)
    True
    >>> p.grad = torch.ones(2)  # a real gradient: a real step, whatever the rate
    >>> is_state_probe(sgd)
    False
"""

from __future__ import annotations

from torch import Tensor
from torch.optim import Optimizer

from ._dtensor import full_tensor, is_sharded

__all__ = ["is_state_probe"]


def is_state_probe(optimizer: Optimizer) -> bool:
    """Whether stepping ``optimizer`` now would be DCP's state probe: no state yet, every group's
    rate 0, and every parameter that requires grad has a gradient, all zeros (on every rank:
    under FSDP2 a collective, which every rank reaches as every rank steps)."""
    if optimizer.state:
        return False
    grads: list[Tensor] = []
    for group in optimizer.param_groups:
        lr = group.get("lr")
        if lr is None or float(lr) != 0.0:
            return False
        for p in group["params"]:
            if p.requires_grad:
                if p.grad is None:
                    return False
                grads.append(p.grad)
    if not grads:
        return False
    if not any(is_sharded(g) for g in grads):
        return not any(bool(g.any()) for g in grads)
    # a sharded gradient (FSDP2) counts its nonzeros on every rank, for every parameter (no
    # rank may stop early: each sum is a collective); a local look would let the ranks disagree
    # on which step counts, and their knots go apart
    nonzero = [full_tensor(g.ne(0).sum()) for g in grads]
    return not any(bool(n) for n in nonzero)
