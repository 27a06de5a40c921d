"""jaxdpdm.host_malloc: when the malloc settings apply, and what they change (page faults only)."""

import json
import os
import subprocess
import sys

import pytest

from jaxdpdm import host_malloc

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
    reason="the settings are glibc's")


@pytest.mark.parametrize("environ, expected", [
    ({}, False),
    ({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=512"}, False),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, True),
    ({"GLIBC_TUNABLES": "glibc.rtld.x=1:glibc.malloc.tcache_count=0"}, True),
    ({"MALLOC_ARENA_MAX": "2"}, True),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, True),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, True),
    ({"LD_PRELOAD": "libtcmalloc_minimal.so.4"}, True),
    ({"LD_PRELOAD": "libfoo.so"}, False),
])
def test_user_tunes_malloc(environ, expected):
    assert host_malloc.user_tunes_malloc(environ) is expected


@pytest.mark.parametrize("environ, nodes, expected", [
    ({}, (), True),
    ({}, ("/dev/nvidia0",), False),
    ({}, ("/dev/accel0",), False),
    ({}, ("/dev/vfio",), False),
    ({"JAX_PLATFORMS": "cpu"}, ("/dev/nvidia0",), True),
    ({"JAX_PLATFORMS": " CPU , cuda"}, (), True),
    ({"JAX_PLATFORMS": "cuda,cpu"}, (), False),
    ({"JAX_PLATFORMS": "tpu"}, (), False),
    ({"JAX_PLATFORMS": ""}, ("/dev/accel0",), False),
])
def test_computes_on_cpu(environ, nodes, expected):
    assert host_malloc.computes_on_cpu(environ, exists=lambda path: path in nodes) is expected


@pytest.mark.parametrize("environ", [
    {"JAXDPDM_MALLOC_DEFAULTS": "0"},
    {"MALLOC_ARENA_MAX": "8"},
    {"JAX_PLATFORMS": "cuda"},
])
def test_apply_leaves_malloc_alone(environ):
    assert host_malloc.apply(environ) is False


# A jitted program whose working memory (two f32[8192, 2048] intermediates, 64 MiB each) is
# far above glibc's 32 MB mmap ceiling: with glibc's defaults it is mapped and faulted in afresh
# on every call. Prints MALLOC_DEFAULTS_APPLIED, the minor page faults of each call, the output.
_PROBE = """
import json, resource
import jaxdpdm, jax, jax.numpy as jnp, numpy as np

@jax.jit
def f(x, w):
    loss = lambda w: jnp.sum(jnp.tanh(x @ w) ** 2)
    return jnp.sum(jnp.tanh(x @ w), axis=0) + jnp.sum(jax.grad(loss)(w))

x = jax.random.normal(jax.random.key(0), (8192, 64))
w = jax.random.normal(jax.random.key(1), (64, 2048)) / 8
for _ in range(3):  # compile, then let the heap grow towards its high-water mark
    f(x, w).block_until_ready()
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps([jaxdpdm.MALLOC_DEFAULTS_APPLIED, faults, np.asarray(out).tolist()]))
"""


def _run_python(code: str, **env) -> str:
    """stdout of `code` in a fresh interpreter, without the caller's own malloc settings."""
    clean = {k: v for k, v in os.environ.items()
             if not host_malloc.user_tunes_malloc({k: v}) and k != "JAXDPDM_MALLOC_DEFAULTS"}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True,
                          text=True, timeout=300, check=True).stdout


def _probe(**env):
    return json.loads(_run_python(_PROBE, **env).strip().splitlines()[-1])


@glibc_only
def test_settings_stop_the_refaulting_and_change_no_number():
    applied, faults_on, out_on = _probe(JAX_PLATFORMS="cpu")
    skipped, faults_off, out_off = _probe(JAX_PLATFORMS="cpu", JAXDPDM_MALLOC_DEFAULTS="0")
    assert (applied, skipped) == (True, False)
    pages = 2 * 8192 * 2048 * 4 // os.sysconf("SC_PAGE_SIZE")  # the two intermediates
    # glibc's defaults: every call faults its working memory in anew.
    assert min(faults_off) > 0.8 * pages
    # The settings: calls reuse the freed memory and fault nothing. Some calls still fault a
    # whole buffer in while the heap grows to its high-water mark (more often under load), so
    # the check is that reuse happens at all, not that it always does.
    assert min(faults_on) < 0.05 * pages
    assert out_on == out_off  # bit for bit: only where the memory comes from changed


def test_too_late_once_a_backend_exists():
    """XLA's threads already have their arenas then: nothing is changed, and the flag says so."""
    code = ("import jax; jax.numpy.ones(1).block_until_ready(); import jaxdpdm; "
            "print(jaxdpdm.MALLOC_DEFAULTS_APPLIED)")
    assert _run_python(code, JAX_PLATFORMS="cpu").split()[-1] == "False"


@glibc_only
def test_the_heap_is_never_trimmed_however_much_is_freed():
    """A freed block larger than any positive int threshold (2 GiB) stays in the heap: the
    program break does not move back. (Allocated, never touched: no page is faulted in.)"""
    code = """
import ctypes, json
import jaxdpdm
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
libc.sbrk.argtypes = [ctypes.c_long]
block = libc.malloc(5 * 2**29)  # 2.5 GiB
grown = libc.sbrk(0)
libc.free(block)
print(json.dumps([jaxdpdm.MALLOC_DEFAULTS_APPLIED, block is not None, grown - libc.sbrk(0)]))
"""
    out = _run_python(code, JAX_PLATFORMS="cpu")
    applied, allocated, given_back = json.loads(out.splitlines()[-1])
    assert applied and allocated
    assert given_back == 0
