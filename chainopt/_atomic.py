"""Writing a file atomically: a locked temporary file beside it, fsync, rename, fsync the dir.

A process killed at any moment leaves the previous file or the new one, never a torn file; at
worst a stray ``.<name>.<random>.tmp``, which the next successful write removes. Concurrent
writers to one path never remove each other's temporary files: each holds an exclusive
``flock`` on its own until it is renamed, and only unlocked ones (their writer is gone) are
cleaned. The new file keeps the mode of the one it replaces. Every failure to write (a full
disk, a file-size limit) surfaces as the ``OSError`` the system gave, with ``path`` unchanged.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "x.bin"
    >>> write_atomically(path, lambda f: f.write(b"hello"))
    >>> path.read_bytes()
    b'hello'
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

try:  # POSIX: advisory locks tell a live writer's temporary file from a dead one's
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["write_atomically"]

_TOKEN_BYTES = 6  # a temporary file is ``.<name>.<12 hex digits>.tmp``


class _RecordingFile:
    """A binary file whose ``write`` remembers the ``OSError`` it raised.

    ``torch.save`` turns an error of the file it writes into a ``RuntimeError`` (from its zip
    writer); the original error is raised from it instead.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def write_atomically(path: Path, write: Callable[[Any], object]) -> None:
    """Call ``write(file)`` on a temporary file, then put it at ``path`` atomically.

    Raises:
        OSError: the file could not be written; ``path`` is as it was.
    """
    directory = path.parent
    mode = _existing_mode(path)
    raw, tmp = _locked_temporary(path)
    try:
        with raw:
            f = _RecordingFile(raw)
            try:
                write(f)
                raw.flush()
                os.fsync(raw.fileno())
            except Exception as err:
                if f.error is not None and f.error is not err:
                    raise f.error from err
                raise
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, path)  # still locked: no cleaner takes it for a dead writer's
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)
    _remove_stale_temporaries(path)


def _locked_temporary(path: Path) -> tuple[IO[bytes], Path]:
    """A new temporary file next to ``path``, open and locked (``flock``) by this process.

    Between creating a file and locking it, a cleaner may take it for a dead writer's and remove
    it: the lock is then on a file no longer at that name, so try again under a new name.
    """
    for _ in range(8):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(_TOKEN_BYTES)}.tmp"
        raw = open(tmp, "xb")  # noqa: SIM115 - closed by the caller
        if fcntl is None:  # pragma: no cover - Windows: no cleaner removes others' files
            return raw, tmp
        fcntl.flock(raw.fileno(), fcntl.LOCK_EX)
        try:
            if os.stat(tmp).st_ino == os.fstat(raw.fileno()).st_ino:
                return raw, tmp
        except FileNotFoundError:
            pass
        raw.close()
    raise OSError(f"could not create a temporary file next to {str(path)!r}")


def _existing_mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporary files of writes to ``path`` whose writer is gone (each as big as a save)."""
    if fcntl is None:  # pragma: no cover - no way to tell a live writer's file: leave them
        return
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if pattern.fullmatch(entry.name):
                _remove_if_abandoned(entry.path)


def _remove_if_abandoned(name: str) -> None:
    try:
        fd = os.open(name, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live writer holds it: OSError
        os.unlink(name)
    except OSError:
        return
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); best effort where directories cannot be synced."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
