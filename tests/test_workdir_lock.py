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


def test_a_live_holder_is_refused_with_its_identity(tmp_path):
    with WorkdirLock(str(tmp_path)):
        record = json.loads((tmp_path / LOCK_NAME).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert not (tmp_path / LOCK_NAME).exists()  # released on leaving the block
    # Another live process on this host (our parent) holds it.
    _write_holder(tmp_path, pid=os.getppid(), host=socket.gethostname(), started="12:00 UTC")
    with pytest.raises(WorkdirLockedError) as info:
        WorkdirLock(str(tmp_path)).acquire()
    message = str(info.value)
    assert f"pid {os.getppid()} on host {socket.gethostname()!r}, started 12:00 UTC" in message
    assert "\n" not in message


def test_this_process_takes_over_its_own_unreleased_lock(tmp_path, caplog):
    first = WorkdirLock(str(tmp_path)).acquire()  # e.g. a Trainer built but never run
    with caplog.at_level(logging.WARNING, logger="jaxdpdm.workdir_lock"):
        second = WorkdirLock(str(tmp_path)).acquire()
    assert "this process" in caplog.text
    first.release()  # the old holder's late release leaves the new lock alone
    assert (tmp_path / LOCK_NAME).exists()
    second.release()
    assert not (tmp_path / LOCK_NAME).exists()


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
    lock.release()  # then retaken
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "someone-else"
