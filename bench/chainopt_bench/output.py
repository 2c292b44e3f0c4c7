"""What the benchmarks write: Markdown tables, MiB, and JSON with every figure.

Example:
    >>> print(markdown_table(["a", "bb"], [[1, 2]]))
    | a | bb |
    |---|----|
    | 1 | 2  |
    >>> mib(3 * 2**20)
    3.0
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

__all__ = ["markdown_table", "mib", "save_json"]


def mib(n: float) -> float:
    """Bytes in MiB."""
    return n / 2**20


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table with padded columns.

    Args:
        headers: The column names.
        rows: The rows, one cell per column (``str()`` of each).

    Returns:
        The table, one line per row.
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def save_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (dataclasses as dicts, paths as strings).

    Args:
        path: The file to write; its folder is created.
        payload: What to write.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)
