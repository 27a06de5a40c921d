"""Runs jaxdpdm on a Cloud TPU VM or pod slice: create (or reuse) it, ship the code, start, collect.

    python launch/tpu_pod.py --name=dpdm --zone=us-central2-b --project=P --accelerator-type=v4-32 \\
        --config=configs/cifar10.py --workdir=gs://BUCKET/cifar10_eps10 [--queued] [--spot] \\
        [--reuse] [--restart] [--dry-run] [-- --config.train.num_steps=100]
    python launch/tpu_pod.py logs    --name=dpdm --zone=us-central2-b [--worker=0] [--lines=50]
    python launch/tpu_pod.py stop    --name=dpdm --zone=us-central2-b
    python launch/tpu_pod.py collect --workdir=gs://BUCKET/cifar10_eps10 [--dest=runs/x] \\
        [--skip-checkpoints]
    python launch/tpu_pod.py delete  --name=dpdm --zone=us-central2-b [--queued] [--yes]

`launch` (the default action) ships the committed code (`git archive HEAD`) to every worker,
installs `requirements-tpu.txt` and the package into a Python 3.12 venv, and starts
`python -m jaxdpdm.main ... --multihost` on all workers at once, detached (`setsid nohup`, log in
~/jaxdpdm-run/<mode>.log on each worker), so the run survives the ssh session. Re-running the
same command with `--reuse` resumes: a worker whose run is alive keeps it; otherwise the program
restarts and resumes from the newest checkpoint in the GCS workdir. A preempted spot TPU (or a
failed/suspended queued resource) is deleted and recreated. Standard library only.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile

import common

ACTIONS = ("launch", "logs", "stop", "collect", "delete")

# Recommended TPU software versions for JAX by TPU generation (Cloud TPU "TPU software versions").
RUNTIME_BY_GENERATION = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
_ACCELERATOR_TYPE = re.compile(r"^(v\d+[a-z]*)-(\d+)$")
_TPU_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")

# On each worker. Double-quoted in the remote scripts so the remote shell expands $HOME.
REMOTE_CODE_DIR = "$HOME/jaxdpdm"
REMOTE_RUN_DIR = "$HOME/jaxdpdm-run"
REMOTE_ARCHIVE = "jaxdpdm-code.tar.gz"  # relative to the home folder, as scp destinations are
REMOTE_VENV = "$HOME/jaxdpdm-venv"
# jax >= 0.7 needs Python >= 3.11, and the TPU VM images are Ubuntu 22.04 with Python 3.10, so the
# workers get their own interpreter: uv (pip-installed into the system Python) fetches it.
DEFAULT_PYTHON_VERSION = "3.12"
_PID_FILE = f'"{REMOTE_RUN_DIR}/run.pid"'

# Resource states (`state` of a TPU VM node, `state.state` of a queued resource), by what to do.
_STATES = {
    False: {
        "ready": {"READY"}, "pending": {"CREATING", "STARTING", "RESTARTING", "REPAIRING"},
        "dead": {"PREEMPTED", "TERMINATED"}, "stopped": {"STOPPED"}
    },
    True: {
        "ready": {"ACTIVE"},
        "pending": {"CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"},
        "dead": {"FAILED", "SUSPENDING", "SUSPENDED"}, "stopped": set()
    },
}


@dataclasses.dataclass(frozen=True)
class TpuJob:
    """Everything the gcloud commands need. `project=None` uses gcloud's configured project."""

    name: str
    zone: str
    project: str | None = None
    queued: bool = False
    accelerator_type: str = ""
    runtime_version: str = ""
    spot: bool = False
    config: str = ""
    workdir: str = ""
    mode: str = "train"
    overrides: tuple[str, ...] = ()
    restart: bool = False
    python_version: str = DEFAULT_PYTHON_VERSION
    archive: str = str(pathlib.Path(tempfile.gettempdir()) / "jaxdpdm-code.tar.gz")


