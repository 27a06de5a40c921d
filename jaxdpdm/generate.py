"""`--mode=sample`: synthetic data from a trained workdir's EMA parameters.

Sampling is post-processing of the DP model: it spends no privacy budget, however many images
are drawn. Samples go to `WORKDIR/samples/chunk_*.npz` (resumable) with a grid PNG beside them,
and with `sample.image_folder` set also to PNGs in one sub-folder per class.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax

from jaxdpdm import parallel, sampling
from jaxdpdm.checkpoint import CheckpointStore, checkpoint_dir
from jaxdpdm.config import validate_config
from jaxdpdm.experiment import Experiment, build_experiment
from jaxdpdm.models import unet

log = logging.getLogger(__name__)


def load_trained(config, workdir: str) -> tuple[Experiment, Any, dict]:
    """The experiment (without data) and EMA parameters of the newest checkpoint in `workdir`.

    Raises:
      FileNotFoundError: no checkpoint in `workdir`.
      ValueError: the checkpoint's parameters do not fit the model `config` describes.
    """
    store = CheckpointStore(checkpoint_dir(workdir), create=False)
    try:
        step = store.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}: train first (--mode=train)")
        meta = store.restore_meta(step)
        exp = build_experiment(config, num_classes=meta["num_classes"])
        # Shapes only: the init seed is irrelevant (and may be unset when sampling).
        template = jax.eval_shape(unet.init_params, exp.unet_config, jax.random.key(0))
        state, _ = store.restore_arrays(step)
    finally:
        store.close()
    params = state["ema_params"]
    expected = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), template)
    found = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), params)
    if expected != found:
        raise ValueError(f"the checkpoint in {workdir} does not fit the model of this config "
                         "(config.model or config.data differ from the training run)")
    meta["step"] = step
    return exp, params, meta


def sample_from_workdir(config, workdir: str) -> sampling.GenerationSummary:
    """Generates `sample.num_samples` class-balanced images from the workdir's EMA model."""
    validate_config(config)
    if jax.process_count() > 1:
        raise ValueError("--mode=sample runs on a single host; use one host of the pod")
    exp, params, meta = load_trained(config, workdir)
    s, u = config.sample, exp.unet_config
    mesh = parallel.make_data_mesh()
    if s.batch_size % mesh.size:
        raise ValueError(f"sample.batch_size={s.batch_size} must be divisible by the "
                         f"{mesh.size} devices")
    sample_fn = sampling.make_sample_fn(
        exp.eval_apply, params, exp.schedule,
        image_shape=(u.image_size, u.image_size, u.in_channels), method=s.sampler,
        num_steps=s.ddim_steps if s.sampler == "ddim" else None, eta=s.eta,
        guidance_scale=s.guidance_scale, null_label=exp.null_label, mesh=mesh)
    start = time.perf_counter()

    def progress(chunk: int, num_chunks: int) -> None:
        elapsed = time.perf_counter() - start
        eta_s = elapsed / (chunk + 1) * (num_chunks - chunk - 1)
        print(f"[sample] chunk {chunk + 1}/{num_chunks} ({elapsed:.0f}s elapsed, "
              f"~{eta_s:.0f}s left)", flush=True)

    summary = sampling.generate_samples(
        sample_fn, out_dir=workdir, num_samples=s.num_samples,
        num_classes=u.num_classes or 1, batch_size=s.batch_size, seed=s.seed,
        grid_per_class=config.train.grid_per_class,
        metadata={"sampler": s.sampler, "ddim_steps": s.ddim_steps, "eta": s.eta,
                  "guidance_scale": s.guidance_scale, "checkpoint_step": meta["step"]},
        progress_fn=progress)
    print(f"[sample] {s.num_samples} samples in {summary.samples_dir} "
          f"({summary.num_generated} chunks generated, {summary.num_reused} reused); "
          f"grid: {summary.grid_path}", flush=True)
    if s.image_folder:
        count = sampling.export_image_folder(workdir, s.image_folder, u.num_classes or 1)
        print(f"[sample] wrote {count} PNGs to {s.image_folder}/<class>/", flush=True)
    return summary
