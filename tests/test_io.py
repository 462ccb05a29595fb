"""One writer per folder: a second lock is refused naming the holder; a dead holder's lock is
free again (the kernel drops it)."""

import contextlib
import fcntl
import os
import subprocess
import sys

import pytest

from numpyro_ebm import _io
from numpyro_ebm._io import FolderLockedError, atomic_write, folder_lock


def test_second_lock_is_refused_with_the_holders_pid(tmp_path):
    with folder_lock(tmp_path):
        with pytest.raises(FolderLockedError, match=f"process {os.getpid()}") as info:
            with folder_lock(tmp_path):
                pass
        assert info.value.pid == os.getpid()
    with folder_lock(tmp_path):  # released after the block
        pass


def test_lock_of_a_killed_process_is_not_stale(tmp_path):
    code = (
        "import os, sys\n"
        "from numpyro_ebm._io import folder_lock\n"
        "with folder_lock(sys.argv[1]):\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    assert proc.returncode == -9
    assert (tmp_path / ".lock").exists()  # the file stays, the lock does not
    with folder_lock(tmp_path):
        pass


def test_a_lock_taken_on_a_file_its_holder_removed_is_taken_again(tmp_path, monkeypatch):
    # B opens .lock; before B locks it, the holder A removes it and exits (as `train` does when
    # it cleans up a run that never started). B then locks a removed file: without a check, a
    # third writer C makes a new .lock, locks it too, and two writers share the folder.
    holder = contextlib.ExitStack()
    holder.enter_context(folder_lock(tmp_path))
    flock = fcntl.flock

    def holder_leaves_first(fd, operation):
        if holder._exit_callbacks:
            os.remove(tmp_path / ".lock")
            holder.close()
        return flock(fd, operation)

    monkeypatch.setattr(_io.fcntl, "flock", holder_leaves_first)
    with folder_lock(tmp_path):  # B
        monkeypatch.setattr(_io.fcntl, "flock", flock)
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"  # B's, in the folder
        with pytest.raises(FolderLockedError):
            with folder_lock(tmp_path):  # C
                pass


def test_an_atomic_write_keeps_the_permissions_of_the_file_it_replaces(tmp_path):
    private = tmp_path / "private.json"
    private.write_text("{}")
    os.chmod(private, 0o600)
    atomic_write(private, lambda f: f.write(b'{"a": 1}'))
    assert private.read_bytes() == b'{"a": 1}' and (private.stat().st_mode & 0o777) == 0o600
    fresh = tmp_path / "fresh.json"
    atomic_write(fresh, lambda f: f.write(b"{}"))
    umask = os.umask(0)
    os.umask(umask)
    assert (fresh.stat().st_mode & 0o777) == 0o666 & ~umask


def test_an_atomic_write_writes_through_a_symbolic_link(tmp_path):
    (tmp_path / "shared").mkdir()
    target = tmp_path / "shared" / "report.md"
    target.write_text("old")
    link = tmp_path / "report.md"
    link.symlink_to(target)
    atomic_write(link, lambda f: f.write(b"new"))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path / "shared")) == ["report.md"]  # no temporary file left
