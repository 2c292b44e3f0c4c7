"""The low-rank helpers: the randomized top singular vectors behind ``init="gradient"``."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chainopt._lowrank import top_right_singular_vectors


def _low_rank(out: int, inp: int, rank: int, seed: int, decay: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = decay ** torch.arange(rank, dtype=torch.float32)
    return (torch.randn(out, rank, generator=gen) * scale) @ torch.randn(rank, inp, generator=gen)


@settings(deadline=None, max_examples=25)
@given(st.integers(40, 160), st.integers(40, 160), st.integers(1, 8), st.data())
def test_exact_when_the_matrix_has_rank_at_most_k_plus_oversample(
    out: int, inp: int, k: int, data: st.DataObject
) -> None:
    """A gradient of few tokens has low rank: then the randomized path is the SVD's answer."""
    rank = data.draw(st.integers(k, k + 8))
    g = _low_rank(out, inp, rank, seed=out * 1000 + inp * 10 + k, decay=0.7)
    v = top_right_singular_vectors(g, k)
    exact = torch.linalg.svd(g.double(), full_matrices=False).Vh[:k].float()
    assert v.shape == (k, inp)
    torch.testing.assert_close(v @ v.T, torch.eye(k), atol=1e-5, rtol=0)  # orthonormal rows
    # each row is the matching singular vector up to sign (the singular values are distinct)
    torch.testing.assert_close((v * exact).sum(1).abs(), torch.ones(k), atol=1e-4, rtol=0)


def test_full_rank_gradient_with_a_decaying_spectrum_captures_the_top_subspace() -> None:
    """Beyond rank k + oversample the power iterations converge: it captures the SVD's energy."""
    gen = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(300, 200, generator=gen)).Q
    w = torch.linalg.qr(torch.randn(200, 200, generator=gen)).Q
    s = 1.0 / torch.arange(1, 201, dtype=torch.float32)  # σ_k = 1/k: full rank
    g = (u * s) @ w.T
    for k in (1, 4, 8):
        v = top_right_singular_vectors(g, k)
        captured = (g @ v.T).square().sum() / s[:k].square().sum()
        assert abs(captured - 1) < 1e-5, (k, captured)  # 1 power iteration: 1 - 1e-3


def test_small_matrices_take_the_full_svd_and_every_call_is_deterministic() -> None:
    gen = torch.Generator().manual_seed(4)
    small = torch.randn(12, 9, generator=gen)  # flat spectrum: only an SVD gets it exactly
    v = top_right_singular_vectors(small, 3)
    torch.testing.assert_close(v, torch.linalg.svd(small, full_matrices=False).Vh[:3])
    big = torch.randn(120, 90, generator=gen)
    torch.manual_seed(0)
    first = top_right_singular_vectors(big, 2)
    torch.manual_seed(1)  # the global RNG plays no part: every process draws the same A
    assert torch.equal(first, top_right_singular_vectors(big, 2))
