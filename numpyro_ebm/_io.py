"""Files on disk: one writer per folder.

``folder_lock`` is written by hand: the standard library has ``fcntl.flock`` but no context
manager that also reports who holds the lock, and no dependency we use provides one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator

__all__ = ["LOCK_FILE", "FolderLockedError", "folder_lock"]

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
    never stale: the next writer simply takes it. The file itself is left in place (removing it
    would race with a writer that has just opened it).

    Raises:
        FolderLockedError: another process (or another ``folder_lock`` in this one) holds it.
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise FolderLockedError(folder, _read_pid(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
