"""Writing a file atomically: a locked temporary file beside it, fsync, rename, fsync the dir.

A process killed at any moment leaves the previous file or the new one, never a torn file; at
worst a stray ``.<name>.<random>.tmp`` (``.<hash of name>.<random>.tmp`` for a name too long to
take the suffix), which the next successful write removes. Concurrent writers to one path never
remove each other's temporary files: each holds an exclusive ``flock`` on its own until it is
renamed, and only unlocked regular files (their writer is gone) are cleaned; anything else under
such a name (a FIFO, a link, a directory) is never opened and left alone. A temporary file is
created readable by its owner only (``0600``), whatever it will hold; the new file then takes the
mode of the one it replaces, or the one the umask gives a new file. Every failure to write (a full
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
import hashlib
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
_NAME_MAX = 255  # bytes in one file name (POSIX file systems; asked of the directory when it can)


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
    if mode is None:
        mode = 0o666 & ~_umask()
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
    stem = _temporary_stem(path)
    for _ in range(8):
        tmp = path.parent / f".{stem}.{secrets.token_hex(_TOKEN_BYTES)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        raw = open(fd, "wb")  # noqa: SIM115 - closed by the caller
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


def _temporary_stem(path: Path) -> str:
    """``path``'s name, or a short hash of it where the temporary name would be too long."""
    try:
        name_max = int(os.pathconf(path.parent, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):
        name_max = _NAME_MAX
    suffix = 2 + 2 * _TOKEN_BYTES + len(".tmp")  # the leading dot, ".<token>", ".tmp"
    if len(os.fsencode(path.name)) + suffix <= name_max:
        return path.name
    return hashlib.sha256(os.fsencode(path.name)).hexdigest()[:32]


def _umask() -> int:
    """The process's umask: from ``/proc`` where it is there, else set and put back at once."""
    with (
        contextlib.suppress(OSError, ValueError),
        open("/proc/self/status", encoding="ascii", errors="replace") as status,
    ):
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _existing_mode(path: Path) -> int | None:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporary files of writes to ``path`` whose writer is gone (each as big as a save)."""
    if fcntl is None:  # pragma: no cover - no way to tell a live writer's file: leave them
        return
    stem = re.escape(_temporary_stem(path))
    pattern = re.compile(rf"\.{stem}\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.scandir(path.parent):
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                _remove_if_abandoned(entry.path)


def _remove_if_abandoned(name: str) -> None:
    """Remove ``name`` if it is a regular file no writer holds locked.

    Never blocks: opened without following links and non-blocking (a FIFO put there since the
    directory was read would otherwise wait for a writer forever), and left alone unless what
    was opened is a regular file.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(name, flags)
    except OSError:
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
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
