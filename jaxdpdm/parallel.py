"""Data-parallel training steps on a 1-D device mesh, single- or multi-host, with `jax.shard_map`.

DP step (`make_dp_step`): every device clips and sums the per-example gradients of its shard of a
fixed-size chunk (microbatched), the sums are `psum`-ed over the "data" axis, the chunks of one
logical Poisson batch are added, and ONE noise draw is made by the `dp_aggregate` inside the
optimizer. The per-example RNG key is `fold_in(step_key, example["index"])`, so the update does not
depend on the number of devices, the chunking or the padding: the same program gives the same
update (to float summation order) on 1 device and on 8.

Pretraining step (`make_pretrain_step`): the plain mean gradient, data parallel (`pmean`).

Both builders take an optional `ema_decay`: the exponential moving average of the parameters is
then updated inside the same compiled program as the optimizer step (one dispatch, one pass over
the parameters), instead of by a separate program after it.

Inputs are global `jax.Array`s sharded over "data" along their leading axis (`shard_batch`); on a
multi-host pod every process passes its own slice of the global batch (see `batching.host_slice`).
Parameters and optimizer state are replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdpdm.dp.clipping import ClipStats, clipped_grad_sum, per_example_keys, trainable_mask

PyTree = Any
DATA_AXIS = "data"


def make_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_data_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def _num_shards(mesh: Mesh) -> int:
    return int(mesh.shape[DATA_AXIS])


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Host arrays -> global arrays sharded over "data" along axis 0.

    Single host: `batch` is the whole batch, leading size a multiple of the number of devices.
    Multi-host: each process passes ITS contiguous slice (rows [p L, (p+1) L) of the global batch);
    the global leading size is L * process_count. Arrays already sharded this way pass through.
    """
    sharding = NamedSharding(mesh, P(DATA_AXIS))

    def put(x):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            raise ValueError("a global array with another sharding cannot be resharded here")
        x = np.asarray(x)
        global_rows = x.shape[0] * jax.process_count() if x.ndim else 0
        if x.ndim == 0 or global_rows % _num_shards(mesh):
            raise ValueError(f"batch leading size {global_rows} (over all processes) is not a "
                             f"multiple of the {_num_shards(mesh)} devices of the mesh")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places `tree` (same value on every process) fully replicated over the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def to_host(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) global array as one numpy array on every process."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _has_index(batch: PyTree) -> bool:
    return isinstance(batch, Mapping) and "index" in batch


def _local_keys(step_key: jax.Array, batch: PyTree, local_size: int) -> jax.Array:
    """Per-example keys of this device's shard, from dataset indices or GLOBAL row positions."""
    offset = jax.lax.axis_index(DATA_AXIS) * local_size
    return per_example_keys(step_key, batch, local_size, offset=offset)


