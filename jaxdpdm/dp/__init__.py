"""jaxdpdm.dp: the privacy core of DP-SGD, usable with any JAX model.

* `clipped_grad_sum`: per-example gradients clipped to norm C and summed (sensitivity C).
* `dp_aggregate`: optax transformation adding N(0, (sigma C)^2) once per logical batch and
  dividing by the expected batch size.
* `batching`: host-side Poisson selection, fixed-shape padded chunks, per-host slices.
* `accounting`: epsilon, noise calibration, and a budget-enforcing, serialisable ledger.
"""

from jaxdpdm.dp import accounting, batching
from jaxdpdm.dp.accounting import (BudgetExceededError, PrivacyLedger, calibrate_noise_multiplier,
                                   epsilon)
from jaxdpdm.dp.batching import (host_slice, physical_batch_size, poisson_sample, shuffled_batch,
                                 split_into_chunks)
from jaxdpdm.dp.clipping import ClipStats, clipped_grad_sum, per_example_keys, trainable_mask
from jaxdpdm.dp.noise import DPAggregateState, dp_aggregate, noise_key

__all__ = [
    "BudgetExceededError", "ClipStats", "DPAggregateState", "PrivacyLedger", "accounting",
    "batching", "calibrate_noise_multiplier", "clipped_grad_sum", "dp_aggregate", "epsilon",
    "host_slice", "noise_key", "per_example_keys", "physical_batch_size", "poisson_sample",
    "shuffled_batch", "split_into_chunks", "trainable_mask",
]
