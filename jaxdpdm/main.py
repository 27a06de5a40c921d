"""Command-line entry point.

    python -m jaxdpdm.main --config=configs/quickstart.py --workdir=runs/quickstart
    python -m jaxdpdm.main --config=configs/quickstart.py --workdir=runs/quickstart --mode=sample
    python -m jaxdpdm.main --config=configs/quickstart.py --workdir=runs/quickstart --mode=evaluate
    python -m jaxdpdm.main --config=configs/quickstart.py --workdir=runs/quickstart --mode=audit

`--mode=train` (the default) trains, or resumes the run already in `--workdir`. Config fields are
overridden with `--config.FIELD=VALUE`, e.g. `--config.train.num_steps=3`.

Exit codes: 0 done; 2 a problem the user must fix, printed as one line starting with "error:"
(a bad flag, config file or value, bad data, a full disk, a read-only or unwritable path);
130 interrupted by Ctrl-C and 143 by SIGTERM (the completed steps are checkpointed: the same
command resumes); anything else is a bug.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import traceback

from absl import app, flags
from ml_collections import config_dict, config_flags


class _OptionalParser(flags.ArgumentParser):
    """`--config.FIELD=None` unsets an optional field (a placeholder, e.g. `seed`); other
    values go to the field type's own parser."""

    def __init__(self, parser: flags.ArgumentParser):
        self._parser = parser

    def parse(self, argument):
        if isinstance(argument, str) and argument.strip().lower() == "none":
            return None
        return self._parser.parse(argument)

    def flag_type(self):
        return self._parser.flag_type()


for _type, _parser in ((int, flags.IntegerParser()), (float, flags.FloatParser()),
                       (str, flags.ArgumentParser())):
    config_flags.register_flag_parser_for_type(_type, _OptionalParser(_parser))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, samples, reports.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "evaluate", "audit"],
                          "What to do; audit: a canary-audited copy of the run in WORKDIR/audit.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join a multi-host job with jax.distributed.initialize(): Cloud TPU pods "
    "and SLURM are detected automatically; elsewhere give the three flags below.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0 (multi-node GPU without SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the job.")
_ALLOW_RESTART = flags.DEFINE_bool(
    "allow_restart_spent_workdir", False, "Train from scratch in a workdir that holds traces of "
    "an earlier DP run (privacy report, grids, samples) but no checkpoint: a second release of "
    "the same data. The new privacy report states the earlier release(s).")
flags.mark_flags_as_required(["config", "workdir"])


def unset_fields_that_cannot_be_none(config, overrides: dict) -> list[str]:
    """Fields set to None on the command line that are not optional (only placeholders are)."""
    bad = []
    for path, value in overrides.items():
        if value is not None:
            continue
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        if isinstance(node, config_dict.ConfigDict) and node.get_type(leaf) is type(None):
            bad.append(path)
    return bad


def initialize_distributed() -> None:
    """Starts JAX's multi-host runtime; must run before any other JAX call."""
    explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if any(v is not None for v in explicit) and not _MULTIHOST.value:
        raise app.UsageError("--coordinator_address/--num_processes/--process_id need --multihost")
    if not _MULTIHOST.value:
        return
    import jax

    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


# errno values of write failures the user fixes outside jaxdpdm.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted"
}
# tensorstore (orbax's array writer) reports OS errors as ValueError("RESOURCE_EXHAUSTED: ...
# Failed writing: "<path>": ... [os_error_code='28']").
_TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]")
_TENSORSTORE_PATH = re.compile(r'(?:Failed writing|local file):? "([^"]+)"')
_ORBAX_TMP = re.compile(r"/(\d+)\.orbax-checkpoint-tmp(?:/.*)?$")


