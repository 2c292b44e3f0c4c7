"""Write docs/api.md from the docstrings of chainopt's public API.

Run ``python scripts/gen_api.py`` after changing a public docstring; ``tests/test_api_doc.py``
fails while docs/api.md is out of date.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

MODULES = [
    "chainopt",
    "chainopt.optimizer",
    "chainopt.lora",
    "chainopt.targets",
    "chainopt.schedule",
    "chainopt.merge",
    "chainopt.reset",
    "chainopt.init",
    "chainopt.warmup",
    "chainopt.history",
    "chainopt.export",
    "chainopt.adapter",
    "chainopt.checkpoint",
    "chainopt.integrations.transformers",
]
OUT = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""


def _entry(name: str, obj: object, level: str) -> list[str]:
    doc = inspect.getdoc(obj) or "(no docstring)"
    kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "value"
    head = f"{level} `{name}{_signature(obj) if kind != 'value' else ''}`"
    lines = [head, "", f"*{kind}*", "", "```text", doc, "```", ""]
    if inspect.isclass(obj):
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not (
                inspect.isfunction(member) or isinstance(member, property)
            ):
                continue
            target = member.fget if isinstance(member, property) else member
            mdoc = inspect.getdoc(target)
            if mdoc:
                sig = "" if isinstance(member, property) else _signature(member)
                lines += [f"- **`{attr}{sig}`**: " + mdoc.splitlines()[0]]
        lines.append("")
    return lines


def render() -> str:
    """The whole page."""
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python scripts/gen_api.py`; do not edit by hand.",
        "",
    ]
    for modname in MODULES:
        try:
            module = importlib.import_module(modname)
        except ImportError:
            continue
        lines += [f"## `{modname}`", "", inspect.getdoc(module) or "", ""]
        if modname == "chainopt":
            lines += ["Public names: " + ", ".join(f"`{n}`" for n in module.__all__), ""]
            continue
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if getattr(obj, "__module__", modname) != modname and not modname.endswith(
                "integrations.transformers"
            ):
                continue
            lines += _entry(name, obj, "###")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
