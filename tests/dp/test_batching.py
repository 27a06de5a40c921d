"""Properties of host-side batch selection: Poisson rates, determinism, chunk coverage, shapes."""

import math

import numpy as np
import pytest
from scipy import stats

from jaxdpdm.dp import accounting
from jaxdpdm.dp.batching import host_slice, poisson_sample, shuffled_batch, split_into_chunks


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_examples, rate", [(1000, 0.05), (200, 0.5), (50, 1.0)])
def test_poisson_inclusion_frequency_is_q(seed, num_examples, rate):
    steps = 400
    counts = np.zeros(num_examples)
    sizes = []
    for step in range(steps):
        selected = poisson_sample(num_examples, rate, seed=seed, step=step)
        assert selected.dtype == np.int64
        assert np.all(np.diff(selected) > 0)  # sorted, no duplicates
        counts[selected] += 1
        sizes.append(selected.size)
    # Every example: count ~ Binomial(steps, q). Over all examples the total is
    # Binomial(steps * N, q): allow 5 standard errors on the pooled frequency, and check that no
    # single example is far outside its own binomial range (Bonferroni over N at 1e-6).
    total = steps * num_examples
    pooled_se = math.sqrt(rate * (1 - rate) / total)
    assert abs(counts.sum() / total - rate) <= 5 * pooled_se + 1e-12
    low, high = stats.binom.ppf([1e-6 / num_examples, 1 - 1e-6 / num_examples], steps, rate)
    assert counts.min() >= low and counts.max() <= high
    # The realised batch size varies (it is Binomial(N, q), unless q = 1).
    assert (np.std(sizes) > 0) == (rate < 1)


def test_poisson_sample_is_a_function_of_seed_and_step():
    a = poisson_sample(5000, 0.01, seed=4, step=17)
    np.testing.assert_array_equal(a, poisson_sample(5000, 0.01, seed=4, step=17))
    assert not np.array_equal(a, poisson_sample(5000, 0.01, seed=4, step=18))
    assert not np.array_equal(a, poisson_sample(5000, 0.01, seed=5, step=17))


@pytest.mark.parametrize("draw_size", [0, 1, 7, 8, 9, 63, 64, 65, 200])
def test_chunks_cover_every_index_once_with_fixed_shapes(draw_size):
    chunk_size = 16
    indices = np.sort(np.random.default_rng(draw_size).choice(10_000, draw_size, replace=False))
    chunks = split_into_chunks(indices, chunk_size)
    assert len(chunks) == max(1, math.ceil(draw_size / chunk_size))
    for chunk, mask in chunks:
        assert chunk.shape == (chunk_size,) and chunk.dtype == np.int32
        assert mask.shape == (chunk_size,) and mask.dtype == bool
        assert np.all(chunk[~mask] == 0)
    real = np.concatenate([chunk[mask] for chunk, mask in chunks])
    np.testing.assert_array_equal(real, indices)  # each selected index exactly once, in order


def test_shuffled_batches_are_fixed_size_epochs_and_not_accountable_as_poisson():
    num_examples, batch_size = 103, 10
    epoch = [shuffled_batch(num_examples, batch_size, seed=1, step=s) for s in range(10)]
    assert all(b.shape == (batch_size,) for b in epoch)
    seen = np.concatenate(epoch)
    assert len(np.unique(seen)) == seen.size  # without replacement within an epoch
    np.testing.assert_array_equal(epoch[3], shuffled_batch(num_examples, batch_size, seed=1,
                                                           step=3))
    assert not np.array_equal(shuffled_batch(num_examples, batch_size, seed=1, step=10), epoch[0])
    ledger = accounting.PrivacyLedger(1.0, 1e-5)
    with pytest.raises(ValueError, match="Poisson"):
        ledger.record(1.0, batch_size / num_examples, sampling="shuffled")
    assert ledger.total_steps == 0


def test_host_slices_partition_the_chunk():
    chunk = np.arange(24)
    parts = [host_slice(chunk, p, 4) for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), chunk)
    with pytest.raises(ValueError):
        host_slice(np.arange(10), 0, 4)
    with pytest.raises(ValueError):
        host_slice(chunk, 4, 4)


@pytest.mark.parametrize("call", [
    lambda: poisson_sample(0, 0.1, seed=0, step=0),
    lambda: poisson_sample(10, 0.0, seed=0, step=0),
    lambda: poisson_sample(10, 1.5, seed=0, step=0),
    lambda: poisson_sample(10, 0.1, seed=-1, step=0),
    lambda: shuffled_batch(10, 11, seed=0, step=0),
    lambda: split_into_chunks(np.arange(3), 0),
])
def test_bad_arguments_raise(call):
    with pytest.raises(ValueError):
        call()
