"""Files on disk: atomic writes and one writer per folder.

``atomic_write`` and ``folder_lock`` are written by hand: the standard library has
``os.replace`` and ``fcntl.flock`` but no helper that fsyncs the file and its folder around the
rename, nor a lock that reports who holds it, and no dependency we use provides one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "LOCK_FILE",
    "FolderLockedError",
    "atomic_write",
    "folder_lock",
    "fsync_folder",
    "write_synced",
]

LOCK_FILE = ".lock"


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock. ``pid`` is its process id (None if it
    could not be read)."""

    def __init__(self, folder: str, pid: int | None):
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"{folder} is in use by {holder} (a second writer would mix two runs); wait for it "
            "to finish or stop it, or write to another folder"
        )
        self.folder = folder
        self.pid = pid


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (which must exist) for the ``with`` block.

    The lock is ``fcntl.flock`` on ``folder/.lock``, which holds the owner's pid. The kernel
    releases it when the owner exits, however it exits, so a lock left by a killed process is
    never stale: the next writer simply takes it. The holder may remove the file (or the
    folder) while it holds the lock: a writer that opened the file just before then, and so
    locks a file no longer in the folder, sees that and takes the lock again on the file now
    there.

    Raises:
        FolderLockedError: another process (or another ``folder_lock`` in this one) holds it.
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            pid = _read_pid(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise FolderLockedError(folder, pid) from None
        if _is_open_file(fd, path):
            break
        os.close(fd)  # locked a removed file: the lock is on the file now at ``path``
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _is_open_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None


def fsync_folder(folder: str) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[Any], None],
    mode: str = "wb",
    prefix: str = ".tmp-",
    suffix: str = "",
) -> None:
    """Write ``path`` all or nothing: ``write(f)`` fills a temporary file (``prefix`` + random
    + ``suffix``) in the same folder, which is fsynced and renamed over ``path``; then the
    folder is fsynced. On any error the temporary file is removed and ``path`` is untouched.
    A file it replaces keeps its permissions; a new one gets the umask's. A symbolic link is
    written through, as ``open(path, "w")`` would: the file it points to is replaced, the link
    stays."""
    path = os.path.realpath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    umask = os.umask(0)
    os.umask(umask)
    try:
        try:
            permissions = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            permissions = 0o666 & ~umask  # mkstemp makes the file private; these are not
        os.fchmod(fd, permissions)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_folder(folder)


def write_synced(path: str, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` and fsync it (inside a folder renamed into place
    afterwards, so it needs no rename of its own)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