def default_runtime_version(accelerator_type: str, requested: str | None = None) -> str:
    """`requested`, else the JAX-recommended TPU software version for e.g. "v4-32"."""
    match = _ACCELERATOR_TYPE.match(accelerator_type)
    if not match:
        raise ValueError(
            f"--accelerator-type {accelerator_type!r} is not like v4-32 or v5litepod-16")
    if requested:
        return requested
    generation = match.group(1)
    if generation not in RUNTIME_BY_GENERATION:
        raise ValueError(
            f"no default TPU software version for {generation}; pass --runtime-version")
    return RUNTIME_BY_GENERATION[generation]


def _where(job: TpuJob) -> list[str]:
    return [f"--zone={job.zone}"] + ([f"--project={job.project}"] if job.project else [])


def _resource(job: TpuJob) -> list[str]:
    # Resource-level commands address the queued resource when there is one; ssh/scp always talk
    # to the node, whose id is the same name (`--node-id=NAME` at creation).
    return ["gcloud", "compute", "tpus", "queued-resources" if job.queued else "tpu-vm"]


def describe_command(job: TpuJob) -> list[str]:
    field = "state.state" if job.queued else "state"
    return _resource(job) + ["describe", job.name, *_where(job), f"--format=value({field})"]


def create_command(job: TpuJob) -> list[str]:
    if job.queued:
        argv = _resource(job) + [
            "create", job.name, *_where(job), f"--node-id={job.name}",
            f"--accelerator-type={job.accelerator_type}", f"--runtime-version={job.runtime_version}"
        ]
    else:
        argv = _resource(job) + [
            "create", job.name, *_where(job), f"--accelerator-type={job.accelerator_type}",
            f"--version={job.runtime_version}"
        ]
    return argv + (["--spot"] if job.spot else [])


def delete_command(job: TpuJob, *, quiet: bool) -> list[str]:
    # --force: a queued resource with live nodes is only deleted together with them.
    argv = _resource(job) + ["delete", job.name, *_where(job)] + (["--force"] if job.queued else [])
    return argv + (["--quiet"] if quiet else [])


def _ssh(job: TpuJob, script: str, worker: str = "all") -> list[str]:
    return [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", job.name, *_where(job), f"--worker={worker}",
        f"--command={script}"
    ]


def _is_jaxdpdm(pid: str) -> str:
    # A pid alone is not proof: after a reboot it may belong to another process, and a killed
    # process not yet reaped still answers `kill -0` (its cmdline is empty, though).
    return f'grep -qa jaxdpdm.main "/proc/{pid}/cmdline" 2>/dev/null'


def _run_alive() -> str:
    return f'test -f {_PID_FILE} && {_is_jaxdpdm(f"$(cat {_PID_FILE})")}'


def ship_commands(job: TpuJob) -> list[list[str]]:
    """Packages the committed tree (HEAD) and copies it to every worker."""
    return [[
        "git", "-C",
        str(common.REPO_ROOT), "archive", "--format=tar.gz", f"--output={job.archive}", "HEAD"
    ],
            [
                "gcloud", "compute", "tpus", "tpu-vm", "scp", job.archive,
                f"{job.name}:{REMOTE_ARCHIVE}", *_where(job), "--worker=all"
            ]]


def install_command(job: TpuJob) -> list[str]:
    """Unpacks the code and installs it on every worker (skipped where a run is alive)."""
    python = f'"{REMOTE_VENV}/bin/python"'
    major, minor = job.python_version.split(".")
    # Keep the venv while it has the requested Python (fast re-launch); rebuild it otherwise.
    right_python = (
        f"{python} -c 'import sys; sys.exit(sys.version_info[:2] != ({major}, {minor}))'"
        " 2>/dev/null")
    uv_pip = f"python3 -m uv pip install -q --python {python}"
    steps = [
        f'rm -rf "{REMOTE_CODE_DIR}"', f'mkdir -p "{REMOTE_CODE_DIR}"',
        f'tar -xzf "$HOME/{REMOTE_ARCHIVE}" -C "{REMOTE_CODE_DIR}"', f'cd "{REMOTE_CODE_DIR}"',
        "python3 -m pip install -q --user uv",
        f'{{ {right_python} || {{ rm -rf "{REMOTE_VENV}" && python3 -m uv venv -q --python '
        f'{job.python_version} "{REMOTE_VENV}"; }}; }}', f"{uv_pip} -r requirements-tpu.txt",
        f"{uv_pip} -e . --no-deps"
    ]
    return _ssh(
        job, f'if {_run_alive()}; then echo "$(hostname): a jaxdpdm run is alive; code '
        f'left as it is"; else {" && ".join(steps)}; fi')