@dataclasses.dataclass(frozen=True)
class DPStep:
    """One DP-SGD step, split so a logical batch can span several fixed-shape chunks.

    Attributes:
      accumulate: `(params, batch, mask, step_key) -> (grad_sum, ClipStats)`; batch leaves and
        mask bool[S] are sharded over "data" with S a multiple of n_devices * microbatch_size.
        grad_sum is the replicated float32 sum of clipped per-example gradients of the chunk.
      apply: `(params, opt_state, grad_sum, ema=None) -> (params, opt_state[, ema])`; the
        optimizer (which contains `dp_aggregate`) adds the one noise draw and divides by the
        expected batch size; frozen leaves come back unchanged; with `ema` (a params-shaped
        pytree; needs `ema_decay`) the updated EMA is returned as well.
      mesh: the data mesh.
    """
    accumulate: Callable[..., tuple[PyTree, ClipStats]]
    apply: Callable[..., tuple]
    mesh: Mesh

    def __call__(self, params: PyTree, opt_state: PyTree, chunks: Sequence[tuple[PyTree, Any]],
                 step_key: jax.Array, extra_sum: PyTree | None = None, *,
                 ema: PyTree | None = None):
        """Runs one logical batch given as chunks `[(batch, mask), ...]` of identical shapes.

        `grad_sum` adds the chunks' sums; noise is added ONCE (in `apply`), so splitting a Poisson
        draw into more chunks changes nothing but the summation order. `extra_sum` (audit runs
        only, `jaxdpdm.audit`) is a params-shaped float32 sum of clipped gradients of examples
        that are not in the chunks (gradient canaries); it is added before the noise, like a
        chunk's sum.

        Returns:
          (params, opt_state, ClipStats) with norms/losses f32[num_chunks * S] in chunk order;
          given `ema`, (params, opt_state, ClipStats, ema) with the EMA updated in `apply`.
        """
        grad_sum, stats = self.grad_sum(params, chunks, step_key)
        if extra_sum is not None:
            grad_sum = _tree_add(grad_sum, replicate(extra_sum, self.mesh))
        if ema is None:
            params, opt_state = self.apply(params, opt_state, grad_sum)
            return params, opt_state, stats
        params, opt_state, ema = self.apply(params, opt_state, grad_sum, ema)
        return params, opt_state, stats, ema

    def grad_sum(self, params: PyTree, chunks: Sequence[tuple[PyTree, Any]],
                 step_key: jax.Array) -> tuple[PyTree, ClipStats]:
        """The noiseless half of a step: one `accumulate` call per chunk, sums added on device.

        Host (numpy) chunks are sharded with `shard_batch`. Batches without an "index" field get
        per-chunk keys `fold_in(step_key, chunk_number)` so rows of different chunks never share
        a key. The sum is private data: only `apply` (noise) may release it.

        Returns:
          (grad_sum, ClipStats): the replicated float32 sum of clipped per-example gradients of
          every chunk, and the chunks' statistics merged in chunk order.
        """
        if not chunks:
            raise ValueError("a DP step needs at least one chunk (an empty Poisson draw is one "
                             "all-padding chunk)")
        grad_sum, all_stats = None, []
        for number, (batch, mask) in enumerate(chunks):
            batch, mask = shard_batch(batch, self.mesh), shard_batch(mask, self.mesh)
            key = step_key if _has_index(batch) else jax.random.fold_in(step_key, number)
            chunk_sum, stats = self.accumulate(params, batch, mask, key)
            grad_sum = chunk_sum if grad_sum is None else _tree_add(grad_sum, chunk_sum)
            all_stats.append(stats)
        return grad_sum, _merge_stats(all_stats)


@jax.jit
def _tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def _merge_stats(stats: Sequence[ClipStats]) -> ClipStats:
    if len(stats) == 1:
        return stats[0]
    return ClipStats(norms=jnp.concatenate([s.norms for s in stats]),
                     losses=jnp.concatenate([s.losses for s in stats]),
                     num_clipped=sum(s.num_clipped for s in stats),
                     num_nonfinite=sum(s.num_nonfinite for s in stats))


