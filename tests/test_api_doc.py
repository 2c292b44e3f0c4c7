"""docs/api.md is generated from the docstrings and must be current."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import chainopt

ROOT = Path(__file__).resolve().parents[1]


def _render() -> str:
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "scripts" / "gen_api.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.render())


def test_api_doc_is_current() -> None:
    assert (ROOT / "docs" / "api.md").read_text() == _render(), (
        "docs/api.md is stale: run python scripts/gen_api.py"
    )


def test_every_public_name_has_a_docstring() -> None:
    objects = {n: getattr(chainopt, n) for n in chainopt.__all__}
    documented = [o for o in objects.values() if inspect.isclass(o) or inspect.isfunction(o)]
    assert len(documented) >= 15
    missing = [n for n, o in objects.items() if o in documented and not (o.__doc__ or "").strip()]
    assert missing == []
