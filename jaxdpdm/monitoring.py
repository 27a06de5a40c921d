"""What a long run shows while it works: metrics with speed and ETA, and sample grids."""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdpdm import sampling
from jaxdpdm.images import save_grid_png, to_uint8

log = logging.getLogger(__name__)


class MetricsLogger:
    """Writes scalars to TensorBoard (clu) and a one-line progress summary to the console.

    Args:
      workdir: TensorBoard event files go here.
      num_steps: the planned number of steps, for the ETA.
      enabled: False on every process but the first of a multi-host job (they only log).
    """

    def __init__(self, workdir: str, num_steps: int, *, enabled: bool = True):
        # clu's writers import TensorFlow; keep that import out of the library modules.
        from clu import metric_writers

        self._writer = metric_writers.create_default_writer(
            workdir if enabled else None, just_logging=not enabled, asynchronous=False)
        self._num_steps = num_steps
        self._last_time = None
        self._last_step = None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        scalars = dict(metrics)
        if self._last_time is not None and step > self._last_step:
            rate = (step - self._last_step) / (now - self._last_time)
            scalars["steps_per_sec"] = rate
            scalars["eta_minutes"] = (self._num_steps - step) / rate / 60.0
        self._last_time, self._last_step = now, step
        self._writer.write_scalars(step, scalars)
        self._writer.flush()
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(scalars.items()))
        print(f"[step {step}/{self._num_steps}] {shown}", flush=True)

    def close(self) -> None:
        self._writer.close()


def _fmt(value: float) -> str:
    return f"{value:.4g}"


class GridWriter:
    """Writes PNG grids of EMA samples: `train.grid_per_class` per class, one row per class.

    The sampler is compiled once (parameters are an argument) and uses a fixed key, so grids of
    successive steps show the same noise and are comparable.
    """

    def __init__(self, experiment):
        c, u = experiment.config, experiment.unet_config
        self._rows = u.num_classes or 1
        per_row = c.train.grid_per_class
        self._labels = (jnp.repeat(jnp.arange(self._rows), per_row) if u.num_classes is not None
                        else jnp.zeros((per_row,), jnp.int32))
        self._key = experiment.sample_key(0)
        shape = (u.image_size, u.image_size, u.in_channels)
        self._sample = jax.jit(
            lambda params, key, labels: sample_images(experiment, params, key, labels, shape))

    def write(self, params, path: str) -> None:
        images = self._sample(params, self._key, self._labels)
        save_grid_png(to_uint8(np.asarray(images)), path, rows=self._rows)
        log.info("wrote %s", path)


def sample_images(experiment, params, key, labels, shape):
    """Draws `len(labels)` images `[B, H, W, C]` in [-1, 1] with the configured sampler."""
    s = experiment.config.sample
    common = dict(guidance_scale=s.guidance_scale, null_label=experiment.null_label)
    if s.sampler == "ddpm":
        return sampling.ddpm_sample(experiment.eval_apply, params, experiment.schedule, key,
                                    labels, shape, **common)
    return sampling.ddim_sample(experiment.eval_apply, params, experiment.schedule, key, labels,
                                shape, num_steps=s.ddim_steps, eta=s.eta, **common)
