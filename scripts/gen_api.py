"""Write docs/api.md from the docstrings of chainopt's public API.

Run ``python scripts/gen_api.py`` after changing a public docstring; ``tests/test_api_doc.py``
fails while docs/api.md is out of date.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

INTEGRATIONS = [
    "chainopt.integrations.transformers",
    "chainopt.integrations.lightning",
    "chainopt.integrations.deepspeed",
]
"""Integration modules (each imports its framework); rendered when the framework is installed."""
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
sys.path.insert(0, str(ROOT))  # this checkout's chainopt, not whichever one is installed


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
        # members of the class and of chainopt's own (private) bases, most derived first
        own = [c for c in obj.__mro__ if c.__module__.startswith("chainopt")]
        members: dict[str, object] = {}
        for cls in reversed(own):
            members.update(vars(cls))
        for attr, member in members.items():
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
    """The whole page: ``chainopt.__all__``, grouped by the module that defines each name, then
    the integrations."""
    import chainopt

    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python scripts/gen_api.py`; do not edit by hand.",
        "",
        "## `chainopt`",
        "",
        inspect.getdoc(chainopt) or "",
        "",
        "Public names: " + ", ".join(f"`{n}`" for n in chainopt.__all__),
        "",
    ]
    by_module: dict[str, list[str]] = {}
    for name in chainopt.__all__:
        obj = getattr(chainopt, name)
        home = getattr(obj, "__module__", None) or "chainopt"
        if not str(home).startswith("chainopt"):  # a type alias: typing's own object
            home = next(
                m for m, mod in sorted(sys.modules.items())
                if m.startswith("chainopt.") and getattr(mod, name, None) is obj
            )  # fmt: skip
        by_module.setdefault(str(home), []).append(name)
    for home, names in by_module.items():
        module = importlib.import_module(home)
        summary = (inspect.getdoc(module) or "").split("\n\n")[0]
        lines += [f"## from `{home}`", "", summary, ""]
        for name in names:
            lines += _entry(f"chainopt.{name}", getattr(chainopt, name), "###")
    for modname in INTEGRATIONS:
        try:
            module = importlib.import_module(modname)
        except ImportError:
            continue
        lines += [f"## `{modname}`", "", inspect.getdoc(module) or "", ""]
        for name in getattr(module, "__all__", []):
            lines += _entry(name, getattr(module, name), "###")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