def _innermost_location(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def describe_config_error(error: BaseException, argv: list[str]) -> str:
    """One line for an exception raised while parsing the flags or loading the config file."""
    text = str(error)
    suggestion = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    unknown = re.search(r"(\w+)", text)  # ml_collections: the missing key, quoted
    key = (suggestion.group(2) if suggestion else unknown.group(1)) if unknown else None
    overrides = [a.lstrip("-").split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    field = next((o for o in overrides if key in o.split(".")[1:]), None)
    if isinstance(error, (AttributeError, KeyError)) and field is not None:
        line = f"unknown config field --{field}"
        if suggestion:
            parts = field.split(".")
            parts[parts.index(key, 1)] = suggestion.group(1)
            line += f" (did you mean --{'.'.join(parts)}?)"
        return line
    if isinstance(error, SyntaxError):
        return f"config file {error.filename} line {error.lineno}: {error.msg}"
    if isinstance(error, OSError) and "Failed loading config file" in text:
        reason = [line.strip() for line in text.splitlines() if line.strip()][-1]
        return f"cannot load the config file: {reason}"
    if "Error whilst parsing config file" in text:  # get_config raised; keep its last line
        flag = text.split(": Error whilst", 1)[0]
        return f"{flag}: {[line for line in text.splitlines() if line.strip()][-1].strip()}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = " ".join(lines) if len(lines) <= 2 else lines[-1]
    if isinstance(error, flags.Error):
        return message
    return f"{type(error).__name__}: {message}{_innermost_location(error)}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every failure (including the config file's) as one line, rc 2."""
    try:
        remaining = flags.FLAGS(argv)
        _CONFIG.value.get("phase")  # a config file that failed to load raises only when read
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - anything the user's config file raises
        print(f"error: {describe_config_error(e, argv)}", file=sys.stderr)
        sys.exit(2)
    return remaining


def describe_environment_error(error: BaseException, workdir: str) -> str | None:
    """One line naming the path for a failed write the user must fix (full disk, read-only
    or unwritable path), or None when `error` is not one. `workdir` is named when the error
    does not say which file failed."""
    code, path = None, None
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
        code, path = error.errno, error.filename
    elif isinstance(error, ValueError):
        found = _TENSORSTORE_OS_ERROR.search(str(error))
        if found and int(found.group(1)) in _ENVIRONMENT_ERRNOS:
            code = int(found.group(1))
            where = _TENSORSTORE_PATH.search(str(error))
            path = where.group(1) if where else None
    if code is None:
        return None
    what = "writing"
    if path is not None:
        checkpoint = _ORBAX_TMP.search(path)
        if checkpoint:  # name the checkpoint, not one of its internal files
            what = f"writing checkpoint {checkpoint.group(1)} in"
            path = path[:checkpoint.start()]
    line = f"{_ENVIRONMENT_ERRNOS[code]} {what} {path or f'--workdir {workdir}'}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        line += "; free space (or move --workdir) and run the same command again"
    return line


class _LibraryErrorEcho(logging.Filter):
    """Drops orbax's log records of errors it also raises to the caller (with their 100-line
    tracebacks), and asyncio's echo of the same errors; main reports the raised error once."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        origin = f"{record.pathname} {record.getMessage()[:2000]}"
        return "orbax" not in origin


def _configure_logging() -> None:
    logging.getLogger().setLevel(logging.INFO)
    # orbax and clu log every file they write through absl at INFO; keep the console for
    # jaxdpdm's own progress, warnings and errors.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_LibraryErrorEcho())


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    _configure_logging()
    # A quoted "~/runs/x" reaches us unexpanded; it means the home folder, not a folder named "~".
    config, workdir = _CONFIG.value, os.path.expanduser(_WORKDIR.value)
    not_optional = unset_fields_that_cannot_be_none(
        config, config_flags.get_override_values(flags.FLAGS["config"]))
    if not_optional:
        print(f"error: --config.{not_optional[0]}=None: this field cannot be unset",
              file=sys.stderr)
        return 2
    initialize_distributed()
    try:
        if _MODE.value == "train":
            from jaxdpdm.train import train
            train(config, workdir, allow_restart_spent_workdir=_ALLOW_RESTART.value)
        elif _MODE.value == "sample":
            from jaxdpdm.generate import sample_from_workdir
            sample_from_workdir(config, workdir)
        elif _MODE.value == "audit":
            from jaxdpdm.audit.run import run_audit
            run_audit(config, workdir)
        else:
            from jaxdpdm.evaluation.run import evaluate_workdir
            evaluate_workdir(config, workdir)
    except (ValueError, OSError) as e:
        # Bad configs and data, full disks and read-only paths are the user's to fix: one
        # clear line, no traceback.
        environment = describe_environment_error(e, workdir)
        if environment is None and not isinstance(e, (ValueError, FileNotFoundError)):
            raise
        print(f"error: {environment or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The trainer has already saved the completed steps (a save in progress is finished).
        print(
            "interrupted: the completed steps are checkpointed; rerun the same command to "
            "resume", file=sys.stderr)
        return 130
    return 0


def run():
    """Console-script entry point (`jaxdpdm --config=... --workdir=...`)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
