"""Command-line entry point.

    python -m jaxdpdm.main --config=configs/quickstart.py --workdir=runs/quickstart
    python -m jaxdpdm.main --config=configs/quickstart.py --workdir=runs/quickstart --mode=sample
    python -m jaxdpdm.main --config=configs/quickstart.py --workdir=runs/quickstart --mode=evaluate

`--mode=train` (the default) trains, or resumes the run already in `--workdir`. Config fields are
overridden with `--config.FIELD=VALUE`, e.g. `--config.train.num_steps=3`.
"""

from __future__ import annotations

import logging
import os
import sys

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
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "evaluate"], "What to do.")
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


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    # orbax and clu log every file they write through absl at INFO; keep the console for
    # jaxdpdm's own progress, warnings and errors.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    # A quoted "~/runs/x" reaches us unexpanded; it means the home folder, not a folder named "~".
    config, workdir = _CONFIG.value, os.path.expanduser(_WORKDIR.value)
    not_optional = unset_fields_that_cannot_be_none(config, config_flags.get_override_values(
        flags.FLAGS["config"]))
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
        else:
            from jaxdpdm.evaluation.run import evaluate_workdir
            evaluate_workdir(config, workdir)
    except (ValueError, FileNotFoundError) as e:
        # Bad configs and data are the user's to fix: one clear line, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The trainer has already saved the completed steps (a save in progress is finished).
        print("interrupted: the completed steps are checkpointed; rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    return 0


def run():
    """Console-script entry point (`jaxdpdm --config=... --workdir=...`)."""
    app.run(main)


if __name__ == "__main__":
    run()
