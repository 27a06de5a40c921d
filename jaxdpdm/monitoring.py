"""What a long run shows while it works: metrics (speed, ETA, peak memory) and sample grids."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

try:
    import resource  # POSIX only
except ImportError:  # Windows
    resource = None

import jax
import jax.numpy as jnp
import numpy as np

from jaxdpdm import storage
from jaxdpdm.images import display_scale, from_model_range, save_grid_png

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_INSTALL = "pip install 'jaxdpdm[tensorboard]'"


class MetricsLogger:
    """Writes scalars to the console, to `WORKDIR/metrics.jsonl` and, where the `tensorboard`
    package is installed (`pip install 'jaxdpdm[tensorboard]'`), to TensorBoard event files.

    `metrics.jsonl` holds one JSON object per logged step, `{"step": 3, "wall_time": unix
    seconds, "loss": ...}`; a resumed run appends, so a step logged twice (before and after a
    restart) appears twice and the later line is the one that counts. TensorBoard's own writer is
    used without TensorFlow (its protobufs and file writer are part of the `tensorboard` package).

    Args:
      workdir: the files go here (a local folder or a `gs://` URL).
      num_steps: the planned number of steps, for the ETA.
      enabled: False on every process but the first of a multi-host job (they only print).
    """

    def __init__(self, workdir: str, num_steps: int, *, enabled: bool = True):
        self._num_steps = num_steps
        self._last_time = None
        self._last_step = None
        self._jsonl = storage.join(workdir, METRICS_FILE) if enabled else None
        self._events = _open_event_writer(workdir) if enabled else None

    def write(self, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        scalars = {k: float(v) for k, v in metrics.items()}
        if self._last_time is not None and step > self._last_step:
            rate = (step - self._last_step) / (now - self._last_time)
            scalars["steps_per_sec"] = rate
            scalars["eta_minutes"] = (self._num_steps - step) / rate / 60.0
        self._last_time, self._last_step = now, step
        wall_time = time.time()
        if self._jsonl is not None:
            line = json.dumps({"step": int(step), "wall_time": wall_time, **scalars})
            _append_line(self._jsonl, line)
        if self._events is not None:
            self._events.write(step, wall_time, scalars)
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(scalars.items()))
        print(f"[step {step}/{self._num_steps}] {shown}", flush=True)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()


def memory_metrics() -> dict[str, float]:
    """Peak memory of this process so far, in GB, for the progress line (to choose
    `train.microbatch_size` before a long run is killed for memory).

    `host_peak_gb`: the peak resident set size (where the OS reports it: Linux, macOS);
    `device_peak_gb`: the largest peak over this process's devices, where the backend reports one
    (GPU, TPU; XLA:CPU does not, and there the host figure holds the arrays).
    """
    metrics = {}
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        metrics["host_peak_gb"] = peak * (1 if sys.platform == "darwin" else 1024) / 1e9
    stats = [device.memory_stats() or {} for device in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    if peaks:
        metrics["device_peak_gb"] = max(peaks) / 1e9
    return metrics


def _append_line(path: str, line: str) -> None:
    """Appends one line; object stores cannot append, so a remote file is rewritten whole."""
    if storage.is_remote(path):
        old = storage.read_text(path) if storage.exists(path) else ""
        storage.write_text(path, old + line + "\n")
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


class _EventWriter:
    """Scalars as TensorBoard events through the `tensorboard` package's writer (no TensorFlow
    needed; where TensorFlow is installed, tensorboard uses its file system layer)."""

    def __init__(self, workdir: str, writer_cls, event_pb2, summary_pb2):
        self._writer = writer_cls(workdir)
        self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2

    def write(self, step: int, wall_time: float, scalars: dict[str, float]) -> None:
        value = self._summary_pb2.Summary.Value
        summary = self._summary_pb2.Summary(
            value=[value(tag=tag, simple_value=number) for tag, number in scalars.items()])
        self._writer.add_event(
            self._event_pb2.Event(wall_time=wall_time, step=int(step), summary=summary))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _open_event_writer(workdir: str) -> _EventWriter | None:
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError:
        log.info("metrics go to %s; for TensorBoard event files too: %s",
                 storage.join(workdir, METRICS_FILE), TENSORBOARD_INSTALL)
        return None
    return _EventWriter(workdir, EventFileWriter, event_pb2, summary_pb2)


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
        self._labels = (jnp.repeat(jnp.arange(self._rows), per_row)
                        if u.num_classes is not None else jnp.zeros((per_row,), jnp.int32))
        self._key = experiment.sample_key(0)
        self._scale = display_scale(u.image_size)
        self._schedule = experiment.schedule
        self._sample = jax.jit(experiment.sampler())

    def write(self, params, path: str) -> None:
        images = self._sample(params, self._schedule, self._key, self._labels)
        save_grid_png(from_model_range(images), path, rows=self._rows, scale=self._scale)
        log.info("wrote %s", path)


def score_label_consistency(experiment, params, num_samples: int) -> dict:
    """Samples `num_samples` class-balanced images and reports their label consistency.

    The images are drawn with the configured sampler in batches of `sample.batch_size` (one
    compiled shape) from the fixed key `experiment.sample_key(1)`; the classifier is
    `eval.label_classifier`, fit on the real training split (see
    `jaxdpdm.evaluation.label_consistency`, which also says why the number is not private).
    """
    from jaxdpdm.evaluation import label_consistency

    u = experiment.unet_config
    if u.num_classes is None:
        raise ValueError("label consistency needs a class-conditional model")
    labels = np.arange(num_samples, dtype=np.int32) % u.num_classes
    batch = min(experiment.config.sample.batch_size, num_samples)
    draw = jax.jit(experiment.sampler())
    images = []
    for i, start in enumerate(range(0, num_samples, batch)):
        chunk = np.zeros(batch, np.int32)
        chunk[:len(labels[start:start + batch])] = labels[start:start + batch]
        key = jax.random.fold_in(experiment.sample_key(1), i)
        images.append(from_model_range(draw(params, experiment.schedule, key, jnp.asarray(chunk))))
    images = np.concatenate(images)[:num_samples]
    classifier, class_names = label_consistency.fit_for_config(experiment.config)
    report = label_consistency.label_consistency(classifier, images, labels)
    report["class_names"] = list(class_names)
    return report
