"""A candidate forward for ``chainopt.lora._lora_linear_forward``, measured outside the library.

``bench/ab_forward.py`` (and ``compare.py --proposed-forward``) swap it in for one chainopt
variant's modules and time it against the installed forward and PEFT in one process. The last
candidate (accumulating ``s·(x·Aᵀ)·Bᵀ`` into the base output with one ``addmm_``) was adopted by
the library in commit 3e9be6d, so until the next candidate is written here this is the library's
own forward and the A/B shows the two chainopt variants equal.
"""

from __future__ import annotations

from chainopt.lora import _lora_linear_forward as fused_lora_linear_forward

__all__ = ["fused_lora_linear_forward"]
