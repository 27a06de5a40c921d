"""One training process per workdir: a lock file naming its holder.

Two processes training in one workdir would make two independently noised releases of the same
data, each reporting the full budget, and overwrite each other's checkpoints. The trainer takes
`WORKDIR/.jaxdpdm.lock` (JSON: pid, host, start time, command line) before it writes anything a
run depends on, and removes it when it ends: on return, on an exception, on Ctrl-C and on SIGTERM.

* Local disks: the file is created with `O_CREAT | O_EXCL`, which is atomic, so exactly one of
  two simultaneous starts wins. A lock whose holder ran on this host and no longer exists (a
  `kill -9`, a power cut) is stale: it is taken over with a warning. (Two starts taking over
  the same stale lock at the same instant are not told apart: the window is one unlink.)
  A lock held by this very process (a `Trainer` that was built but never run or released, e.g.
  in a notebook) is taken over with a warning too.
* Object stores (`gs://...`): there is no exclusive create through the file API, so the lock is
  best-effort: it is checked, then written, and a start racing another one within that window can
  slip through. Staleness cannot be checked from another host either: a lock left by a dead
  process must be deleted by hand (the error names the file). Start one job per workdir.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
import signal
import socket
import sys

from etils import epath

from jaxdpdm import storage

log = logging.getLogger(__name__)

LOCK_NAME = ".jaxdpdm.lock"


class WorkdirLockedError(ValueError):
    """Another live process holds the workdir."""


def _holder_text(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r}, started "
            f"{holder.get('started')}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """An exclusive lock on `workdir`; `acquire()` raises `WorkdirLockedError` when it is held."""

    def __init__(self, workdir: str):
        self.workdir = storage.normalize(workdir)
        self.path = storage.join(self.workdir, LOCK_NAME)
        self._record = {
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "token": secrets.token_hex(8)
        }
        self.held = False
        self._previous_sigterm = None

    def acquire(self) -> "WorkdirLock":
        if storage.is_remote(self.path):
            self._acquire_remote()
        else:
            self._acquire_local()
        self.held = True
        self._exit_on_sigterm()
        return self

    def release(self) -> None:
        """Removes the lock file if it is still this process's (idempotent)."""
        if not self.held:
            return
        self.held = False
        self._restore_sigterm()
        try:
            if self._read() == self._record:
                epath.Path(self.path).unlink()
        except OSError as e:  # never mask the exception that ended the run
            log.warning("could not remove the workdir lock %s: %s", self.path, e)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()

    # --- internals -----------------------------------------------------------------------------

    def _read(self) -> dict | None:
        try:
            if not storage.exists(self.path):
                return None
            return json.loads(storage.read_text(self.path))
        except FileNotFoundError:  # removed since the check
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: someone holds it

    def _refuse(self, holder: dict):
        raise WorkdirLockedError(
            f"workdir {self.workdir} is in use by {_holder_text(holder)} (lock file "
            f"{self.path}); one run per workdir. If that process is gone, delete the lock file")

    def _acquire_local(self) -> None:
        payload = (json.dumps(self._record) + "\n").encode()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # released between our create and our read: try again
                    continue
                if holder.get("host") == self._record["host"] and isinstance(
                        holder.get("pid"), int) and (holder["pid"] == os.getpid() or
                                                     not _pid_alive(holder["pid"])):
                    log.warning(
                        "taking over the workdir lock of %s (%s)", _holder_text(holder),
                        "this process"
                        if holder["pid"] == os.getpid() else "stale: no such process")
                    os.remove(self.path)
                    continue
                self._refuse(holder)
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
            return
        self._refuse(self._read() or {})

    def _acquire_remote(self) -> None:
        holder = self._read()
        if holder is not None:
            self._refuse(holder)
        log.info(
            "workdir lock %s: best-effort on an object store (check, then write; not "
            "atomic)", self.path)
        storage.write_text(self.path, json.dumps(self._record) + "\n")

    def _exit_on_sigterm(self) -> None:
        """A default-handled SIGTERM kills without cleanup; make it an exit that releases us."""
        try:
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_exit_143)
        except ValueError:  # not the main thread
            self._previous_sigterm = None

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            try:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            except ValueError:
                pass
            self._previous_sigterm = None


def _raise_exit_143(signum, frame):
    del signum, frame
    raise SystemExit(143)