def start_command(job: TpuJob) -> list[str]:
    """Starts the run detached on every worker, unless one is already alive there."""
    main = common.main_command(f"{REMOTE_VENV}/bin/python", config=job.config, workdir=job.workdir,
                               mode=job.mode, multihost=True, overrides=job.overrides)
    # The interpreter is double-quoted by hand so that the remote shell expands $HOME.
    program = f'"{main[0]}" {shlex.join(main[1:])}'
    log = f'"{REMOTE_RUN_DIR}/{job.mode}.log"'
    # setsid + nohup + no terminal on stdin/stdout: the run outlives the ssh session, and the ssh
    # command returns at once. The log is appended to, so a resumed run keeps its history.
    launch = (f"setsid nohup env PYTHONUNBUFFERED=1 {program} "
              f">> {log} 2>&1 < /dev/null & echo $! > {_PID_FILE}; "
              f'echo "$(hostname): started pid $!, log ~/jaxdpdm-run/{job.mode}.log"')
    return _ssh(
        job, f'mkdir -p "{REMOTE_RUN_DIR}" && if {_run_alive()}; then echo "$(hostname): '
        f'jaxdpdm already running (pid $(cat {_PID_FILE})), left alone"; '
        f'else cd "{REMOTE_CODE_DIR}" && {{ {launch}; }}; fi')


def stop_command(job: TpuJob) -> list[str]:
    """Stops the run on every worker: SIGTERM to its process group, SIGKILL after 60 s."""
    return _ssh(
        job, f'if {_run_alive()}; then pid=$(cat {_PID_FILE}); '
        'kill -- -"$pid" 2>/dev/null || kill "$pid"; '
        f'for i in $(seq 60); do {_is_jaxdpdm("$pid")} || break; sleep 1; done; '
        'kill -9 "$pid" 2>/dev/null; echo "$(hostname): stopped pid $pid"; '
        f'else echo "$(hostname): no jaxdpdm run alive"; fi; rm -f {_PID_FILE}')


def logs_command(job: TpuJob, *, worker: str, lines: int) -> list[str]:
    return _ssh(job, f'tail -n {lines} "{REMOTE_RUN_DIR}/{job.mode}.log"', worker=worker)


def collect_commands(workdir: str, dest: str, *, skip_checkpoints: bool) -> list[list[str]]:
    """Copies the GCS workdir to a local folder (incremental: re-running fetches what is new)."""
    rsync = ["gcloud", "storage", "rsync", workdir, dest, "--recursive"]
    if skip_checkpoints:
        rsync.append("--exclude=^checkpoints/")  # a regex on the path relative to the workdir
    return [["mkdir", "-p", dest], rsync]


def classify_state(state: str, *, queued: bool) -> str:
    """"ready" | "pending" | "dead" | "stopped" for a describe output; ValueError otherwise."""
    for condition, states in _STATES[queued].items():
        if state in states:
            return condition
    raise ValueError(f"the TPU is in state {state or '(unknown)'}; wait for it to settle, or "
                     "delete it (`tpu_pod.py delete`) and launch again")


def launch_plan(job: TpuJob, condition: str) -> list[common.Phase]:
    """The launch phases, given the TPU's condition: "absent" or a `classify_state` result."""
    kind = "queued resource" if job.queued else "TPU VM"
    phases = []
    if condition == "dead":
        phases.append(
            common.phase(
                f"{kind} {job.name} was preempted or failed: delete it, then "
                "recreate it", delete_command(job, quiet=True)))
    if condition in ("absent", "dead"):
        phases.append(
            common.phase(f"create {kind} {job.name} ({job.accelerator_type})", create_command(job)))
    if condition == "stopped":
        phases.append(
            common.phase(f"start the stopped TPU VM {job.name}",
                         _resource(job) + ["start", job.name, *_where(job)]))
    # Queued requests return at once and are granted later; an existing node may be mid-boot.
    if condition == "pending" or (job.queued and condition in ("absent", "dead")):
        ready, fail = (("ACTIVE", ("FAILED", "SUSPENDED")) if job.queued else
                       ("READY", ("PREEMPTED",)))
        phases.append(
            common.phase(f"wait until {job.name} is {ready}", describe_command(job),
                         poll_until=ready, poll_fail=fail))
    if job.restart:
        phases.append(common.phase("stop the run on every worker", stop_command(job)))
    phases.append(
        common.phase("package the committed code (HEAD), copy it to every worker",
                     *ship_commands(job)))
    phases.append(common.phase("unpack and install it on every worker", install_command(job)))
    phases.append(
        common.phase(
            f"start {job.mode} on every worker with --multihost (detached; a "
            "worker whose run is alive keeps it)", start_command(job)))
    return phases


