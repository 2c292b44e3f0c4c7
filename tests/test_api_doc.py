"""docs/api.md is generated from the docstrings and must be current."""

from __future__ import annotations

import importlib.util
import inspect
import re
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


def test_every_public_class_and_function_has_a_google_docstring_with_a_runnable_example() -> None:
    """An ``Example:`` section with doctest lines (``--doctest-modules`` runs them), and no
    ``Args:`` section that misses an argument of the signature."""
    lacking, undocumented = [], []
    for name in chainopt.__all__:
        obj = getattr(chainopt, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # type aliases: documented where they are defined
        doc = inspect.getdoc(obj) or ""
        if "Example:" not in doc or ">>> " not in doc.split("Example:", 1)[1]:
            lacking.append(name)
        if "Args:" in doc:
            target = obj.__init__ if inspect.isclass(obj) else obj
            args = [p for p in inspect.signature(target).parameters if p not in ("self", "cls")]
            section = doc.split("Args:", 1)[1]
            undocumented += [f"{name}({a})" for a in args
                             if not re.search(rf"^\s+\**{a}( \(|:)", section, re.M)]  # fmt: skip
    assert lacking == [] and undocumented == []


def test_each_public_modules_all_is_what_chainopt_re_exports() -> None:
    """Each public module's ``__all__`` says it lists the names chainopt re-exports."""
    import importlib
    import pkgutil

    extra = {}
    for info in pkgutil.iter_modules(chainopt.__path__):
        if info.name.startswith("_") or info.ispkg:
            continue
        module = importlib.import_module(f"chainopt.{info.name}")
        names = set(getattr(module, "__all__", ())) - set(chainopt.__all__)
        if names:
            extra[info.name] = sorted(names)
    assert extra == {}


def test_every_chainopt_type_in_a_public_signature_is_exported() -> None:
    """A user can import every chainopt type that a public signature names."""
    names = set(chainopt.__all__)
    leaks = set()
    for public in chainopt.__all__:
        obj = getattr(chainopt, public)
        members = [obj] + (
            [m for a, m in vars(obj).items() if callable(m) and not a.startswith("_")]
            if inspect.isclass(obj)
            else []
        )
        for member in members:
            try:
                sig = inspect.signature(member)
            except (TypeError, ValueError):
                continue
            home = importlib.import_module(getattr(member, "__module__", "chainopt"))
            annotations = [str(p.annotation) for p in sig.parameters.values()]
            for text in [*annotations, str(sig.return_annotation)]:
                for token in re.findall(r"\b[A-Z]\w*", text):
                    defined = getattr(home, token, None)
                    origin = getattr(defined, "__module__", "") or ""
                    ours = (defined is not None and origin.startswith("chainopt")) or (
                        token in vars(home) and token.endswith(("Policy", "Spec", "Hook"))
                    )
                    if ours and token not in names:
                        leaks.add(f"{public}: {token}")
    assert sorted(leaks) == []


def test_api_doc_renders_only_the_public_surface() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    headings = re.findall(r"^### `([^`(]+)", text, flags=re.M)
    public = {f"chainopt.{n}" for n in chainopt.__all__}
    integration = [h for h in headings if not h.startswith("chainopt.")]
    assert {h for h in headings if h.startswith("chainopt.")} <= public
    assert "chainopt.ChainLoRAOptimizer" in headings and integration  # integrations too
    for private in ("copy_full_", "shard_like", "restart_links", "GradientInit"):
        assert private not in headings
