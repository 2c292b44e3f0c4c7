"""Hypothesis strategies shared by the property tests: small shapes, valid ranks, dtypes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@dataclass(frozen=True)
class LinearCase:
    """A Linear layer's shape with a rank that fits it, an alpha and a dtype."""

    in_features: int
    out_features: int
    rank: int
    alpha: float
    dtype: torch.dtype
    bias: bool


@st.composite
def linear_cases(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = DTYPES) -> LinearCase:
    """A Linear shape and a rank in ``1..min(in, out)`` (built in, not filtered)."""
    in_features = draw(st.integers(1, 24))
    out_features = draw(st.integers(1, 24))
    rank = draw(st.integers(1, min(in_features, out_features)))
    alpha = draw(st.sampled_from([0.5, 1.0, 2.0, 8.0, 16.0, 32.0]))
    dtype = draw(st.sampled_from(dtypes))
    bias = draw(st.booleans())
    return LinearCase(in_features, out_features, rank, alpha, dtype, bias)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``assert_close`` tolerances for results computed in ``dtype``."""
    return {
        torch.float64: {"rtol": 1e-10, "atol": 1e-10},
        torch.float32: {"rtol": 1e-5, "atol": 1e-5},
        torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
        torch.float16: {"rtol": 2e-3, "atol": 2e-3},
    }[dtype]


schedules = st.one_of(
    st.builds(lambda n: {"knot_every": n}, st.integers(1, 5)),
    st.lists(st.integers(1, 12), min_size=1, max_size=4, unique=True).map(
        lambda ks: {"knots": sorted(ks)}
    ),
)
"""Keyword arguments for a knot schedule."""