def ema_update(ema: PyTree, params: PyTree, decay: float) -> PyTree:
    """`decay * ema + (1 - decay) * params`, leaf by leaf, in the EMA's dtype."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)


def _ema_or_refuse(ema: PyTree | None, params: PyTree, decay: float | None) -> PyTree | None:
    if ema is None:
        return None
    if decay is None:
        raise ValueError("an EMA was passed to a step built without ema_decay")
    return ema_update(ema, params, decay)


def make_dp_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *, clip_norm: float,
                 microbatch_size: int, mesh: Mesh, trainable: PyTree | str | None = None,
                 ema_decay: float | None = None) -> DPStep:
    """Builds the jit(shard_map) DP-SGD step.

    Args:
      loss_fn: `loss_fn(params, example, rng) -> f32[]` of ONE example (see `clipped_grad_sum`).
      optimizer: must start with `dp_aggregate` (noise + division by the expected batch size),
        e.g. `optax.chain(dp_aggregate(...), optax.adam(3e-4))`.
      clip_norm: per-example clip norm C.
      microbatch_size: rows each device processes at once; bounds peak memory. The trainer
        passes chunks of exactly `n_devices * microbatch_size` rows (one microbatch per device
        per compiled call, looped on the host by `DPStep.__call__`); a larger chunk runs its
        microbatches as the library-only `lax.scan` of `clipped_grad_sum`.
      mesh: a 1-D "data" mesh (`make_data_mesh`).
      trainable: None, a path regex or a bool pytree (`clipping.trainable_mask`). Frozen leaves
        are not differentiated, take no part in the clipped norm, and are returned unchanged by
        `apply` whatever the optimizer makes of their (zero) updates (e.g. decoupled weight
        decay). Give the optimizer's `dp_aggregate` the same spec, so they get no noise either.
      ema_decay: if given, `apply` also updates an EMA of the parameters passed as `ema=`.
    """
    grad_fn = clipped_grad_sum(loss_fn, clip_norm=clip_norm, microbatch_size=microbatch_size,
                               trainable=trainable)
    num_shards = _num_shards(mesh)

    def device_sum(params, batch, mask, step_key):
        # Runs on one device with its shard: clip + sum locally, then the psum. Adding the per-
        # device sums is exactly the single-device sum (up to summation order): sensitivity C.
        keys = _local_keys(step_key, batch, mask.shape[0])
        grad_sum, stats = grad_fn(params, batch, mask, keys)
        grad_sum = jax.lax.psum(grad_sum, DATA_AXIS)
        stats = stats._replace(num_clipped=jax.lax.psum(stats.num_clipped, DATA_AXIS),
                               num_nonfinite=jax.lax.psum(stats.num_nonfinite, DATA_AXIS))
        return grad_sum, stats

    sharded_sum = jax.shard_map(device_sum, mesh=mesh,
                                in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P()),
                                out_specs=(P(), ClipStats(P(DATA_AXIS), P(DATA_AXIS), P(), P())))

    @jax.jit
    def accumulate(params, batch, mask, step_key):
        rows = mask.shape[0]
        if rows % (num_shards * microbatch_size):
            raise ValueError(f"chunk size {rows} is not a multiple of n_devices * microbatch_size "
                             f"= {num_shards} * {microbatch_size}")
        return sharded_sum(params, batch, mask, step_key)

    @jax.jit
    def apply(params, opt_state, grad_sum, ema=None):
        # Replicated computation: every device draws the same noise from the (seed, step) key in
        # opt_state, so there is one noise draw per logical batch, not one per device.
        updates, opt_state = optimizer.update(grad_sum, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if trainable is not None:  # a static, per-leaf choice: frozen leaves are the old arrays
            flags = jax.tree.leaves(trainable_mask(params, trainable))
            leaves, treedef = jax.tree.flatten(new_params)
            new_params = treedef.unflatten([
                new if flag else old
                for new, old, flag in zip(leaves, jax.tree.leaves(params), flags)
            ])
        ema = _ema_or_refuse(ema, new_params, ema_decay)
        return (new_params, opt_state) if ema is None else (new_params, opt_state, ema)

    return DPStep(accumulate=accumulate, apply=apply, mesh=mesh)


def _l2_norm(tree: PyTree) -> jax.Array:
    """Global L2 norm of a float pytree, f32[]."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_pretrain_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *, mesh: Mesh,
                       ema_decay: float | None = None) -> Callable:
    """Builds the non-private data-parallel step (mean gradient, no clipping, no noise).

    Returns:
      `step(params, opt_state, batch, step_key, *, ema=None) -> (params, opt_state,
      {"loss", "grad_norm"})`, batch leaves with leading size a multiple of the device count
      (host arrays are sharded with `shard_batch`); "loss" is the batch-mean loss before the
      update, "grad_norm" the global L2 norm of the mean gradient. Given `ema` (needs
      `ema_decay`), the EMA updated in the same program is returned last.
    """

    def device_mean(params, batch, step_key):
        local_size = jax.tree.leaves(batch)[0].shape[0]
        keys = _local_keys(step_key, batch, local_size)
        # Casting the replicated params to device-varying keeps the backward pass local; the mean
        # over devices is then one explicit pmean (equal shard sizes: mean of means = mean).
        varying = jax.lax.pcast(params, (DATA_AXIS,), to="varying")

        def mean_loss(p):
            return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, batch, keys))

        loss, grads = jax.value_and_grad(mean_loss)(varying)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        return jax.lax.pmean(loss, DATA_AXIS), jax.lax.pmean(grads, DATA_AXIS)

    sharded_mean = jax.shard_map(device_mean, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()),
                                 out_specs=(P(), P()))

    @jax.jit
    def jitted_step(params, opt_state, batch, step_key, ema):
        loss, grads = sharded_mean(params, batch, step_key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {"loss": loss, "grad_norm": _l2_norm(grads)}
        params = optax.apply_updates(params, updates)
        return params, opt_state, metrics, _ema_or_refuse(ema, params, ema_decay)

    def step(params, opt_state, batch, step_key, *, ema=None):
        out = jitted_step(params, opt_state, shard_batch(batch, mesh), step_key, ema)
        return out if ema is not None else out[:3]

    return step
