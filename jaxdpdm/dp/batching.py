"""Host-side (numpy) batch selection for DP-SGD and for non-private pretraining.

Privacy reasoning:

* `poisson_sample` includes every example independently with probability q. This is exactly the
  sampling the accountant's PoissonSampledDpEvent assumes; the realised batch size is random and
  must stay private (so it is never used as a normaliser, see `noise`).
* Compiled steps need fixed shapes, so a draw is split into fixed-size chunks, padded with masked
  rows (`split_into_chunks`). An unusually large draw gives MORE chunks, never a truncated batch:
  dropping examples silently would change the mechanism the accountant accounts for.
* `shuffled_batch` (fixed-size batches from per-epoch permutations) is a different mechanism. It
  has a distinct name, and the privacy ledger refuses to account it as Poisson
  (`PrivacyLedger.record(..., sampling="shuffled")` raises).
* All randomness is a function of (seed, step), so a resumed run selects the same batches.
"""

from __future__ import annotations

import numpy as np

# Distinct entropy words keep the Poisson and the shuffling streams apart for the same seed.
_POISSON_STREAM = 0x9015
_SHUFFLE_STREAM = 0x5F1E


def _check_seed_step(seed: int, step: int) -> None:
    for name, value in (("seed", seed), ("step", step)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {value!r}")


def poisson_sample(num_examples: int, sampling_rate: float, *, seed: int, step: int) -> np.ndarray:
    """Poisson subsampling: each of `num_examples` indices kept independently with prob. q.

    Args:
      num_examples: N >= 1, the dataset size.
      sampling_rate: q in (0, 1].
      seed, step: non-negative integers; the draw is a deterministic function of (seed, step).

    Returns:
      np.int64[n] sorted selected indices (n ~ Binomial(N, q); may be 0).
    """
    if int(num_examples) != num_examples or num_examples < 1:
        raise ValueError(f"num_examples must be a positive integer; got {num_examples!r}")
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1]; got {sampling_rate}")
    _check_seed_step(seed, step)
    rng = np.random.default_rng([int(seed), int(step), _POISSON_STREAM])
    return np.flatnonzero(rng.random(int(num_examples)) < sampling_rate).astype(np.int64)


def shuffled_batch(num_examples: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
    """Fixed-size batch for NON-private training: epoch-wise shuffling without replacement.

    Epoch e = step // (N // batch_size) uses a permutation seeded by (seed, e); step takes the
    consecutive `batch_size` slice of it (the N mod batch_size leftover indices of each epoch's
    permutation are skipped that epoch). NOT Poisson: never account it as such.

    Returns:
      np.int64[batch_size] distinct indices.
    """
    if int(num_examples) != num_examples or num_examples < 1:
        raise ValueError(f"num_examples must be a positive integer; got {num_examples!r}")
    if int(batch_size) != batch_size or not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"batch_size must be an integer in [1, {num_examples}]; got {batch_size!r}")
    _check_seed_step(seed, step)
    per_epoch = int(num_examples) // int(batch_size)
    epoch, position = divmod(int(step), per_epoch)
    rng = np.random.default_rng([int(seed), epoch, _SHUFFLE_STREAM])
    permutation = rng.permutation(int(num_examples))
    start = position * int(batch_size)
    return permutation[start:start + int(batch_size)].astype(np.int64)


def split_into_chunks(indices: np.ndarray, chunk_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Splits selected indices into fixed-size, padded chunks; every index lands in exactly one.

    Args:
      indices: int[n] selected example indices (any n >= 0, e.g. from `poisson_sample`).
      chunk_size: S >= 1 rows per chunk.

    Returns:
      max(1, ceil(n / S)) pairs `(chunk_indices np.int32[S], mask bool[S])`. Real rows come first
      in order; padding rows have mask False and index 0 (a valid row to gather, contributing
      exactly zero downstream). An empty draw still gives one all-padding chunk, so a step always
      runs (and releases pure noise, as the accountant assumes).
    """
    if int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size!r}")
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"indices must be 1-D; got shape {indices.shape}")
    if indices.size and (indices.min() < 0 or indices.max() > np.iinfo(np.int32).max):
        raise ValueError("indices must lie in [0, 2**31)")
    chunk_size = int(chunk_size)
    num_chunks = max(1, -(-indices.size // chunk_size))
    padded = np.zeros(num_chunks * chunk_size, np.int32)
    padded[:indices.size] = indices
    mask = np.zeros(num_chunks * chunk_size, bool)
    mask[:indices.size] = True
    return [(padded[c * chunk_size:(c + 1) * chunk_size], mask[c * chunk_size:(c + 1) * chunk_size])
            for c in range(num_chunks)]


def host_slice(array: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This host's contiguous part of `array` along axis 0 (multi-host data loading).

    Every host draws the same global selection from (seed, step); host p then loads rows
    [p * L, (p + 1) * L) with L = len(array) / process_count, which is the slice that
    `jax.make_array_from_process_local_data` expects from it for a batch sharded over "data".
    """
    array = np.asarray(array)
    if int(process_count) != process_count or process_count < 1:
        raise ValueError(f"process_count must be a positive integer; got {process_count!r}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}); got {process_index}")
    if array.ndim == 0 or array.shape[0] % process_count:
        raise ValueError(f"leading size {array.shape[:1]} is not divisible by "
                         f"process_count={process_count}")
    local = array.shape[0] // process_count
    return array[process_index * local:(process_index + 1) * local]
