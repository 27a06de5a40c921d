"""Signals during training: a preemption flag, saves that an interrupt cannot cut, and a
test-only pause seam for deterministic signal and concurrency tests."""

from __future__ import annotations

import contextlib
import os
import signal
import time


@contextlib.contextmanager
def signals_deferred(signums=(signal.SIGINT, signal.SIGTERM)):
    """Holds `signums` while the body runs, then re-raises them for their own handlers.

    In a thread other than the main one (where handlers cannot be set) it does nothing.
    """
    held, previous = [], {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, lambda n, _: held.append(n))
    except ValueError:
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


# Test-only seam, for deterministic signal and concurrency tests: with
# JAXDPDM_TEST_PAUSE_AT="point[@step],..." and JAXDPDM_TEST_PAUSE_DIR=<dir>, the trainer creates
# `<dir>/<point>.reached` at each named point and waits there until `<dir>/<point>.go` exists.
# Points: "locked" (workdir lock taken), "checkpoint_write@<step>" (inside the save of that
# step, signals held). Unset: a no-op. Used by tests/test_main.py.
_PAUSE_ENV, _PAUSE_DIR_ENV = "JAXDPDM_TEST_PAUSE_AT", "JAXDPDM_TEST_PAUSE_DIR"


def pause_for_tests(point: str, step: int | None = None) -> None:
    wanted = os.environ.get(_PAUSE_ENV)
    if not wanted:
        return
    name = point if step is None else f"{point}@{step}"
    if name not in wanted.split(","):
        return
    directory = os.environ[_PAUSE_DIR_ENV]
    with open(os.path.join(directory, f"{point}.reached"), "w") as f:
        f.write(str(os.getpid()))
    while not os.path.exists(os.path.join(directory, f"{point}.go")):
        time.sleep(0.01)


class SignalFlag:
    """Records a signal instead of dying of it, so the loop can stop between two steps."""

    def __init__(self, signum: int):
        self.raised = False
        self._signum = signum
        try:
            self._previous = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: leave the default behaviour alone
            self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.raised = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(self._signum, self._previous)