def probe(job: TpuJob, runner=subprocess.run) -> tuple[str, str]:
    """Asks gcloud whether the TPU exists: ("absent", "") or (condition, state)."""
    result = runner(describe_command(job), capture_output=True, text=True)
    if result.returncode != 0:
        if "NOT_FOUND" in result.stderr or "not found" in result.stderr.lower():
            return "absent", ""
        raise common.LaunchError(f"could not query {job.name}: {result.stderr.strip()}",
                                 result.returncode)
    state = result.stdout.strip()
    try:
        return classify_state(state, queued=job.queued), state
    except ValueError as e:
        raise common.LaunchError(str(e)) from None


def check_committed(job: TpuJob, *, allow_dirty: bool, runner=subprocess.run) -> None:
    """`git archive HEAD` ships commits only: refuse uncommitted edits and an untracked config."""
    git = ["git", "-C", str(common.REPO_ROOT)]
    status = runner(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                    text=True)
    if status.returncode != 0:
        raise common.LaunchError(f"git status failed: {status.stderr.strip()}")
    if status.stdout.strip() and not allow_dirty:
        raise common.LaunchError("uncommitted changes would not be shipped (the TPU gets "
                                 "`git archive HEAD`); commit them, or pass --allow-dirty to ship "
                                 f"HEAD anyway:\n{status.stdout.rstrip()}")
    config_file = job.config.split(":", 1)[0]
    if runner(git + ["cat-file", "-e", f"HEAD:{config_file}"], capture_output=True).returncode:
        raise common.LaunchError(f"{config_file} is not committed, so it would not be shipped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/tpu_pod.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after '--' go to jaxdpdm.main unchanged (e.g. --config.x=y overrides).")
    parser.add_argument("action", nargs="?", choices=ACTIONS, default="launch")
    parser.add_argument("--name", help="TPU VM (and queued resource) name")
    parser.add_argument("--zone", help="e.g. us-central2-b")
    parser.add_argument("--project", help="GCP project (default: gcloud's configured one)")
    parser.add_argument("--accelerator-type", help="e.g. v4-32, v5litepod-16, v5p-8, v6e-8")
    parser.add_argument("--runtime-version", help="TPU software version (default: by generation)")
    parser.add_argument("--queued", action="store_true", help="request through a queued resource")
    parser.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    parser.add_argument("--reuse", action="store_true",
                        help="run on the existing TPU of that name (recreate it if preempted)")
    parser.add_argument(
        "--restart", action="store_true",
        help="stop a live run on every worker first (e.g. after one worker crashed)")
    parser.add_argument("--python-version", default=DEFAULT_PYTHON_VERSION,
                        help=f"Python of the workers' venv (default {DEFAULT_PYTHON_VERSION})")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="launch although the tree has uncommitted changes (HEAD is shipped)")
    common.add_run_arguments(parser, config_required=False)
    parser.add_argument("--worker", default="0", help="logs: which worker (default 0, or 'all')")
    parser.add_argument("--lines", type=int, default=50, help="logs: how many lines")
    parser.add_argument("--dest", help="collect: local folder (default runs/<workdir basename>)")
    parser.add_argument("--skip-checkpoints", action="store_true", help="collect: no checkpoints")
    parser.add_argument("--yes", action="store_true", help="delete: do not ask for confirmation")
    return parser


