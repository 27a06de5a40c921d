"""The workdir lock: one holder, a named refusal, stale-lock takeover, release of its own lock only.

The two-process case, end to end, is in tests/test_main.py.
"""

import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from jaxdpdm.workdir_lock import LOCK_NAME, WorkdirLock, WorkdirLockedError


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_holder(workdir, **holder):
    (workdir / LOCK_NAME).write_text(json.dumps(holder))


def test_a_second_holder_is_refused_with_the_holders_identity(tmp_path):
    with WorkdirLock(str(tmp_path)) as first:
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(WorkdirLockedError) as info:
            WorkdirLock(str(tmp_path)).acquire()
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert record["started"] in message and "\n" not in message
        assert first.held
    assert not (tmp_path / LOCK_NAME).exists()  # released on leaving the block
    WorkdirLock(str(tmp_path)).acquire().release()  # and can be taken again


def test_a_stale_lock_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    _write_holder(tmp_path, pid=_dead_pid(), host=socket.gethostname(), started="earlier")
    with caplog.at_level(logging.WARNING, logger="jaxdpdm.workdir_lock"):
        lock = WorkdirLock(str(tmp_path)).acquire()
    assert "stale" in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_lock_held_on_another_host_is_never_taken_over(tmp_path):
    # Liveness cannot be checked across hosts: a dead pid there still refuses.
    _write_holder(tmp_path, pid=_dead_pid(), host="some-other-host", started="earlier")
    with pytest.raises(WorkdirLockedError, match="some-other-host"):
        WorkdirLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "some-other-host"


def test_release_leaves_a_lock_that_is_not_its_own(tmp_path):
    lock = WorkdirLock(str(tmp_path)).acquire()
    _write_holder(tmp_path, pid=1, host="someone-else", started="later")  # e.g. removed by hand,
    lock.release()                                                       # then retaken
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "someone-else"
