"""What jaxdpdm's malloc settings cost in memory: resident memory and page faults per call of one
jitted program with a large temporary buffer, under each malloc setting, each in a fresh process.

    python benchmarks/heap_growth.py                      # 256 MiB temporary, 12 calls
    python benchmarks/heap_growth.py --mib=64 --calls=6   # smaller

Settings (`jaxdpdm/host_malloc.py`): "jaxdpdm" (one arena, no mmap, no trimming: what importing
jaxdpdm sets on a CPU host), "glibc" (`JAXDPDM_MALLOC_DEFAULTS=0`), and "jaxdpdm+trim" (the same
settings with `malloc_trim(0)` after every `--trim-every` calls, which hands the free parts of the
heap back). The program is `sum(sin(m @ m.T), axis=0)` for an `[n, 64]` matrix `m`, whose
`[n, n]` product is the temporary (XLA's `memory_analysis` reports it). Printed per setting: the
resident set after warm-up and after each call (GB), minor page faults per timed call, system
and wall seconds; one JSON line last. benchmarks/RESULTS.md section 31.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = ("jaxdpdm", "glibc", "jaxdpdm+trim")

_CHILD = r"""
import ctypes, json, resource, sys, time
import jaxdpdm  # applies (or not, per JAXDPDM_MALLOC_DEFAULTS) the malloc settings
import jax, jax.numpy as jnp
from jaxdpdm.monitoring import memory_metrics
n, calls, trim_every = (int(a) for a in sys.argv[1:4])

@jax.jit
def program(x, s):
    m = x.reshape(n, 1) * jnp.ones((1, 64)) * s
    return jnp.sum(jnp.sin(m @ m.T), axis=0)

def rss_gb():
    with open("/proc/self/status") as f:
        return [int(l.split()[1]) for l in f if l.startswith("VmRSS:")][0] * 1024 / 1e9

x = jnp.ones(n)
temp = program.lower(x, 1.0).compile().memory_analysis().temp_size_in_bytes
program(x, 1.0).block_until_ready()
rss = [rss_gb()]
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for i in range(calls):
    program(x, float(i + 2)).block_until_ready()
    if trim_every and (i + 1) % trim_every == 0:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss.append(rss_gb())
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"temp_bytes": temp, "rss_gb": rss, "peak_gb": memory_metrics()["host_peak_gb"],
                  "faults_per_call": (after.ru_minflt - before.ru_minflt) / calls,
                  "system_s": after.ru_stime - before.ru_stime,
                  "wall_s": time.perf_counter() - start}))
"""


def run_setting(setting: str, n: int, calls: int, trim_every: int) -> dict:
    """One fresh interpreter under `setting`; returns its JSON record."""
    env = dict(os.environ)
    env["JAXDPDM_MALLOC_DEFAULTS"] = "0" if setting == "glibc" else "1"
    trim = trim_every if setting == "jaxdpdm+trim" else 0
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(n), str(calls), str(trim)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{setting}: the child failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the temporary, MiB")
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--trim-every", type=int, default=4)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("heap_growth: needs glibc Linux (/proc and glibc's malloc); nothing to measure here")
        return 0
    n = int((args.mib * 2**20 / 4)**0.5)  # an [n, n] float32 product
    results = {}
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            parser.error(f"--settings: {setting!r} is not one of {SETTINGS}")
        r = results[setting] = run_setting(setting, n, args.calls, args.trim_every)
        print(f"{setting:13s} temp {r['temp_bytes'] / 2**20:6.0f} MiB  faults/call "
              f"{r['faults_per_call']:7.0f}  system {r['system_s']:5.2f} s  "
              f"wall {r['wall_s']:5.2f} s  peak {r['peak_gb']:5.2f} GB  rss "
              + " ".join(f"{v:.2f}" for v in r["rss_gb"]))
    print(json.dumps({"benchmark": "heap_growth", "argv": sys.argv[1:] if argv is None else argv,
                      "n": n, "calls": args.calls, "trim_every": args.trim_every,
                      "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