def parse_job(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, TpuJob | None]:
    """Parses and checks the arguments (argparse errors exit with status 2)."""
    launcher_argv, overrides = common.split_overrides(argv)
    args = parser.parse_args(launcher_argv)
    if overrides and args.action != "launch":
        parser.error(f"arguments after '--' are for launch, not {args.action}")
    if args.workdir is not None and not re.match(r"^gs://[^/]+", args.workdir):
        parser.error(f"--workdir must be a gs://BUCKET/PATH folder that every worker can reach, "
                     f"got {args.workdir!r}")
    if args.action == "collect":
        if not args.workdir:
            parser.error("collect needs --workdir=gs://BUCKET/PATH")
        return args, None
    for flag in ("name", "zone") + (
        ("accelerator_type", "config", "workdir") if args.action == "launch" else ()):
        if not getattr(args, flag):
            parser.error(f"{args.action} needs --{flag.replace('_', '-')}")
    if not _TPU_NAME.match(args.name):
        parser.error(f"--name {args.name!r}: use lowercase letters, digits and '-', starting with "
                     "a letter (at most 63 characters)")
    if args.lines < 1:
        parser.error("--lines must be positive")
    if not re.fullmatch(r"3\.\d+", args.python_version):
        parser.error(f"--python-version must be like 3.12, got {args.python_version!r}")
    if args.action != "launch":
        return args, TpuJob(name=args.name, zone=args.zone, project=args.project,
                            queued=args.queued, mode=args.mode)
    try:
        runtime = default_runtime_version(args.accelerator_type, args.runtime_version)
        job = TpuJob(
            name=args.name, zone=args.zone, project=args.project, queued=args.queued,
            accelerator_type=args.accelerator_type, runtime_version=runtime, spot=args.spot,
            config=common.repo_config_path(args.config), workdir=args.workdir.rstrip("/"),
            mode=args.mode, overrides=tuple(common.check_overrides(overrides)),
            restart=args.restart, python_version=args.python_version,
            archive=str(pathlib.Path(tempfile.gettempdir()) / f"jaxdpdm-{args.name}.tar.gz"))
    except ValueError as e:
        parser.error(str(e))
    return args, job


def plan_for(args: argparse.Namespace, job: TpuJob | None, condition: str) -> list[common.Phase]:
    """The phases of any action; `condition` only matters for launch."""
    if args.action == "collect":
        dest = args.dest or str(pathlib.Path("runs") / args.workdir.rstrip("/").rsplit("/", 1)[-1])
        return [
            common.phase(
                f"copy {args.workdir} to {dest}",
                *collect_commands(args.workdir, dest, skip_checkpoints=args.skip_checkpoints))
        ]
    if args.action == "delete":
        return [common.phase(f"delete {job.name}", delete_command(job, quiet=args.yes))]
    if args.action == "stop":
        return [common.phase("stop the run on every worker", stop_command(job))]
    if args.action == "logs":
        return [
            common.phase(
                f"last {args.lines} lines of the {job.mode} log on worker "
                f"{args.worker}", logs_command(job, worker=args.worker, lines=args.lines))
        ]
    return launch_plan(job, condition)


def main(argv=None) -> int:
    parser = build_parser()
    args, job = parse_job(parser, sys.argv[1:] if argv is None else argv)
    if args.dry_run:
        phases = plan_for(args, job, "ready" if args.reuse else "absent")
        if args.action == "launch":
            assumed = "exists and is ready (--reuse)" if args.reuse else "does not exist"
            phases.insert(
                0,
                common.phase(
                    f"check whether {job.name} exists (the dry run assumes "
                    f"it {assumed})", describe_command(job)))
        print(common.format_plan(phases))
        return 0

    def launch() -> None:
        condition = "absent"
        if args.action == "launch":
            check_committed(job, allow_dirty=args.allow_dirty)
            condition, state = probe(job)
            if condition != "absent" and not args.reuse:
                raise common.LaunchError(f"{job.name} already exists (state {state}); pass "
                                         "--reuse to run on it, or choose another --name")
        common.run_plan(plan_for(args, job, condition))

    return common.exit_on_launch_error(launch)


if __name__ == "__main__":
    sys.exit(main())
