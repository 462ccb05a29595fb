"""One writer per folder: a second lock is refused naming the holder; a dead holder's lock is
free again (the kernel drops it)."""

import os
import subprocess
import sys

import pytest

from numpyro_ebm._io import FolderLockedError, folder_lock


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
