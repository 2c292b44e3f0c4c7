"""Low-rank factorisation helpers: the best rank-k ``B'·A'`` of a stacked chain or of ``ΔW``.

Example:
    >>> import torch
    >>> b, a = torch.randn(6, 3), torch.randn(3, 5)
    >>> b2, a2, left, norm = compress(b, a, 3)  # rank 3 fits in 3: returned as is
    >>> left, torch.equal(b2, b)
    (0.0, True)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["compress", "factorise", "top_right_singular_vectors"]


def factorise(delta: Tensor, rank: int, oversample: int = 8) -> tuple[tuple[Tensor, Tensor], float]:
    """``((B, A), left)``: the best rank-``rank`` ``B·A`` of ``ΔW`` and ``‖ΔW − B·A‖²_F``.

    A randomized range finder: ``Q`` orthonormal from ``ΔW·Ω``, ``Ω`` Gaussian with ``rank +
    oversample`` columns (fixed seed), in float64; then the SVD of ``Qᵀ·ΔW`` through
    :func:`compress`. Exact (``left`` ~0) when ``ΔW`` has rank ≤ ``rank``, as a chain's has.
    """
    d = delta.double()
    k = min(rank + oversample, *d.shape)
    gen = torch.Generator().manual_seed(0)
    omega = torch.randn(d.shape[1], k, dtype=torch.float64, generator=gen)
    q = torch.linalg.qr(d @ omega).Q  # (out, k)
    a = q.T @ d  # (k, in)
    missed = float((d - q @ a).square().sum())  # orthogonal to range(Q)
    b_r, a_r, left, _norm = compress(q, a, rank)
    return (b_r, a_r), missed + left


def compress(b: Tensor, a: Tensor, k: int) -> tuple[Tensor, Tensor, float, float]:
    """Best rank-``k`` ``(B', A')`` of ``B·A``, and ``‖B·A − B'·A'‖²_F``, ``‖B·A‖²_F``.

    Exact (and returned as is) when ``B`` has no more than ``k`` columns. Otherwise
    ``B = Q_b R_b``, ``Aᵀ = Q_a R_a``, ``R_b R_aᵀ = U S Vᵀ``: the SVD of a ``(p, q)`` matrix
    with ``p, q ≤ R``, in float64; ``√S`` goes to each side.
    """
    if b.shape[1] <= k:
        # ‖B·A‖² = Σ (BᵀB) ⊙ (AAᵀ): (R, R) products, never (out, in).
        norm = float(((b.double().T @ b.double()) * (a.double() @ a.double().T)).sum())
        return b, a, 0.0, max(norm, 0.0)
    qb, rb = torch.linalg.qr(b.double())  # (out, p), (p, R)
    qa, ra = torch.linalg.qr(a.double().T)  # (in, q), (q, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # (p, m), (m,), (m, q)
    squares = s.square()
    root = s[:k].sqrt()
    b_k = (qb @ u[:, :k]) * root  # (out, k)
    a_k = root[:, None] * (vh[:k] @ qa.T)  # (k, in)
    return b_k.float(), a_k.float(), float(squares[k:].sum()), float(squares.sum())


def top_right_singular_vectors(g: Tensor, k: int, niter: int = 4, oversample: int = 8) -> Tensor:
    """``(k, in)``: the top-``k`` right singular vectors of ``g`` (orthonormal rows).

    A full SVD costs ``O(out·in·min(out, in))``: 24 s for one 4096 × 4096 matrix on a CPU core,
    for each adapted module at every knot. For ``k`` well below ``min(out, in)`` this runs a
    randomized subspace iteration instead (Halko, Martinsson and Tropp, 2011): a Gaussian start
    of ``l`` columns (``k + oversample`` rounded up to a multiple of 8) from a fixed seed, so
    every process gets the same answer for the same ``g``; ``niter`` power iterations
    re-orthonormalised by QR; then the SVD of the ``(out, l)`` projection. That costs
    ``O(out·in·l·(2·niter + 1))``. It is exact when ``g`` has rank at most ``l`` (a gradient
    summed over that few tokens), and otherwise converges as ``(σ_{l+1}/σ_k)^(2·niter+1)``.
    Small matrices (``min(out, in) ≤ 2·l``) take the full SVD.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> g = torch.randn(300, 8, generator=gen) @ torch.randn(8, 200, generator=gen)  # rank 8
        >>> v = top_right_singular_vectors(g, 2)
        >>> exact = torch.linalg.svd(g, full_matrices=False).Vh[:2]
        >>> bool(torch.allclose((v @ exact.T).abs().sum(1), torch.ones(2), atol=1e-4))
        True
    """
    m, n = g.shape
    # rounded up to a multiple of 8: a CPU matmul with 9 columns is ~10x slower than with 16
    width = min(-(-(k + oversample) // 8) * 8, m, n)
    if 2 * width >= min(m, n):
        exact: Tensor = torch.linalg.svd(g, full_matrices=False).Vh[:k]
        return exact
    gen = torch.Generator(device=g.device).manual_seed(0)
    omega = torch.randn(m, width, generator=gen, dtype=g.dtype, device=g.device)
    q = torch.linalg.qr(g.T @ omega).Q  # (in, l): the range of gᵀ, i.e. g's row space
    for _ in range(niter):
        q = torch.linalg.qr(g @ q).Q  # (out, l)
        q = torch.linalg.qr(g.T @ q).Q  # (in, l)
    # g ≈ (g·Q)·Qᵀ = U·S·(Vhᵀ·Qᵀ)ᵀ: the right singular vectors of g are the rows of Vh·Qᵀ
    vh: Tensor = torch.linalg.svd(g @ q, full_matrices=False).Vh
    top: Tensor = (vh @ q.T)[:k]
    return top
