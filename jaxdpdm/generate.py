"""`--mode=sample`: synthetic data from a trained workdir's EMA parameters.

Sampling is post-processing of the DP model: it spends no privacy budget, however many images
are drawn. Samples go to `WORKDIR/samples/chunk_*.npz` (resumable) with a grid PNG beside them,
and with `sample.image_folder` set also to PNGs in one sub-folder per class. `samples/meta.json`
records the checkpoint step they were drawn from. Sampling a run that is still training warns;
when training has moved on since the samples were drawn, they are moved to
`WORKDIR/samples_step<N>/` and the newest checkpoint is sampled afresh.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax

from jaxdpdm import export, parallel, sampling, storage
from jaxdpdm.checkpoint import CheckpointStore, checkpoint_dir
from jaxdpdm.config import validate_config
from jaxdpdm.dp.report import PRIVACY_JSON
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
        template = unet.param_shapes(exp.unet_config)
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


def unfinished_run_note(meta: dict, workdir: str) -> str | None:
    """Why checkpoint `meta["step"]` is not the run's final model, or None when it is (or when
    the checkpoint does not say how long the run was meant to be).

    A run is finished at `train.num_steps` of its own config, or earlier when its privacy
    report says the budget stopped it at this step.
    """
    try:
        target = json.loads(meta["config"])["train"]["num_steps"]
    except (KeyError, TypeError, ValueError):
        return None
    step = meta["step"]
    if step >= target:
        return None
    report_path = os.path.join(workdir, PRIVACY_JSON)
    if os.path.exists(report_path):
        report = json.loads(storage.read_text(report_path))
        if (report.get("training", {}).get("stopped_by_budget") and
                report.get("mechanism", {}).get("steps") == step):
            return None
    return (f"checkpoint step {step} is from an unfinished run (train.num_steps={target}): "
            "the model is still training")


def archive_stale_samples(workdir: str, step: int) -> str | None:
    """Moves `workdir/samples` aside when it was drawn from another checkpoint than `step`.

    Returns:
      The folder the old samples were moved to (`samples_step<their step>`), or None.
    """
    samples_dir = os.path.join(workdir, "samples")
    meta_path = os.path.join(samples_dir, "meta.json")
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        old_step = json.load(f).get("checkpoint_step")
    if old_step is None or old_step == step:
        return None
    archive = os.path.join(workdir, f"samples_step{old_step:06d}")
    suffix = 1
    while os.path.exists(archive):
        archive = os.path.join(workdir, f"samples_step{old_step:06d}_{suffix}")
        suffix += 1
    os.replace(samples_dir, archive)
    grid = os.path.join(workdir, "samples_grid.png")
    if os.path.exists(grid):
        os.replace(grid, os.path.join(archive, "samples_grid.png"))
    return archive


def _provenance(config, workdir: str, meta: dict) -> dict[str, Any]:
    """What an exported sample file should say about where it came from."""
    report_path = os.path.join(workdir, PRIVACY_JSON)
    guarantee = (json.loads(storage.read_text(report_path)).get("guarantee")
                 if os.path.exists(report_path) else None)
    return {
        "dataset": config.data.name, "subset": config.data.subset, "checkpoint_step": meta["step"],
        "phase": config.phase, "sampler": {
            k: config.sample[k] for k in ("sampler", "ddim_steps", "eta", "guidance_scale", "seed")
        }, "privacy_guarantee": guarantee
    }


def sample_from_workdir(config, workdir: str) -> sampling.GenerationSummary:
    """Generates `sample.num_samples` class-balanced images from the workdir's EMA model."""
    validate_config(config)
    if jax.process_count() > 1:
        raise ValueError("--mode=sample runs on a single host; use one host of the pod")
    exp, params, meta = load_trained(config, workdir)
    workdir = storage.ensure_writable_dir(workdir)  # ValueError naming it when read-only
    note = unfinished_run_note(meta, workdir)
    if note:
        log.warning(
            "%s; run --mode=sample again when training has finished (it replaces "
            "these samples)", note)
    archived = archive_stale_samples(workdir, meta["step"])
    if archived:
        log.warning(
            "training moved on since the samples in %s were drawn: moved them to %s; "
            "sampling checkpoint step %d", os.path.join(workdir, "samples"), archived, meta["step"])
    s, u = config.sample, exp.unet_config
    mesh = parallel.make_data_mesh()
    if s.batch_size % mesh.size:
        raise ValueError(f"sample.batch_size={s.batch_size} must be divisible by the "
                         f"{mesh.size} devices")
    sample_fn = sampling.jit_sampler(exp.sampler(), params, exp.schedule, mesh=mesh)
    start = time.perf_counter()

    def progress(chunk: int, num_chunks: int) -> None:
        elapsed = time.perf_counter() - start
        eta_s = elapsed / (chunk + 1) * (num_chunks - chunk - 1)
        print(
            f"[sample] chunk {chunk + 1}/{num_chunks} ({elapsed:.0f}s elapsed, "
            f"~{eta_s:.0f}s left)", flush=True)

    summary = sampling.generate_samples(
        sample_fn, out_dir=workdir, num_samples=s.num_samples, num_classes=u.num_classes or 1,
        batch_size=s.batch_size, seed=s.seed, grid_per_class=config.train.grid_per_class, metadata={
            "sampler": s.sampler, "ddim_steps": s.ddim_steps, "eta": s.eta,
            "guidance_scale": s.guidance_scale, "checkpoint_step": meta["step"]
        }, progress_fn=progress)
    print(
        f"[sample] {s.num_samples} samples in {summary.samples_dir} "
        f"({summary.num_generated} chunks generated, {summary.num_reused} reused); "
        f"grid: {summary.grid_path}", flush=True)
    if s.image_folder:
        count = export.export_image_folder(workdir, s.image_folder, u.num_classes or 1)
        print(f"[sample] wrote {count} PNGs to {s.image_folder}/<class>/", flush=True)
    if s.npz_file:
        count = export.export_npz(workdir, s.npz_file, _provenance(config, workdir, meta))
        print(f"[sample] wrote {count} samples to {s.npz_file}", flush=True)
    if s.npz_folder:
        count = export.export_npz_folder(workdir, s.npz_folder, _provenance(config, workdir, meta),
                                         part_size=s.npz_part_size)
        print(f"[sample] wrote {count} samples to {s.npz_folder}/part-*.npz", flush=True)
    return summary
