"""What the three launchers share: the jaxdpdm command line, argument checks, plans and dry runs.

Standard library only: the launchers run on a laptop or a cluster login node without jax.

A launcher turns its arguments into a *plan*: a list of `Phase`s, each a titled list of argv lists
built by pure functions (so tests check them directly). `format_plan` is what `--dry-run` prints:
a `# title` line per phase, then one shell-quoted command per line (`shlex.join`), so the output
reads as a runbook and can be pasted into a shell. `run_plan` executes the same plan.
"""

from __future__ import annotations

import dataclasses
import pathlib
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MAIN_MODULE = "jaxdpdm.main"
MODES = ("train", "sample", "evaluate")

# Flags the launchers set themselves; an override naming one of them would silently fight the
# launcher (absl takes the last occurrence), so it is refused instead.
_MANAGED_FLAGS = ("--config", "--workdir", "--mode", "--multihost", "--coordinator_address",
                  "--num_processes", "--process_id")


@dataclasses.dataclass(frozen=True)
class Phase:
    """One step of a plan.

    Attributes:
        title: what the step does, printed as a `# ...` line.
        commands: argv lists, run in order; a failing command stops the plan.
        poll_until: when set, the phase has exactly one command, a status query that is re-run
            every `poll_interval_s` until its stripped stdout equals this value.
        poll_fail: stdout values of the status query that mean waiting is pointless.
    """

    title: str
    commands: tuple[tuple[str, ...], ...]
    poll_until: str | None = None
    poll_fail: tuple[str, ...] = ()

    def __post_init__(self):
        if self.poll_until is not None and len(self.commands) != 1:
            raise ValueError("a polling phase has exactly one command")


def phase(title: str, *commands: Sequence[str], poll_until: str | None = None,
          poll_fail: Sequence[str] = ()) -> Phase:
    """Builds a `Phase` from argv lists (copied into tuples so a plan is immutable)."""
    return Phase(title, tuple(tuple(c) for c in commands), poll_until, tuple(poll_fail))


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Splits `argv` at the first `--`: (launcher arguments, arguments for jaxdpdm.main)."""
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def check_overrides(overrides: Sequence[str]) -> list[str]:
    """Returns the extra jaxdpdm.main arguments, refusing the flags the launcher owns."""
    for arg in overrides:
        name = arg.split("=", 1)[0]
        if name == "--dry-run":
            # Misplaced, it would not stop the launch: refuse rather than create machines.
            raise ValueError("--dry-run after '--' would go to jaxdpdm.main; put it before '--'")
        if name in _MANAGED_FLAGS:
            raise ValueError(f"{name} is set by the launcher; pass it as a launcher option, not "
                             f"after '--' (got {arg!r})")
    return list(overrides)


def repo_config_path(config: str, repo_root: pathlib.Path = REPO_ROOT) -> str:
    """Checks `--config` and returns it relative to the repository root, in POSIX form.

    The run's working directory is the repository root (on a remote machine, the shipped copy of
    it), so the config must be a file inside the repository. ml_collections' `path.py:ARG` form
    (a `get_config(ARG)` variant) is kept.
    """
    path_part, sep, variant = config.partition(":")
    if not path_part:
        raise ValueError("--config is empty")
    path = pathlib.Path(path_part)
    absolute = (path if path.is_absolute() else pathlib.Path.cwd() / path).resolve()
    if not absolute.is_file() and not path.is_absolute():
        # Also accept a path relative to the repository when launched from elsewhere.
        absolute = (repo_root / path).resolve()
    if not absolute.is_file():
        raise ValueError(f"config file not found: {path_part}")
    try:
        relative = absolute.relative_to(repo_root.resolve())
    except ValueError:
        raise ValueError(f"config {path_part} is outside the repository {repo_root}; the run only "
                         "sees files inside it") from None
    return relative.as_posix() + sep + variant


def main_command(python: str, *, config: str, workdir: str, mode: str = "train",
                 multihost: bool = False, overrides: Sequence[str] = ()) -> list[str]:
    """The `python -m jaxdpdm.main ...` argv (one process; a multi-host run starts one per host)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    argv = [
        python, "-m", MAIN_MODULE, f"--config={config}", f"--workdir={workdir}", f"--mode={mode}"
    ]
    if multihost:
        argv.append("--multihost")
    return argv + check_overrides(overrides)


def add_run_arguments(parser, *, config_required: bool = True) -> None:
    """Adds the options every launcher passes through to jaxdpdm.main."""
    parser.add_argument("--config", required=config_required,
                        help="config file inside the repository, e.g. configs/cifar10.py")
    parser.add_argument("--workdir", help="run folder: checkpoints, logs, samples, reports")
    parser.add_argument("--mode", choices=MODES, default="train",
                        help="what jaxdpdm.main does (default: train, which resumes if it can)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands, one per line, and run nothing")


def format_plan(phases: Sequence[Phase]) -> str:
    """The dry-run text: `# title` lines and shell-quoted commands, one per line."""
    lines = []
    for step in phases:
        lines.append(f"# {step.title}")
        if step.poll_until is not None:
            lines.append(f"#   (re-run until it prints {step.poll_until})")
        lines.extend(shlex.join(argv) for argv in step.commands)
    return "\n".join(lines)


class LaunchError(RuntimeError):
    """A command of the plan failed; carries the exit status to leave with."""

    def __init__(self, message: str, returncode: int = 1):
        super().__init__(message)
        self.returncode = returncode


def run_plan(phases: Sequence[Phase], *, poll_interval_s: float = 30.0,
             runner: Callable[..., subprocess.CompletedProcess] = subprocess.run,
             sleep: Callable[[float], None] = time.sleep) -> None:
    """Runs a plan, echoing each command; raises `LaunchError` at the first failure."""
    for step in phases:
        print(f"# {step.title}", flush=True)
        if step.poll_until is not None:
            _poll(step, poll_interval_s=poll_interval_s, runner=runner, sleep=sleep)
            continue
        for argv in step.commands:
            print(f"+ {shlex.join(argv)}", flush=True)
            result = runner(list(argv))
            if result.returncode != 0:
                raise LaunchError(
                    f"command failed with exit status {result.returncode}: "
                    f"{shlex.join(argv)}", result.returncode)


def _poll(step: Phase, *, poll_interval_s, runner, sleep) -> None:
    argv = list(step.commands[0])
    print(f"+ {shlex.join(argv)}  (every {poll_interval_s:g} s until {step.poll_until})",
          flush=True)
    last = None
    while True:
        result = runner(argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise LaunchError(f"status query failed ({result.stderr.strip()}): {shlex.join(argv)}",
                              result.returncode)
        state = result.stdout.strip()
        if state != last:
            print(f"  state: {state or '(empty)'}", flush=True)
            last = state
        if state == step.poll_until:
            return
        if state in step.poll_fail:
            raise LaunchError(f"gave up waiting: state is {state}")
        sleep(poll_interval_s)


def exit_on_launch_error(run: Callable[[], None]) -> int:
    """Runs `run()`; a `LaunchError` becomes one `error: ...` line and its exit status."""
    try:
        run()
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.returncode
    return 0
