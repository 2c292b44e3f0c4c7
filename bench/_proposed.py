"""A candidate forward for ``chainopt.lora._lora_linear_forward``, measured outside the library.

``bench/ab_forward.py`` (and ``compare.py --proposed-forward``) swap it in for one chainopt
variant's modules and time it against the installed forward and PEFT in one process. The version
here, which accumulates ``s·(x·Aᵀ)·Bᵀ`` into the base output with one ``addmm_``, was adopted by
the library in commit 3e9be6d; the A/B now shows the two chainopt variants equal, and this file is
the place to put the next candidate.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from chainopt.lora import LoRAParametrization


def fused_lora_linear_forward(self: nn.Linear, x: Tensor) -> Tensor:
    """Forward of an adapted Linear: ``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ`` without building ``W + s·B·A``."""
    plists = cast(nn.ModuleDict, self.parametrizations)
    plist = cast(parametrize.ParametrizationList, plists["weight"])
    if len(plist) != 1 or parametrize._cache_enabled:
        return F.linear(x, self.weight, self.bias)
    link = cast(LoRAParametrization, plist[0])
    a, b = link.lora_A, link.lora_B
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast or not (x.dtype == a.dtype == b.dtype):
        out = F.linear(x, plist.original, self.bias)
        h = x if x.dtype == a.dtype or autocast else x.to(a.dtype)
        # (..., in) @ (in, r) -> (..., r) @ (r, out) -> (..., out)
        lora = F.linear(F.linear(h, a), b) * link.scale
        result: Tensor = out + lora.to(out.dtype)
        return result
    # One dtype, no autocast: on 2-D rows, accumulate s·(x·Aᵀ)·Bᵀ into the base output inside one
    # GEMM. No (rows, out) temporary for the product, the scale or the sum in forward, and none
    # for the scale in backward (addmm_'s gradients w.r.t. x·Aᵀ and B are rank-r products).
    x2 = x.reshape(-1, x.shape[-1])
    z = F.linear(x2, a)  # (rows, in) @ (in, r) -> (rows, r)
    out = F.linear(x2, plist.original, self.bias)  # (rows, out): a fresh tensor, not a view
    out.addmm_(z, b.t(), alpha=link.scale)  # nothing saved for backward reads `out`
    return out.view(*x.shape[:-1], out.shape[-1])
