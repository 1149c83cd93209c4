"""fqat_tf.rundir: atomic writes, and the lock that parallel runs sharing an ERM stage wait on."""
import fcntl
import os
import stat
import subprocess
import sys

import pytest

from fqat_tf import rundir

HOLDER = """\
import sys, time
from fqat_tf import rundir
with rundir.exclusive(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""


def _try_lock(path):
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


@pytest.mark.parametrize("finish", ["leave", "kill"])
def test_exclusive_blocks_other_processes_until_released_or_killed(tmp_path, finish):
    lock = str(tmp_path / "cache" / "abc.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, lock], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not _try_lock(lock)
        if finish == "leave":
            holder.stdin.write("\n")
            holder.stdin.flush()
        else:
            holder.kill()
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert _try_lock(lock)
    with rundir.exclusive(lock):
        # flock locks belong to the open file, so even this process's second open is refused.
        assert not _try_lock(lock)
    assert _try_lock(lock)


def test_atomic_write_leaves_no_temporary_and_plain_permissions(tmp_path):
    path = tmp_path / "sub" / "results.json"
    rundir.write_json(str(path), {"a": 1})
    assert rundir.read_json(str(path)) == {"a": 1}
    assert os.listdir(path.parent) == ["results.json"]
    old = os.umask(0o022)
    try:
        rundir.atomic_write(str(path), b"x", mode="wb")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    with pytest.raises(TypeError):
        rundir.atomic_write(str(path), 123)  # a write that fails midway

    assert os.listdir(path.parent) == ["results.json"] and path.read_bytes() == b"x"
