"""jaxdpdm.dp: the privacy core of DP-SGD, usable with any JAX model.

* `clipped_grad_sum`: per-example gradients clipped to norm C and summed (sensitivity C).
* `dp_aggregate`: optax transformation adding N(0, (sigma C)^2) once per logical batch and
  dividing by the expected batch size.
* `batching`: host-side Poisson selection, fixed-shape padded chunks, per-host slices.
* `accounting`: epsilon, noise calibration, and a budget-enforcing, serialisable ledger.
* `report`: the privacy report of a run (JSON and text), recomputed from the ledger.
"""

import importlib

from jaxdpdm.dp import batching
from jaxdpdm.dp.batching import host_slice, poisson_sample, shuffled_batch, split_into_chunks
from jaxdpdm.dp.clipping import (ClipStats, as_typed_key, clipped_grad_sum, per_example_keys,
                                 trainable_mask)
from jaxdpdm.dp.noise import DPAggregateState, dp_aggregate, noise_key

__all__ = [
    "BudgetExceededError",
    "ClipStats",
    "DPAggregateState",
    "PrivacyLedger",
    "accounting",
    "as_typed_key",
    "batching",
    "calibrate_noise_multiplier",
    "clipped_grad_sum",
    "dp_aggregate",
    "epsilon",
    "host_slice",
    "noise_key",
    "per_example_keys",
    "poisson_sample",
    "shuffled_batch",
    "split_into_chunks",
    "trainable_mask",
]

_ACCOUNTING = ("BudgetExceededError", "PrivacyLedger", "calibrate_noise_multiplier", "epsilon")


def __getattr__(name):
    # dp_accounting loads on first use, so clipping, noise and jaxdpdm.parallel also run where it
    # is not installed (e.g. a bare GPU box checking the DP step).
    if name == "accounting" or name in _ACCOUNTING:
        accounting = importlib.import_module("jaxdpdm.dp.accounting")
        return accounting if name == "accounting" else getattr(accounting, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
