"""Per-example gradient clipping: the sensitivity-bounding half of DP-SGD.

`clipped_grad_sum` turns a per-example loss into a function that returns the SUM over the real
examples of a batch of per-example gradients, each clipped to global L2 norm <= `clip_norm`.

Privacy reasoning. Under add/remove-one adjacency, adding or removing one example changes this sum
by exactly that example's clipped gradient, whose norm is <= C: the sum has L2 sensitivity C,
whatever the model, the data, the padding or the microbatching. Everything in this module exists
to keep that sentence true:

* the gradient of one example is computed from that example alone (`jax.vmap(jax.grad(...))` over
  a loss that sees one example and its own RNG key), so no example can leak into another's term;
* padding rows (mask False) are removed with `jnp.where`, never multiplied by 0 (0 * NaN = NaN);
* a non-finite per-example gradient is zeroed and counted instead of poisoning the sum: its norm
  cannot be bounded, and dropping it is a function of that example alone;
* norms are computed with a max-abs rescaling so huge gradients clip to norm C (not to 0 through
  overflow) and tiny ones are not flushed to 0 by squaring underflow;
* sums accumulate in float32 whatever the parameter dtype.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]


class ClipStats(NamedTuple):
    """Diagnostics of one `clipped_grad_sum` call over a batch of B rows.

    These are computed from private data without noise: monitoring only, never to be released.

    Attributes:
      norms: f32[B] pre-clip global L2 norm of each example's gradient (0 for padding; NaN or inf
        for an example whose gradient was non-finite).
      losses: f32[B] each example's loss (0 for padding).
      num_clipped: i32[] real, finite examples whose norm exceeded the clip norm.
      num_nonfinite: i32[] real examples whose gradient had a NaN or Inf and was zeroed.
    """
    norms: jax.Array
    losses: jax.Array
    num_clipped: jax.Array
    num_nonfinite: jax.Array


def param_path(path) -> str:
    """'params/Dense_0/kernel' for the key path of a leaf."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def trainable_mask(params: PyTree, trainable: PyTree | str | None) -> PyTree:
    """Resolves a trainable-parameter spec to a boolean pytree with the structure of `params`.

    Args:
      params: the parameter pytree (arrays or shape structs; only the structure is used).
      trainable: None (everything trainable); a regular expression searched in each leaf's path
        ("params/Block_0/Conv_0/kernel"); or a pytree of Python bools with the structure of
        `params`.

    Returns:
      A pytree of Python bools, True for trainable leaves.

    Raises:
      ValueError: the spec has the wrong structure, is not concrete, or selects no parameter.
    """
    if trainable is None:
        return jax.tree.map(lambda _: True, params)
    if isinstance(trainable, str):
        pattern = re.compile(trainable)
        mask = jax.tree_util.tree_map_with_path(
            lambda path, _: bool(pattern.search(param_path(path))), params)
    else:
        treedef = jax.tree.structure(params)
        try:
            flags = treedef.flatten_up_to(trainable)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"trainable mask does not match the parameter structure: {err}") from err
        try:
            # Concrete Python bools: the split into differentiated / frozen leaves is static.
            mask = treedef.unflatten([bool(f) for f in flags])
        except jax.errors.ConcretizationTypeError as err:
            raise ValueError("trainable mask must hold concrete bools, not traced arrays") from err
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"trainable={trainable!r} selects no parameter")
    return mask


def is_typed_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def as_typed_key(rng: Any) -> jax.Array:
    """A typed key array from a typed key (returned as is) or raw uint32 key data.

    Raw keys are what `jax.random.PRNGKey(seed)` returns: uint32 `[..., 2]` for the default
    threefry implementation. `jax.random.wrap_key_data` turns them into typed keys with the same
    bits, so `as_typed_key(jax.random.PRNGKey(s))` draws exactly what `jax.random.key(s)` draws.

    Raises:
      ValueError: `rng` is neither (e.g. a float array, an int seed, a wrongly shaped uint32 array).
    """
    if is_typed_key(rng):
        return rng
    dtype = getattr(rng, "dtype", None)
    if dtype == jnp.uint32 and jnp.ndim(rng) >= 1:
        try:
            return jax.random.wrap_key_data(rng)
        except (TypeError, ValueError) as e:
            raise ValueError(f"rng: uint32{list(jnp.shape(rng))} is not raw key data of the "
                             f"default PRNG implementation ({e})") from e
    raise ValueError("rng must be a PRNG key from jax.random.key(...) or jax.random.PRNGKey(...) "
                     f"(got {dtype if dtype is not None else type(rng).__name__})")


