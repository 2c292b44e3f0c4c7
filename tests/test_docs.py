"""Every ```python block in README.md and docs/ runs, so the docs cannot rot.

Blocks of one page run in order in one namespace (a page may build on its earlier blocks), in a
temporary working directory. A block preceded by ``<!-- no-test: reason -->`` is skipped: only
for what cannot run here (a GPU, several processes, the network), and the reason says which.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(<!-- no-test: [^>]+-->\s*)?```python\n(.*?)```", re.DOTALL)


def blocks(page: Path) -> list[str]:
    """The runnable python blocks of ``page``."""
    return [code for skip, code in BLOCK.findall(page.read_text()) if not skip]


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem}"}
    for i, code in enumerate(blocks(page)):
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message says which block
            raise AssertionError(f"{page.relative_to(ROOT)} block {i} failed: {exc!r}") from exc


def test_skipped_blocks_say_why() -> None:
    for page in PAGES:
        for reason in re.findall(r"<!-- no-test: ([^>]*)-->", page.read_text()):
            assert len(reason.strip()) > 10, f"{page.name}: say why a block cannot run"
    assert os.path.exists(ROOT / "README.md")


def test_readmes_layout_map_names_every_module() -> None:
    """README's map of the package lists every module, so a reader finds each file there."""
    text = (ROOT / "README.md").read_text()
    modules = sorted(p.name for p in (ROOT / "chainopt").rglob("*.py"))
    assert [m for m in modules if f"`{m}`" not in text and f"/{m}`" not in text] == []
