"""MetricsLogger: a console line with speed and ETA, metrics.jsonl, and TensorBoard scalars;
the peak-memory metrics.

(GridWriter compiles a sampler; it is covered end to end by tests/test_train.py.)
"""

import glob
import json
import os
import sys
import types

import numpy as np
import pytest

from jaxdpdm import monitoring


class FakeClock:
    """Stands in for `time` in the monitoring module: perf_counter returns the given readings."""

    def __init__(self, *readings):
        self._readings = list(readings)

    def perf_counter(self):
        return self._readings.pop(0)


def _event_scalars(workdir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from the TensorBoard event files in `workdir` (read without TF)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    scalars: dict[str, dict[int, float]] = {}
    for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                number = float(tensor_util.make_ndarray(value.tensor))
                scalars.setdefault(value.tag, {})[event.step] = number
    return scalars


def _jsonl(workdir) -> list[dict]:
    with open(os.path.join(workdir, monitoring.METRICS_FILE)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def clock(monkeypatch):

    def install(*readings):
        monkeypatch.setattr(
            monitoring, "time",
            types.SimpleNamespace(perf_counter=FakeClock(*readings).perf_counter,
                                  time=lambda: 1.7e9))

    return install


def _progress(out: str) -> tuple[str, dict[str, float]]:
    """('[step 3/10]', {name: value}) from the one line `write` printed."""
    (line,) = out.splitlines()
    head, _, rest = line.partition("] ")
    return head + "]", {k: float(v) for k, v in (item.split("=") for item in rest.split())}


def test_writes_scalars_to_tensorboard_and_a_progress_line(tmp_path, clock, capsys):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    clock(100.0, 104.0, 105.0)
    logger = monitoring.MetricsLogger(str(tmp_path), num_steps=10)
    logger.write(1, {"loss": 0.5})
    assert _progress(capsys.readouterr().out) == ("[step 1/10]", {"loss": 0.5})

    logger.write(3, {"loss": 0.25, "clipped": 0.75})  # 2 steps in 4 s
    head, shown = _progress(capsys.readouterr().out)
    assert head == "[step 3/10]"
    # 0.5 steps/s with 7 steps left: 14 s (printed with 4 significant digits).
    assert shown == pytest.approx(
        {"loss": 0.25, "clipped": 0.75, "steps_per_sec": 0.5, "eta_minutes": 14 / 60}, rel=1e-3)

    logger.write(5, {"loss": 0.125})  # 2 steps in 1 s
    _, shown = _progress(capsys.readouterr().out)
    assert shown == pytest.approx({"loss": 0.125, "steps_per_sec": 2.0, "eta_minutes": 2.5 / 60},
                                  rel=1e-3)
    logger.close()

    assert [(r["step"], r["loss"]) for r in _jsonl(tmp_path)] == [(1, 0.5), (3, 0.25), (5, 0.125)]
    assert _jsonl(tmp_path)[1]["clipped"] == 0.75
    assert _jsonl(tmp_path)[2]["steps_per_sec"] == pytest.approx(2.0)
    scalars = _event_scalars(str(tmp_path))
    assert scalars["loss"] == {1: 0.5, 3: 0.25, 5: 0.125}
    assert scalars["steps_per_sec"] == pytest.approx({3: 0.5, 5: 2.0})
    assert scalars["eta_minutes"] == pytest.approx({3: 14 / 60, 5: 2.5 / 60})
    assert scalars["clipped"] == {3: 0.75}


def test_a_repeated_step_reports_no_speed(tmp_path, clock, capsys):
    clock(1.0, 2.0)
    logger = monitoring.MetricsLogger(str(tmp_path), num_steps=4)
    logger.write(2, {"loss": 1.0})
    logger.write(2, {"loss": 1.0})  # e.g. the final metrics of a resumed run
    for line in capsys.readouterr().out.splitlines():
        assert _progress(line)[1] == {"loss": 1.0}
    logger.close()


def test_disabled_logger_prints_but_writes_no_event_file(tmp_path, clock, capsys):
    clock(1.0)
    logger = monitoring.MetricsLogger(str(tmp_path), num_steps=4, enabled=False)
    logger.write(1, {"loss": 2.0})
    logger.close()
    assert _progress(capsys.readouterr().out) == ("[step 1/4]", {"loss": 2.0})
    assert os.listdir(tmp_path) == []


def test_without_the_tensorboard_extra_metrics_still_reach_the_jsonl_file(
        tmp_path, clock, capsys, monkeypatch, caplog):
    # A None entry in sys.modules makes the import fail, as on a lean install.
    monkeypatch.setitem(sys.modules, "tensorboard.summary.writer.event_file_writer", None)
    clock(1.0, 3.0)
    with caplog.at_level("INFO", logger="jaxdpdm.monitoring"):
        logger = monitoring.MetricsLogger(str(tmp_path), num_steps=4)
    assert "pip install 'jaxdpdm[tensorboard]'" in caplog.text
    logger.write(1, {"loss": 2.0})
    logger.write(2, {"loss": 1.0})
    logger.close()
    assert [(r["step"], r["loss"], r["wall_time"]) for r in _jsonl(tmp_path)] == [(1, 2.0, 1.7e9),
                                                                                  (2, 1.0, 1.7e9)]
    assert _jsonl(tmp_path)[1]["steps_per_sec"] == pytest.approx(0.5)
    assert not glob.glob(os.path.join(tmp_path, "events.out.tfevents.*"))
    # A resumed run appends to the same file.
    clock(5.0)
    monitoring.MetricsLogger(str(tmp_path), num_steps=4).write(3, {"loss": 0.5})
    assert [r["step"] for r in _jsonl(tmp_path)] == [1, 2, 3]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_memory_metrics_report_the_peak_resident_set_in_gb():
    held = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
    with open("/proc/self/status") as f:
        (rss_kib,) = [int(line.split()[1]) for line in f if line.startswith("VmRSS:")]
    metrics = monitoring.memory_metrics()
    assert held.sum() > 0
    # The peak is at least what is resident now (which includes the array), and in GB: a slip of
    # the unit (KiB, bytes) would be off by 1024.
    rss_gb = rss_kib * 1024 / 1e9
    assert 0.99 * rss_gb <= metrics["host_peak_gb"] < 100 * rss_gb
    assert "device_peak_gb" not in metrics  # XLA:CPU reports no device memory


def test_memory_metrics_take_the_largest_device_peak(monkeypatch):
    devices = [types.SimpleNamespace(memory_stats=lambda stats=stats: stats)
               for stats in ({"peak_bytes_in_use": 2e9}, None, {"peak_bytes_in_use": 3e9}, {})]
    monkeypatch.setattr(monitoring.jax, "local_devices", lambda: devices)
    assert monitoring.memory_metrics()["device_peak_gb"] == 3.0