def per_example_keys(rng: jax.Array, batch: PyTree, batch_size: int,
                     offset: int | jax.Array = 0) -> jax.Array:
    """The RNG key of every row of a batch: key[B] typed keys.

    `rng` is a typed key (`jax.random.key`) or raw key data (`jax.random.PRNGKey`), converted by
    `as_typed_key`. With a scalar key, row i gets `fold_in(rng, batch["index"][i])` when the batch
    is a mapping with an "index" field (the example's dataset position: the key then does not
    depend on sharding, microbatching or padding position), else `fold_in(rng, offset + i)`. A [B]
    array of keys is returned (as typed keys) unchanged.
    """
    rng = as_typed_key(rng)
    if rng.shape == (batch_size,):
        return rng
    if rng.shape != ():
        raise ValueError(f"rng must be a scalar key or have shape ({batch_size},); got {rng.shape}")
    if isinstance(batch, Mapping) and "index" in batch:
        ids = jnp.asarray(batch["index"]).astype(jnp.int32)
    else:
        ids = offset + jnp.arange(batch_size, dtype=jnp.int32)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, ids)


def _vary_over_manual_axes(tree: PyTree) -> PyTree:
    """Marks `tree` as device-varying when traced inside `jax.shard_map` (no-op outside).

    Inside shard_map, replicated parameters are "unvarying"; differentiating a device-local loss
    with respect to them would make JAX insert a psum in the backward pass, i.e. sum per-example
    gradients ACROSS devices before clipping: a privacy bug. Casting them to varying keeps every
    per-example gradient local. The same cast lets a zero-initialised scan carry accumulate
    device-local sums.
    """
    axes = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    if not axes:
        return tree
    return jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), tree)


def _clip_one(loss_of_trainable, clip_norm: float, trainable_leaves, example, key):
    """Loss, clipped f32 gradient, pre-clip norm and finiteness of ONE example.

    The norm is computed as max_abs * ||g / max_abs||: the rescaled squares lie in [0, 1], so they
    neither overflow (a 1e30 gradient still clips to norm C, in its direction) nor underflow.
    """
    loss, grads = jax.value_and_grad(loss_of_trainable)(trainable_leaves, example, key)
    grads = [g.astype(jnp.float32) for g in grads]
    # jnp.max propagates NaN, so max_abs is finite iff every coordinate is finite.
    max_abs = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in grads]))
    finite = jnp.isfinite(max_abs)
    scale = jnp.where(finite & (max_abs > 0), max_abs, 1.0)
    unit = [g / scale for g in grads]
    unit_norm = jnp.sqrt(sum(jnp.sum(jnp.square(u)) for u in unit))
    norm = scale * unit_norm
    if math.isinf(clip_norm):
        clipped = grads
    else:
        # When norm > C, max_abs > 0 so unit_norm >= 1: C / unit_norm is finite. Unclipped
        # gradients are passed through unchanged (exact, not rescaled back and forth).
        shrink = clip_norm / jnp.maximum(unit_norm, 1.0)
        over = norm > clip_norm
        clipped = [jnp.where(over, u * shrink, g) for u, g in zip(unit, grads)]
    return loss.astype(jnp.float32), clipped, norm, finite


