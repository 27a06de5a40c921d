"""CPU-scale phase 2 at epsilon 1: configs/fashion_mnist_eps10.py with a 10x smaller budget.

Same model, pretrained starting point, K, timestep mixture, batch, steps and optimiser as
configs/fashion_mnist_eps10.py (whose docstring has the provenance, the privacy statement and
the measured cost); only the target changes, so the calibrated noise multiplier is larger.

    python -m jaxdpdm.main --config=configs/fashion_mnist_eps1.py --workdir=runs/fmnist_eps1
    # then the same command with --mode=sample, then with --mode=evaluate

Variant `:smoke` as in configs/fashion_mnist_eps10.py.
"""

import pathlib
import runpy

# configs/ is not a package: load the sibling file by path (works from any working directory).
_EPS10 = runpy.run_path(str(pathlib.Path(__file__).with_name("fashion_mnist_eps10.py")))


def get_config(arg=None):
    return _EPS10["fashion_mnist_dp_config"](1.0, arg)
