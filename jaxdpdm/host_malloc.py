"""glibc malloc settings that stop XLA:CPU from page-faulting its working memory afresh each call.

Why: an XLA:CPU program gets one temporary buffer per call (75.8 MiB for the Fashion-MNIST
classifier's training step at batch 64). The call runs on an XLA worker thread, whose glibc
arena cannot hold a block that large (a thread arena's heap is at most 64 MB, and blocks over
32 MB are always mmap-ed), so glibc maps fresh memory for it and unmaps it when the call ends:
every page of it is zero-filled and faulted in by the kernel on every call. On the 2-core
development machine (benchmarks/RESULTS.md section 19) that was 31-36% of the CPU time of
pretraining and evaluation (system time) and 17% of DP fine-tuning's; with these settings the
40-epoch Fashion-MNIST evaluation ran 1.56x faster, pretraining 1.3x, the 28x28 DP step 1.25x
(1.1x in the trainer); with trimming off as well (section 23), that DP step 1.3x more with XLA's
kernel gradient and 3.3x with the matmul one.

What: one malloc arena (`M_ARENA_MAX=1`: the main arena grows with brk and has no size cap),
no mmap-ed blocks (`M_MMAP_MAX=0`), and no trimming of the heap's free top
(`M_TRIM_THRESHOLD=-1`, which glibc documents as "never"), so the buffer freed by one call is
reused by the next. (The first version set the largest positive threshold mallopt's int takes,
2 GiB: a call that freed more than that, such as the 7-10 GB working memory of a 28x28 DP
gradient call of the 439,505-parameter UNet, gave the excess back and faulted it in again on the
next call; RESULTS.md section 23.) The cost is that the heap keeps its high-water mark (freed
memory is reused, not returned to the system): about 1.1 GB more peak resident memory in
Fashion-MNIST training, 0.25 GB in its evaluation, in the runs of section 19. That mark is not
fixed: now and then a call cannot reuse the freed block and the heap grows by one more working
set, for good (a K = 8 Fashion-MNIST DP fine-tune went from 11.6 to 15.1 GB; section 31 and
`benchmarks/heap_growth.py`); where memory is tighter than time, opt out. Numbers, gradients
and samples do not change: only where memory comes from. Measured on 2 cores only: on a
many-core CPU host, threads that allocate large blocks at once wait for the one arena's lock
(glibc's per-thread cache serves small blocks without it); compare with
`JAXDPDM_MALLOC_DEFAULTS=0` there.

When: `apply()` runs when jaxdpdm is imported. It changes nothing (and returns False) when
the user opted out (`JAXDPDM_MALLOC_DEFAULTS=0`), when the user already tunes malloc
(`GLIBC_TUNABLES` with a `glibc.malloc.` setting, a `MALLOC_*` variable glibc reads, or an
`LD_PRELOAD`-ed allocator), off glibc Linux, or when the computation will not run on the CPU:
`JAX_PLATFORMS` names another platform first, or (`JAX_PLATFORMS` unset) the host has a GPU or
TPU device node. One arena was measured only on CPU hosts; accelerator hosts keep glibc's
defaults. It must run before XLA starts its threads (they keep the arena they first used), which
importing jaxdpdm before running any JAX computation ensures, as for the XLA flags.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# M_TRIM_THRESHOLD takes an int; -1 (SIZE_MAX inside glibc) turns trimming off altogether.
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))

# glibc's malloc environment variables (aliases of its glibc.malloc tunables).
_GLIBC_MALLOC_VARS = ("MALLOC_ARENA_MAX", "MALLOC_ARENA_TEST", "MALLOC_MMAP_MAX_",
                      "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_")
# Device nodes of accelerators JAX drives: NVIDIA GPUs, TPUs (accel for v4+, vfio for v5e+).
_ACCELERATOR_NODES = ("/dev/nvidia0", "/dev/accel0", "/dev/vfio")


def user_tunes_malloc(environ) -> bool:
    """True if the environment already sets glibc's malloc up, or replaces the allocator."""
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return True
    if any(name in environ for name in _GLIBC_MALLOC_VARS):
        return True
    return "malloc" in environ.get("LD_PRELOAD", "")  # jemalloc, tcmalloc, mimalloc


def computes_on_cpu(environ, exists=os.path.exists) -> bool:
    """Whether JAX will run the computation on the CPU, judged before any backend exists."""
    platforms = environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(exists(node) for node in _ACCELERATOR_NODES)


def apply(environ=os.environ) -> bool:
    """Sets `SETTINGS` with mallopt where they apply (see the module docstring); True if set."""
    if environ.get("JAXDPDM_MALLOC_DEFAULTS", "1") == "0" or user_tunes_malloc(environ):
        return False
    if not sys.platform.startswith("linux") or not computes_on_cpu(environ):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):  # musl and others: not glibc
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, ValueError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in SETTINGS])
