"""Runs jaxdpdm on one machine with several GPUs: one process that sees all the chosen GPUs.

    python launch/gpu_node.py --config=configs/cifar10.py --workdir=runs/cifar10 \\
        [--gpus=0,1,2,3] [--mem-fraction=0.9 | --no-preallocate] [--mode=train] [--dry-run] \\
        [-- --config.train.num_steps=100]

JAX's data mesh spans every GPU the process sees, so one process is all a single node needs (no
`--multihost`). The launcher sets:

* `CUDA_VISIBLE_DEVICES` from `--gpus` (left as it is when `--gpus` is not given);
* the GPU memory policy: `XLA_PYTHON_CLIENT_MEM_FRACTION=0.9` by default (JAX preallocates 75% of
  each GPU otherwise; DP training with per-example gradients wants most of it), or
  `XLA_PYTHON_CLIENT_PREALLOCATE=false` with `--no-preallocate` (allocate on demand: slower and
  prone to fragmentation, but leaves memory to other processes on a shared GPU);
* `PYTHONUNBUFFERED=1`, so the log streams.

Output goes to the terminal and is appended to WORKDIR/logs/gpu_node.log. Running the same command
again resumes: jaxdpdm.main continues from the newest checkpoint in the workdir. Exit status: the
program's. Standard library only.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import re
import shlex
import subprocess
import sys

import common

LOG_NAME = "logs/gpu_node.log"
DEFAULT_MEM_FRACTION = 0.9


def gpu_env(*, gpus: str | None, mem_fraction: float | None, preallocate: bool) -> dict[str, str]:
    """The environment variables the run needs (added to the inherited environment)."""
    env = {"PYTHONUNBUFFERED": "1"}
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    if not preallocate:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    elif mem_fraction is not None:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction:g}"
    return env


def parse_gpus(text: str) -> str:
    """Checks a comma-separated list of GPU indices ("0,1,2,3") and returns it normalized."""
    ids = [part.strip() for part in text.split(",")]
    if not all(re.fullmatch(r"\d+", i) for i in ids):
        raise ValueError(f"--gpus must be comma-separated GPU indices like 0,1,2,3, got {text!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus lists a GPU twice: {text!r}")
    return ",".join(str(int(i)) for i in ids)


def run_command(*, python: str, config: str, workdir: str, mode: str, env: dict[str, str],
                overrides=()) -> list[str]:
    """`env K=V ... python -m jaxdpdm.main ...`: the exact process the launcher starts."""
    main = common.main_command(python, config=config, workdir=workdir, mode=mode,
                               overrides=overrides)
    return ["env", *(f"{k}={v}" for k, v in sorted(env.items())), *main]


def log_path(workdir: str) -> pathlib.Path:
    return pathlib.Path(workdir) / LOG_NAME


def format_dry_run(argv: list[str], log: pathlib.Path) -> str:
    """What `--dry-run` prints: the same pipeline as a shell would run it."""
    return "\n".join([
        f"# run on this node; output appended to {log}",
        shlex.join(["mkdir", "-p", str(log.parent)]),
        f"{shlex.join(argv)} 2>&1 | tee -a {shlex.quote(str(log))}"
    ])


def run_teed(argv: list[str], log: pathlib.Path) -> int:
    """Runs `argv`, copying its output (stdout and stderr) to the terminal and appending to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as log_file:
        started = datetime.datetime.now().isoformat(timespec="seconds")
        log_file.write(f"=== {started} {shlex.join(argv)}\n")
        log_file.flush()
        process = subprocess.Popen(argv, cwd=common.REPO_ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace")
        try:
            for line in process.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log_file.write(line)
                log_file.flush()
        except KeyboardInterrupt:
            # Ctrl-C reached the child too (same process group): let it finish saving and exit.
            pass
        returncode = process.wait()
        log_file.write(f"=== exit status {returncode}\n")
    return returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/gpu_node.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after '--' go to jaxdpdm.main unchanged (e.g. --config.x=y overrides).")
    common.add_run_arguments(parser)
    parser.add_argument("--gpus", help="GPU indices to use, e.g. 0,1,2,3 (default: all visible)")
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument(
        "--mem-fraction", type=float, default=DEFAULT_MEM_FRACTION,
        help=f"fraction of each GPU to preallocate (default {DEFAULT_MEM_FRACTION})")
    memory.add_argument("--no-preallocate", action="store_true",
                        help="allocate GPU memory on demand instead of preallocating")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter with jaxdpdm installed (default: this one)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    launcher_argv, overrides = common.split_overrides(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(launcher_argv)
    if not args.workdir:
        parser.error("--workdir is required")
    if "://" in args.workdir:
        parser.error("--workdir must be a local or shared-filesystem folder (the log is written "
                     f"there), got {args.workdir!r}")
    if not 0.0 < args.mem_fraction <= 1.0:
        parser.error(f"--mem-fraction must be in (0, 1], got {args.mem_fraction}")
    try:
        gpus = parse_gpus(args.gpus) if args.gpus is not None else None
        # Absolute: the program runs from the repository root, wherever the launcher was started.
        workdir = os.path.abspath(args.workdir)
        argv = run_command(
            python=args.python, config=common.repo_config_path(args.config), workdir=workdir,
            mode=args.mode, overrides=overrides, env=gpu_env(gpus=gpus,
                                                             mem_fraction=args.mem_fraction,
                                                             preallocate=not args.no_preallocate))
    except ValueError as e:
        parser.error(str(e))
    if args.dry_run:
        print(format_dry_run(argv, log_path(workdir)))
        return 0
    return run_teed(argv, log_path(workdir))


if __name__ == "__main__":
    sys.exit(main())
