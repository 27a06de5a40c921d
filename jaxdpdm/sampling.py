"""DDPM ancestral and DDIM sampling with classifier-free guidance, and resumable generation.

Samplers are pure functions of (params, schedule, key, labels) that run the whole reverse
chain inside one `lax.fori_loop`, so a jitted sampler compiles once per batch shape whatever
the number of steps. Randomness: `key` is split into an initial-noise key and a step key; the
noise added at timestep t is drawn from `fold_in(step_key, t)`. Keying by the timestep (not by
the loop counter) makes DDIM with `eta=1, num_steps=T` draw exactly DDPM's noise, so the two
coincide (see `ddim_sample`).

Classifier-free guidance (Ho & Salimans, 2022) with scale w:
`eps = (1 + w) eps(x, y) - w eps(x, null)`. With w = 0 (a static Python float) the null branch
is not evaluated at all, so the sampler is exactly the plain conditional model; with w != 0
both branches run as one model call on a doubled batch.

`model_fn(params, x f32[B,H,W,C], t i32[B], y i32[B]) -> eps f32[B,H,W,C]` must be
deterministic (no dropout). Unconditional models receive labels too and ignore them.

`generate_samples` writes any number of samples to `out_dir/samples/chunk_XXXXX.npz`
(uint8 "images" `[n,H,W,C]`, int32 "labels" `[n]`), each chunk one batch, written atomically;
the key of chunk i is `fold_in(key(seed), i)` and its labels are fixed by (seed, i), so a killed
run resumes where it stopped and the result equals an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdpdm import diffusion
from jaxdpdm.images import display_scale, from_model_range, save_grid_png

logger = logging.getLogger(__name__)

ModelFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]
SampleFn = Callable[[jax.Array, jax.Array], jax.Array]
Sampler = Callable[[Any, diffusion.Schedule, jax.Array, jax.Array], jax.Array]


def guided_eps(model_fn: ModelFn, params: Any, x: jax.Array, t: jax.Array, labels: jax.Array, *,
               guidance_scale: float = 0.0, null_label: int | None = None) -> jax.Array:
    """Classifier-free guided noise prediction `(1 + w) eps(x, y) - w eps(x, null)`.

    Args:
      x: `[B, H, W, C]`; t: i32 `[B]`; labels: i32 `[B]`.
      guidance_scale: w, a static Python float; 0 evaluates only the conditional branch.
      null_label: the model's null label (its `num_classes`); required when w != 0.
    Returns:
      eps `[B, H, W, C]`.
    """
    if guidance_scale == 0.0:
        return model_fn(params, x, t, labels)
    if null_label is None:
        raise ValueError("classifier-free guidance (guidance_scale != 0) needs null_label")
    batch = x.shape[0]
    nulls = jnp.full_like(labels, null_label)
    # One call on a doubled batch: better device utilisation than two sequential calls.
    eps = model_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                   jnp.concatenate([labels, nulls]))
    cond, uncond = eps[:batch], eps[batch:]
    return (1.0 + guidance_scale) * cond - guidance_scale * uncond


def _check_common(labels, image_shape) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels must be i32[B], got shape {labels.shape}")
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (H, W, C), got {image_shape}")


def ddpm_sample(model_fn: ModelFn, params: Any, schedule: diffusion.Schedule, key: jax.Array,
                labels: jax.Array, image_shape: tuple[int, int, int], *,
                guidance_scale: float = 0.0, null_label: int | None = None,
                clip_denoised: bool = True, variance: str = "posterior") -> jax.Array:
    """DDPM ancestral sampling over all T steps (Ho et al., 2020).

    Each step predicts x0 from the (guided) eps, optionally clips it to [-1, 1]
    (`clip_denoised`, which keeps early, poorly-conditioned x0 estimates in the data range),
    and draws `x_{t-1} ~ N(mean of q(x_{t-1} | x_t, x0), var)`.

    Args:
      model_fn, params: the eps model and its parameters.
      schedule: `diffusion.Schedule` with T steps.
      key: typed PRNG key.
      labels: i32 `[B]` class labels.
      image_shape: `(H, W, C)`.
      guidance_scale, null_label: see `guided_eps`.
      clip_denoised: clip predicted x0 to [-1, 1].
      variance: "posterior" (beta tilde, the true posterior variance) or "beta" (beta_t, the
        upper bound of Ho et al.). No noise is added at the last step (t = 0) in both cases.
    Returns:
      f32 `[B, H, W, C]` samples, nominally in [-1, 1].
    """
    _check_common(labels, image_shape)
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    batch = labels.shape[0]
    num_steps = schedule.num_timesteps
    init_key, step_key = jax.random.split(key)
    x_init = jax.random.normal(init_key, (batch, *image_shape), jnp.float32)

    def body(i, x):
        t = num_steps - 1 - i
        tb = jnp.full((batch,), t, jnp.int32)
        eps = guided_eps(model_fn, params, x, tb, labels, guidance_scale=guidance_scale,
                         null_label=null_label)
        x0 = diffusion.predict_x0_from_eps(schedule, x, tb, eps)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        mean, var, _ = diffusion.q_posterior(schedule, x0, x, tb)
        if variance == "beta":
            var = jnp.where(t > 0, schedule.betas[t], 0.0)
        noise = jax.random.normal(jax.random.fold_in(step_key, t), x.shape, x.dtype)
        return mean + jnp.sqrt(var) * noise

    return lax.fori_loop(0, num_steps, body, x_init)


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """The S timesteps DDIM visits, descending, evenly spaced and including T-1 and 0.

    Starting at T-1 (rather than DDIM's `range(0, T, T // S)`, which starts below T-1) matches
    the pure-noise initialisation to the noise level the model was trained for at the end.
    Returns np.int32 `[S]`.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    steps = np.rint(np.linspace(num_timesteps - 1, 0, num_steps)).astype(np.int32)
    assert np.all(np.diff(steps) < 0), steps  # spacing >= 1, so rounding keeps them distinct
    return steps


def ddim_sample(model_fn: ModelFn, params: Any, schedule: diffusion.Schedule, key: jax.Array,
                labels: jax.Array, image_shape: tuple[int, int, int], *, num_steps: int,
                eta: float = 0.0, guidance_scale: float = 0.0, null_label: int | None = None,
                clip_denoised: bool = True) -> jax.Array:
    """DDIM sampling (Song et al., 2021) on S respaced steps (`ddim_timesteps`).

    From timestep t to the previous visited timestep s (abar_s = 1 after the last step):
    `x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z`, with
    `sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)`. After clipping
    x0, eps is recomputed from it so that (x0, eps) stay consistent with x_t.
    eta = 0 is deterministic given the initial noise. eta = 1 with S = T gives sigma^2 =
    beta tilde and the same mean as DDPM's posterior: then this sampler equals
    `ddpm_sample(variance="posterior")` step for step, noise included.

    Args: as `ddpm_sample`, plus
      num_steps: S in [1, T].
      eta: stochasticity >= 0, a static Python float; 0 = deterministic DDIM, 1 = DDPM-like.
    Returns:
      f32 `[B, H, W, C]` samples.
    """
    _check_common(labels, image_shape)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    steps = ddim_timesteps(schedule.num_timesteps, num_steps)
    timesteps = jnp.asarray(steps)
    abar = schedule.alphas_cumprod[timesteps]
    abar_prev = jnp.concatenate(
        [schedule.alphas_cumprod[timesteps[1:]],
         jnp.ones((1,), abar.dtype)])  # after the last step: abar = 1
    batch = labels.shape[0]
    init_key, step_key = jax.random.split(key)
    x_init = jax.random.normal(init_key, (batch, *image_shape), jnp.float32)

    def body(i, x):
        t = timesteps[i]
        tb = jnp.full((batch,), t, jnp.int32)
        eps = guided_eps(model_fn, params, x, tb, labels, guidance_scale=guidance_scale,
                         null_label=null_label)
        x0 = diffusion.predict_x0_from_eps(schedule, x, tb, eps)
        if clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = diffusion.predict_eps_from_x0(schedule, x, tb, x0)
        a_t, a_s = abar[i], abar_prev[i]
        sigma = eta * jnp.sqrt((1.0 - a_s) / (1.0 - a_t)) * jnp.sqrt(1.0 - a_t / a_s)
        direction = jnp.sqrt(jnp.maximum(1.0 - a_s - sigma**2, 0.0))
        x_prev = jnp.sqrt(a_s) * x0 + direction * eps
        if eta > 0:
            noise = jax.random.normal(jax.random.fold_in(step_key, t), x.shape, x.dtype)
            x_prev = x_prev + sigma * noise
        return x_prev

    return lax.fori_loop(0, steps.shape[0], body, x_init)


def make_sampler(model_fn: ModelFn, schedule: diffusion.Schedule, *, image_shape: tuple[int, int,
                                                                                        int],
                 method: str = "ddim", num_steps: int | None = None, eta: float = 0.0,
                 guidance_scale: float = 0.0, null_label: int | None = None,
                 clip_denoised: bool = True, ddpm_variance: str = "posterior") -> Sampler:
    """Validates the settings and binds them to a model: a pure, jittable sampler
    `sample(params, schedule, key, labels i32[B]) -> f32[B,H,W,C]` in [-1, 1].

    Args:
      schedule: used here only to validate `num_steps`; the sampler takes the schedule as an
        argument, so a jitted sampler does not bake it into the program as constants.
      method: "ddpm" (all T steps; `num_steps` must be None or T) or "ddim" (`num_steps`
        defaults to T).
      ddpm_variance: `variance` of `ddpm_sample` (unused by DDIM).
      Other arguments: see `ddpm_sample` / `ddim_sample`.
    """
    if method == "ddpm":
        if num_steps not in (None, schedule.num_timesteps):
            raise ValueError("ddpm runs all T steps; use method='ddim' to respace")
        if ddpm_variance not in ("posterior", "beta"):
            raise ValueError(f"ddpm_variance must be 'posterior' or 'beta', got {ddpm_variance!r}")

        def sample(p, sched, key, labels):
            return ddpm_sample(model_fn, p, sched, key, labels, image_shape,
                               guidance_scale=guidance_scale, null_label=null_label,
                               clip_denoised=clip_denoised, variance=ddpm_variance)
    elif method == "ddim":
        steps = schedule.num_timesteps if num_steps is None else num_steps
        ddim_timesteps(schedule.num_timesteps, steps)  # validate now, not at first call

        def sample(p, sched, key, labels):
            return ddim_sample(model_fn, p, sched, key, labels, image_shape, num_steps=steps,
                               eta=eta, guidance_scale=guidance_scale, null_label=null_label,
                               clip_denoised=clip_denoised)
    else:
        raise ValueError(f"method must be 'ddpm' or 'ddim', got {method!r}")
    if guidance_scale != 0.0 and null_label is None:
        raise ValueError("classifier-free guidance (guidance_scale != 0) needs null_label")
    return sample


def jit_sampler(sample: Sampler, params: Any, schedule: diffusion.Schedule, *,
                mesh: Mesh | None = None) -> SampleFn:
    """Jits a sampler from `make_sampler` with its parameters and schedule:
    `sample_fn(key, labels i32[B]) -> f32[B,H,W,C]`.

    Parameters and schedule are passed to the jitted function as arguments (not closed over),
    so they are not baked into the compiled program as constants.

    Args:
      mesh: optional 1-D mesh with axis "data": labels and samples are sharded over it along the
        batch (which must be divisible by the device count), params replicated. Samples do not
        depend on the number of devices (jax's partitionable threefry draws the same numbers).
    """
    if mesh is None:
        jitted = jax.jit(sample)
        device_params = jax.device_put(params)
    else:
        if mesh.axis_names != ("data",):
            raise ValueError(f"mesh must have the single axis 'data', got {mesh.axis_names}")
        replicated = NamedSharding(mesh, PartitionSpec())
        batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
        jitted = jax.jit(sample, in_shardings=(replicated, replicated, replicated, batch_sharded),
                         out_shardings=batch_sharded)
        device_params = jax.device_put(params, replicated)

    def sample_fn(key: jax.Array, labels) -> jax.Array:
        labels = jnp.asarray(labels, jnp.int32)
        if mesh is not None and labels.shape[0] % mesh.size:
            raise ValueError(f"batch {labels.shape[0]} is not divisible by the {mesh.size} devices")
        return jitted(device_params, schedule, key, labels)

    return sample_fn


def make_sample_fn(model_fn: ModelFn, params: Any, schedule: diffusion.Schedule, *,
                   mesh: Mesh | None = None, **settings: Any) -> SampleFn:
    """`jit_sampler(make_sampler(model_fn, schedule, **settings), params, schedule, mesh=mesh)`:
    `sample_fn(key, labels i32[B]) -> f32[B,H,W,C]` in [-1, 1]."""
    return jit_sampler(make_sampler(model_fn, schedule, **settings), params, schedule, mesh=mesh)


# ----------------------------------------------------------------------------------------------
# Resumable generation to disk.


class GenerationSummary(NamedTuple):
    samples_dir: str
    num_chunks: int
    num_generated: int  # chunks sampled in this call
    num_reused: int  # valid chunks found on disk and kept
    grid_path: str | None


def balanced_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """Labels with equal class counts (label i = i mod C), in an order fixed by `seed`.

    Uniform over classes on purpose: the private data's label histogram is itself private
    information, so it is not used unless it was released through a DP mechanism.
    Returns np.int32 `[num_samples]`.
    """
    labels = np.arange(num_samples, dtype=np.int64) % num_classes
    return np.random.default_rng(seed).permutation(labels).astype(np.int32)


def chunk_path(out_dir: str | os.PathLike, chunk_index: int) -> str:
    return os.path.join(os.fspath(out_dir), "samples", f"chunk_{chunk_index:05d}.npz")


def _read_chunk(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """A chunk's (images, labels), or None if it is missing or unreadable."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["images"], data["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _write_npz_atomic(path: str, **arrays) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # readers and resumed runs never see a partial chunk
    except OSError as e:  # a full disk: name the file (writes through a descriptor do not)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise OSError(e.errno, e.strerror, e.filename or path) from e
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _check_or_write_meta(samples_dir: str, meta: dict) -> None:
    path = os.path.join(samples_dir, "meta.json")
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        if existing != meta:
            changed = ", ".join(f"{key}: {existing.get(key)!r} there, {meta.get(key)!r} now"
                                for key in sorted(set(existing) | set(meta))
                                if existing.get(key) != meta.get(key))
            raise ValueError(f"{samples_dir} holds samples made with different settings "
                             f"({changed}); move or delete it to sample with these settings")
        return
    fd, tmp = tempfile.mkstemp(dir=samples_dir, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def generate_samples(sample_fn: SampleFn, *, out_dir: str | os.PathLike, num_samples: int,
                     num_classes: int, batch_size: int, seed: int, grid_per_class: int = 8,
                     max_grid_classes: int = 20, metadata: dict | None = None,
                     progress_fn: Callable[[int, int], None] | None = None) -> GenerationSummary:
    """Generates `num_samples` class-balanced samples into `out_dir/samples/`, resumably.

    Chunk i holds samples `[i * batch_size, (i + 1) * batch_size)`; its key is
    `fold_in(key(seed), i)` and its labels are `balanced_labels(num_samples, num_classes,
    seed)[that range]`. A chunk already on disk with the expected labels is kept, so rerunning
    after a kill generates only the missing chunks and ends with the files an uninterrupted run
    writes. The settings are recorded in `samples/meta.json`; resuming with other settings
    raises `ValueError`. The last chunk's batch is padded to `batch_size` (one compile) and
    trimmed. Finally `out_dir/samples_grid.png` shows up to `grid_per_class` samples for each
    of the first `max_grid_classes` classes, one row per class.

    Args:
      sample_fn: `(key, labels i32[batch_size]) -> f32[batch_size, H, W, C]` in [-1, 1], e.g.
        from `make_sample_fn`.
      num_classes: number of classes (1 for an unconditional model).
      metadata: extra JSON-able settings recorded in meta.json (sampler, steps, guidance...).
      progress_fn: called as `progress_fn(chunk_index, num_chunks)` after each chunk is written;
        an exception raised there stops generation (the chunk is already saved).
    """
    for name, value in (("num_samples", num_samples), ("num_classes", num_classes), ("batch_size",
                                                                                     batch_size)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    samples_dir = os.path.join(os.fspath(out_dir), "samples")
    os.makedirs(samples_dir, exist_ok=True)
    meta = {
        "num_samples": int(num_samples), "num_classes": int(num_classes),
        "batch_size": int(batch_size), "seed": int(seed), **(metadata or {})
    }
    _check_or_write_meta(samples_dir, json.loads(json.dumps(meta)))

    labels = balanced_labels(num_samples, num_classes, seed)
    num_chunks = -(-num_samples // batch_size)
    base_key = jax.random.key(seed)
    generated = reused = 0
    for chunk in range(num_chunks):
        chunk_labels = labels[chunk * batch_size:(chunk + 1) * batch_size]
        path = chunk_path(out_dir, chunk)
        existing = _read_chunk(path)
        if (existing is not None and existing[0].dtype == np.uint8 and existing[0].ndim == 4 and
                existing[0].shape[0] == chunk_labels.shape[0] and
                np.array_equal(existing[1], chunk_labels)):
            reused += 1
            continue
        if os.path.exists(path):
            logger.warning("regenerating invalid chunk %s", path)
        padded = np.zeros((batch_size,), np.int32)
        padded[:chunk_labels.shape[0]] = chunk_labels
        images = sample_fn(jax.random.fold_in(base_key, chunk), padded)
        images = from_model_range(np.asarray(images)[:chunk_labels.shape[0]])
        _write_npz_atomic(path, images=images, labels=chunk_labels)
        generated += 1
        logger.info("wrote %s (%d/%d)", path, chunk + 1, num_chunks)
        if progress_fn is not None:
            progress_fn(chunk, num_chunks)

    grid_path = None
    if grid_per_class > 0 and max_grid_classes > 0:
        grid_path = os.path.join(os.fspath(out_dir), "samples_grid.png")
        _save_class_grid(out_dir, grid_path, min(num_classes, max_grid_classes), grid_per_class)
    return GenerationSummary(samples_dir, num_chunks, generated, reused, grid_path)


def _save_class_grid(out_dir, grid_path: str, rows: int, per_row: int) -> None:
    cells: list[list[np.ndarray]] = [[] for _ in range(rows)]
    for images, labels in iter_sample_chunks(out_dir):
        for image, label in zip(images, labels):
            if label < rows and len(cells[label]) < per_row:
                cells[label].append(image)
        if all(len(c) == per_row for c in cells):
            break
    shape = next(c[0].shape for c in cells if c)
    blank = np.zeros(shape, np.uint8)
    grid = [row[i] if i < len(row) else blank for row in cells for i in range(per_row)]
    save_grid_png(np.stack(grid), grid_path, rows=rows, scale=display_scale(shape[0]))


def iter_sample_chunks(out_dir: str | os.PathLike) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields `(images uint8[n,H,W,C], labels int32[n])` of each chunk in `out_dir/samples`."""
    samples_dir = os.path.join(os.fspath(out_dir), "samples")
    names = sorted(
        n for n in os.listdir(samples_dir) if n.startswith("chunk_") and n.endswith(".npz"))
    for name in names:
        chunk = _read_chunk(os.path.join(samples_dir, name))
        if chunk is None:
            raise ValueError(f"unreadable sample chunk {os.path.join(samples_dir, name)}")
        yield chunk


def load_samples(out_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """All generated samples: `(images uint8[N,H,W,C], labels int32[N])`."""
    chunks = list(iter_sample_chunks(out_dir))
    if not chunks:
        raise ValueError(f"no sample chunks in {os.path.join(os.fspath(out_dir), 'samples')}")
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