def clipped_grad_sum(loss_fn: LossFn, *, clip_norm: float, microbatch_size: int | None = None,
                     trainable: PyTree | str | None = None):
    """Builds `grad_fn(params, batch, mask, rng) -> (grad_sum, ClipStats)`.

    Args:
      loss_fn: `loss_fn(params, example, rng) -> f32[]`, the loss of ONE example (a slice of
        `batch` without the batch axis) under its own typed PRNG key (a raw key given to
        `grad_fn` is converted first). It must not look at other examples (no BatchNorm across
        the batch).
      clip_norm: C > 0, the bound on each example's gradient norm; `math.inf` disables clipping
        (non-private use and tests only).
      microbatch_size: if given, the B rows are processed in B / microbatch_size sequential
        microbatches (`lax.scan`), so peak memory is set by the microbatch, not by B. B must be a
        multiple of it. The result does not depend on it (up to float summation order).
        Microbatches made only of padding are skipped (`lax.cond`). Library-only: jaxdpdm's
        trainer never takes this path; it calls the compiled step once per microbatch
        (B = microbatch_size per device, looped on the host by `parallel.DPStep`), which
        XLA:CPU ran about 10x faster than the scan (benchmarks/RESULTS.md section 5).
      trainable: None, a path regex, or a bool pytree (see `trainable_mask`). Frozen leaves are
        closed over as constants, so they are never differentiated (no weight-gradient compute),
        and come back as float32 zeros.

    Returns:
      `grad_fn(params, batch, mask, rng)` where
        params: the parameter pytree (any float dtype);
        batch: pytree whose leaves have a leading batch axis B;
        mask: bool[B], True for real examples, False for padding rows;
        rng: a scalar key (per-example keys from `per_example_keys`) or key[B], typed
          (`jax.random.key`) or raw uint32 (`jax.random.PRNGKey`; see `as_typed_key`);
      returning `grad_sum` (params-shaped float32 pytree: sum over real examples of clipped
      per-example gradients) and `ClipStats`.
    """
    clip_norm = float(clip_norm)
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 (math.inf disables clipping); got {clip_norm}")
    if microbatch_size is not None and (int(microbatch_size) != microbatch_size or
                                        microbatch_size < 1):
        raise ValueError(
            f"microbatch_size must be a positive integer or None; got {microbatch_size}")

    def grad_fn(params: PyTree, batch: PyTree, mask: jax.Array, rng: jax.Array):
        mask = jnp.asarray(mask)
        if mask.ndim != 1 or mask.dtype != jnp.bool_:
            raise ValueError(f"mask must be bool[B]; got {mask.dtype}{list(mask.shape)}")
        batch_size = mask.shape[0]
        for leaf in jax.tree.leaves(batch):
            if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch_size:
                raise ValueError(f"every batch leaf needs leading axis B={batch_size}; "
                                 f"got shape {jnp.shape(leaf)}")
        micro = batch_size if microbatch_size is None else int(microbatch_size)
        if batch_size % micro:
            raise ValueError(f"batch size {batch_size} is not a multiple of "
                             f"microbatch_size={micro}")
        keys = per_example_keys(rng, batch, batch_size)

        leaves, treedef = jax.tree.flatten(params)
        flags = treedef.flatten_up_to(trainable_mask(params, trainable))
        train_ids = [i for i, f in enumerate(flags) if f]
        train_leaves = _vary_over_manual_axes([leaves[i] for i in train_ids])

        def loss_of_trainable(train_part, example, key):
            full = list(leaves)
            for i, leaf in zip(train_ids, train_part):
                full[i] = leaf
            return loss_fn(treedef.unflatten(full), example, key)

        def microbatch_sum(mb_batch, mb_mask, mb_keys):
            losses, clipped, norms, finite = jax.vmap(
                lambda ex, k: _clip_one(loss_of_trainable, clip_norm, train_leaves, ex, k))(
                    mb_batch, mb_keys)
            keep = mb_mask & finite
            sums = [
                jnp.sum(jnp.where(keep.reshape((-1,) + (1,) * (c.ndim - 1)), c, 0.0), axis=0)
                for c in clipped
            ]
            stats = ClipStats(norms=jnp.where(mb_mask, norms,
                                              0.0), losses=jnp.where(mb_mask, losses, 0.0),
                              num_clipped=jnp.sum(keep & (norms > clip_norm), dtype=jnp.int32),
                              num_nonfinite=jnp.sum(mb_mask & ~finite, dtype=jnp.int32))
            return sums, stats

        if micro == batch_size:
            sums, stats = microbatch_sum(batch, mask, keys)
        else:
            num_micro = batch_size // micro
            split = lambda x: x.reshape((num_micro, micro) + x.shape[1:])

            def skipped(mb_batch, mb_mask, mb_keys):
                del mb_batch, mb_keys
                zeros = ([jnp.zeros(leaf.shape, jnp.float32) for leaf in train_leaves],
                         ClipStats(jnp.zeros(mb_mask.shape, jnp.float32),
                                   jnp.zeros(mb_mask.shape, jnp.float32), jnp.zeros((), jnp.int32),
                                   jnp.zeros((), jnp.int32)))
                return _vary_over_manual_axes(zeros)

            def body(carry, xs):
                acc_sums, acc_clipped, acc_nonfinite = carry
                # Poisson draws are padded to a fixed shape; a microbatch of padding only
                # contributes zero, so its forward and backward passes are skipped outright.
                sums, st = jax.lax.cond(jnp.any(xs[1]), microbatch_sum, skipped, *xs)
                carry = ([a + s for a, s in zip(acc_sums, sums)], acc_clipped + st.num_clipped,
                         acc_nonfinite + st.num_nonfinite)
                return carry, (st.norms, st.losses)

            init = _vary_over_manual_axes(
                ([jnp.zeros(leaf.shape, jnp.float32) for leaf in train_leaves],
                 jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)))
            (sums, n_clipped, n_nonfinite), (norms, losses) = jax.lax.scan(
                body, init, (jax.tree.map(split, batch), split(mask), split(keys)))
            stats = ClipStats(norms.reshape(batch_size), losses.reshape(batch_size), n_clipped,
                              n_nonfinite)

        out = [jnp.zeros(leaf.shape, jnp.float32) for leaf in leaves]
        for i, s in zip(train_ids, sums):
            out[i] = s
        return treedef.unflatten(out), stats

    return grad_fn
