"""Shared test setup: offline Hugging Face, a deterministic hypothesis profile, tiny models."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "chainopt",
    deadline=None,
    max_examples=25,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", parent=settings.get_profile("chainopt"), max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "chainopt"))

# One thread: tiny models gain nothing from more, and a loaded machine slows threads badly.
torch.set_num_threads(1)


# Which tests are slow or fork processes, by file (whole module) or by test name; the fast
# suite is `pytest -m "not slow and not multiprocess"` (docs/contributing.md).
MARKS: dict[str, tuple[str, ...]] = {
    "test_examples.py": ("slow",),
    "test_bench.py": ("slow",),
    "test_experiment_rank_bound.py": ("slow",),
    "test_distributed.py": ("multiprocess",),
    "test_deepspeed.py": ("multiprocess",),
    "test_faults.py::test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run": (
        "multiprocess",
    ),
    "test_checkpoint.py::test_concurrent_savers_never_remove_each_others_files": ("multiprocess",),
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the markers of :data:`MARKS` on the tests they name."""
    for item in items:
        file = item.path.name
        test = f"{file}::{item.originalname}" if isinstance(item, pytest.Function) else file
        for marker in (*MARKS.get(file, ()), *MARKS.get(test, ())):
            item.add_marker(marker)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def accelerate_state() -> Iterator[None]:
    """Accelerate keeps process-wide singletons: start and leave each test with fresh ones."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
