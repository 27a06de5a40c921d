"""Runs jaxdpdm on several GPU nodes under SLURM: writes an sbatch script and submits it.

    python launch/slurm.py --nodes=4 --gpus-per-node=8 --partition=gpu --time=24:00:00 \\
        --config=configs/cifar10.py --workdir=/shared/runs/cifar10 [--account=A] [--qos=Q] \\
        [--cpus-per-task=32] [--setup='module load cuda'] [--sbatch-arg=--exclusive] \\
        [--dry-run | --no-submit] [-- --config.train.num_steps=100]

The job runs one task per node (`srun ... python -m jaxdpdm.main ... --multihost`); each task is one
JAX process that sees all GPUs of its node, and `jax.distributed.initialize()` finds the coordinator,
process count and process id in SLURM's environment.

Resuming: the script is submitted with `--requeue` and `--signal=B:USR1@GRACE`: GRACE seconds
before the time limit SLURM sends USR1 to the batch shell, which requeues the job
(`scontrol requeue`); a preempted job is requeued by SLURM itself when the cluster preempts by
requeueing. Either way the new start runs the same command, and jaxdpdm.main resumes from the newest
checkpoint in the workdir. `--dependency=singleton` keeps two jobs of the same name (the same run)
from running at once, so submitting again is safe too.

`--dry-run` prints the script (stdout is exactly the script, so `> job.sbatch` works) and writes
nothing; the default writes it to WORKDIR/slurm/JOB_NAME.sbatch and runs `sbatch` on it;
`--no-submit` writes it without submitting. Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import shlex
import sys

import common

_TIME_LIMIT = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """What the sbatch script needs. `workdir` is an absolute path on a shared filesystem."""

    config: str
    workdir: str
    nodes: int
    gpus_per_node: int
    time: str
    job_name: str
    python: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    cpus_per_task: int | None = None
    mode: str = "train"
    overrides: tuple[str, ...] = ()
    requeue_grace_s: int = 120
    max_requeues: int = 20
    mem_fraction: float = 0.9
    setup: tuple[str, ...] = ()
    sbatch_args: tuple[str, ...] = ()
    use_gres: bool = False  # `--gres=gpu:N` for clusters without `--gpus-per-node` (Slurm < 19.05)

    @property
    def log_dir(self) -> str:
        return str(pathlib.Path(self.workdir) / "slurm")

    @property
    def script_path(self) -> str:
        return str(pathlib.Path(self.log_dir) / f"{self.job_name}.sbatch")


def time_limit_seconds(time: str) -> int | None:
    """Seconds in a SLURM time limit ("90", "2:00:00", "1-12", ...); None for unlimited."""
    if time.upper() in ("UNLIMITED", "INFINITE"):
        return None
    match = _TIME_LIMIT.match(time)
    if not match:
        raise ValueError(f"--time {time!r} is not a SLURM time limit (MM, HH:MM:SS, D-HH:MM, ...)")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = first, second or 0, third or 0
    elif third is not None:  # H:M:S
        hours, minutes, seconds = first, second, third
    else:  # M or M:S
        hours, minutes, seconds = 0, first, second or 0
    return (((days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def srun_command(job: SlurmJob) -> list[str]:
    """One task per node; `--kill-on-bad-exit` ends every task when one fails, so a crashed host
    never leaves the others blocked in a collective until the time limit."""
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if job.cpus_per_task:
        # Since Slurm 22.05 srun no longer inherits --cpus-per-task from the batch allocation.
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    return srun + common.main_command(job.python, config=job.config, workdir=job.workdir,
                                      mode=job.mode, multihost=True, overrides=job.overrides)


def sbatch_script(job: SlurmJob) -> str:
    """The full sbatch script text."""
    gpus = (f"--gres=gpu:{job.gpus_per_node}"
            if job.use_gres else f"--gpus-per-node={job.gpus_per_node}")
    directives = [
        f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1", gpus,
        f"--time={job.time}"
    ]
    for flag, value in (("partition", job.partition), ("account", job.account), ("qos", job.qos),
                        ("cpus-per-task", job.cpus_per_task)):
        if value:
            directives.append(f"--{flag}={value}")
    directives += [
        f"--output={job.log_dir}/%x-%j.out", "--open-mode=append", "--requeue",
        f"--signal=B:USR1@{job.requeue_grace_s}", "--dependency=singleton", *job.sbatch_args
    ]
    local_gpus = ",".join(str(i) for i in range(job.gpus_per_node))
    lines = [
        "#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "",
        "# Written by launch/slurm.py. A requeued or resubmitted job resumes from the newest",
        "# checkpoint in the workdir.", "set -uo pipefail",
        f"cd {shlex.quote(str(common.REPO_ROOT))}", *job.setup,
        "# One process per node sees all its GPUs. jax.distributed.initialize() takes the",
        "# coordinator, process count and process id from SLURM, but would also limit each",
        "# process to the single GPU numbered SLURM_LOCALID (one process per GPU is its",
        "# default); naming all local GPUs keeps them.",
        f"export JAX_LOCAL_DEVICE_IDS={local_gpus}",
        f"export XLA_PYTHON_CLIENT_MEM_FRACTION={job.mem_fraction:g}", "export PYTHONUNBUFFERED=1",
        "", "requeue_before_time_limit() {",
        f'  if [ "${{SLURM_RESTART_COUNT:-0}}" -ge {job.max_requeues} ]; then',
        f'    echo "$(date): time limit near; already requeued {job.max_requeues} times, '
        'stopping here"', "    return", "  fi",
        '  echo "$(date): time limit near: requeueing job $SLURM_JOB_ID; it resumes from the '
        'newest checkpoint"', '  scontrol requeue "$SLURM_JOB_ID"', "}",
        "trap requeue_before_time_limit USR1", "",
        'echo "$(date): job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on '
        '$SLURM_JOB_NODELIST"',
        "# In the background: bash runs a trap only once the foreground command returns, and",
        "# `wait` returns as soon as a trapped signal arrives.",
        f"{shlex.join(srun_command(job))} &", 'wait "$!"', "status=$?",
        'echo "$(date): srun exited with status $status"', 'exit "$status"'
    ]
    return "\n".join(lines) + "\n"


def submit_commands(job: SlurmJob) -> list[list[str]]:
    return [["mkdir", "-p", job.log_dir], ["sbatch", job.script_path]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/slurm.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after '--' go to jaxdpdm.main unchanged (e.g. --config.x=y overrides).")
    common.add_run_arguments(parser)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--time", required=True, help="time limit, e.g. 24:00:00 or 2-00:00:00")
    parser.add_argument("--partition", help="default: the cluster's default partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--cpus-per-task", type=int, help="CPUs for each node's process")
    parser.add_argument("--job-name", help="default: jaxdpdm-<workdir basename>")
    parser.add_argument(
        "--python", default=sys.executable,
        help="interpreter with jaxdpdm installed, on the shared filesystem "
        "(default: this one)")
    parser.add_argument("--mem-fraction", type=float, default=0.9,
                        help="XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.9)")
    parser.add_argument("--requeue-grace", type=int, default=120,
                        help="seconds before the time limit at which the job requeues itself")
    parser.add_argument("--max-requeues", type=int, default=20,
                        help="stop requeueing after this many restarts")
    parser.add_argument("--setup", action="append", default=[],
                        help="shell line run before srun, e.g. 'module load cuda' (repeatable)")
    parser.add_argument("--sbatch-arg", action="append", default=[],
                        help="extra #SBATCH option, e.g. --exclusive (repeatable)")
    parser.add_argument("--gres", action="store_true",
                        help="ask for GPUs with --gres=gpu:N instead of --gpus-per-node=N")
    parser.add_argument("--submit", action=argparse.BooleanOptionalAction, default=True,
                        help="run sbatch after writing the script (default; --no-submit to skip)")
    return parser


def parse_job(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, SlurmJob]:
    launcher_argv, overrides = common.split_overrides(argv)
    args = parser.parse_args(launcher_argv)
    if not args.workdir:
        parser.error("--workdir is required")
    if "://" in args.workdir:
        parser.error(f"--workdir must be a folder on a filesystem all nodes share (the job log is "
                     f"written there), got {args.workdir!r}")
    for flag in ("nodes", "gpus_per_node", "requeue_grace"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        parser.error("--cpus-per-task must be at least 1")
    if args.max_requeues < 0:
        parser.error("--max-requeues must be at least 0")
    if not 0.0 < args.mem_fraction <= 1.0:
        parser.error(f"--mem-fraction must be in (0, 1], got {args.mem_fraction}")
    for extra in args.sbatch_arg:
        if not extra.startswith("-"):
            parser.error(f"--sbatch-arg takes an sbatch option like --exclusive, got {extra!r}")
    try:
        limit = time_limit_seconds(args.time)
        if limit is not None and args.requeue_grace >= limit:
            raise ValueError(f"--requeue-grace ({args.requeue_grace} s) must be shorter than "
                             f"--time ({args.time})")
        workdir = os.path.abspath(args.workdir)
        job_name = args.job_name or f"jaxdpdm-{pathlib.Path(workdir).name}"
        if not re.fullmatch(r"[-\w.]+", job_name):
            raise ValueError(f"--job-name {job_name!r}: use letters, digits, '-', '_' and '.'")
        job = SlurmJob(config=common.repo_config_path(args.config), workdir=workdir,
                       nodes=args.nodes, gpus_per_node=args.gpus_per_node, time=args.time,
                       job_name=job_name, python=args.python, partition=args.partition,
                       account=args.account, qos=args.qos, cpus_per_task=args.cpus_per_task,
                       mode=args.mode, overrides=tuple(common.check_overrides(overrides)),
                       requeue_grace_s=args.requeue_grace, max_requeues=args.max_requeues,
                       mem_fraction=args.mem_fraction, setup=tuple(args.setup),
                       sbatch_args=tuple(args.sbatch_arg), use_gres=args.gres)
    except ValueError as e:
        parser.error(str(e))
    return args, job


def main(argv=None) -> int:
    parser = build_parser()
    args, job = parse_job(parser, sys.argv[1:] if argv is None else argv)
    script = sbatch_script(job)
    commands = submit_commands(job)
    if args.dry_run:
        sys.stdout.write(script)
        print(f"# would write {job.script_path}, then run:", file=sys.stderr)
        for argv_ in commands:
            print(shlex.join(argv_), file=sys.stderr)
        return 0
    pathlib.Path(job.log_dir).mkdir(parents=True, exist_ok=True)
    pathlib.Path(job.script_path).write_text(script)
    print(f"wrote {job.script_path}")
    if not args.submit:
        print(f"submit it with: {shlex.join(commands[-1])}")
        return 0
    return common.exit_on_launch_error(
        lambda: common.run_plan([common.phase("submit", commands[-1])]))


if __name__ == "__main__":
    sys.exit(main())
