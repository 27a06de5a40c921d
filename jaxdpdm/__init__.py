"""jaxdpdm: differentially private diffusion models in JAX/Flax.

Reimplements *Differentially Private Diffusion Models Generate Useful Synthetic Images*
(Ghalebikesabi et al., 2023): non-private pretraining of a class-conditional diffusion UNet,
DP-SGD fine-tuning on sensitive images, sampling of synthetic data, and its evaluation.

XLA flags. Importing jaxdpdm adds `DEFAULT_XLA_FLAGS` to the `XLA_FLAGS` environment variable,
because they make training faster on CPU (benchmarks/RESULTS.md, section "CPU step vs
PyTorch"): XLA reads its flags once, when JAX creates its first backend, so they take effect when
jaxdpdm is imported before any JAX computation runs (importing jax first is fine; running jax
code first is not: then the flags are left out, silently, and the process runs on XLA's
defaults). The user always wins: a flag already named in `XLA_FLAGS` keeps the user's value,
and `JAXDPDM_XLA_DEFAULTS=0` turns the defaults off altogether. The flags touch only XLA:CPU, so
GPU and TPU programs are unchanged. They are applied only with the jaxlib releases they were
measured on (`TESTED_JAXLIB_PREFIXES`): XLA aborts the process on a flag it does not know, and
experimental flags are renamed or removed between releases.

Host memory. On a CPU host, importing jaxdpdm also sets glibc's malloc up so that XLA:CPU
reuses its per-call working memory instead of having the kernel fault it in afresh on every
call (`jaxdpdm.host_malloc`: why, what it costs, and when it is left out;
`JAXDPDM_MALLOC_DEFAULTS=0` turns it off). Same timing rule as the flags: import jaxdpdm before
running any JAX computation.
"""

import os
import sys
from importlib import metadata

from jaxdpdm import host_malloc

__version__ = "0.1.0"

# YNNPACK fusion of dots (matmuls, convolutions) and reductions on XLA:CPU; elementwise chains
# are left to XLA. Measured per program, in one process (benchmarks/xla_options.py,
# benchmarks/RESULTS.md section 25), against the earlier "dot,eltwise,reduce": the Fashion-MNIST
# config's DP gradient calls 1.06-1.10x faster, its pretraining calls 1.07-1.13x, its classifier
# steps 1.05x, its sampler 1.00-1.04x; the 439,505-parameter benchmark UNet's 28x28 DP calls
# 1.11x, its non-private calls 0.94x; the quickstart's programs 0.99-1.04x (classifier 1.12x).
# Values unchanged.
DEFAULT_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce",)
TESTED_JAXLIB_PREFIXES = ("0.10.",)


def xla_flags_with_defaults(user_flags: str, defaults=DEFAULT_XLA_FLAGS) -> str:
    """`user_flags` plus every default flag whose name the user did not give.

    >>> xla_flags_with_defaults("--xla_foo=1", ("--xla_bar=2", "--xla_foo=3"))
    '--xla_foo=1 --xla_bar=2'
    """
    named = {flag.split("=", 1)[0] for flag in user_flags.split()}
    extra = [flag for flag in defaults if flag.split("=", 1)[0] not in named]
    return " ".join(user_flags.split() + extra)


def _apply_default_xla_flags() -> bool:
    """Sets `XLA_FLAGS` unless opted out or too late (a JAX backend exists); True if set."""
    if os.environ.get("JAXDPDM_XLA_DEFAULTS", "1") == "0":
        return False
    try:
        jaxlib_version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return False
    if not jaxlib_version.startswith(TESTED_JAXLIB_PREFIXES):
        return False
    if _backends_exist():
        return False
    os.environ["XLA_FLAGS"] = xla_flags_with_defaults(os.environ.get("XLA_FLAGS", ""))
    return True


def _backends_exist() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bridge is not None and bridge.backends_are_initialized()


XLA_DEFAULTS_APPLIED = _apply_default_xla_flags()
MALLOC_DEFAULTS_APPLIED = not _backends_exist() and host_malloc.apply()
