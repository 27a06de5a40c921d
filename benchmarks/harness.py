"""What every benchmark here shares: the record of where a number came from, interleaved timing,
the one-line JSON output, and a comma-separated-integers argument type.

Imported by dp_step.py, conv_impl.py, vs_pytorch.py, gpu_check.py, sampler_sweep.py and
xla_options.py (this folder is not an installed package: each puts it on `sys.path`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from typing import Any, Callable

import jax

import jaxdpdm


def environment() -> dict[str, Any]:
    """Where the numbers come from: versions, device, date, host load."""
    device = jax.devices()[0]
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": str(getattr(device, "device_kind", device)),
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        # jaxdpdm's import-time defaults (jaxdpdm/__init__.py): XLA:CPU flags, glibc malloc.
        "xla_defaults": jaxdpdm.XLA_DEFAULTS_APPLIED,
        "malloc_defaults": jaxdpdm.MALLOC_DEFAULTS_APPLIED,
    }
    if hasattr(os, "getloadavg"):
        env["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return env


def time_interleaved(steps: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """One warm-up call each, then `repeats` rounds of one timed call of every step in turn.

    Each step must block until its result is ready. Interleaving spreads a change of machine
    load over all steps alike, so ratios of their medians stay meaningful on a shared host.
    """
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def emit_json(result: dict, path: str | None) -> None:
    """Prints `result` as one sorted JSON line (the machine-readable record) and writes it to
    `path` too when one is given."""
    line = json.dumps(result, sort_keys=True)
    print(line)
    if path:
        with open(path, "w") as f:
            f.write(line + "\n")


def int_list(text: str) -> list[int]:
    """argparse type: "16,64" -> [16, 64]; positive integers only."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers: {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values
