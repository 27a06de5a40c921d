"""The training loop, for non-private pretraining and DP-SGD fine-tuning alike.

One step of the DP phase (privacy reasoning in `jaxdpdm.dp`):

1. the host draws a Poisson batch from `(seed, step)` and splits it into fixed-shape padded chunks;
2. every device clips and sums the per-example gradients of its shard of each chunk (each
   example's loss averaged over K augmentation draws), the sums are `psum`-ed;
3. one Gaussian noise draw is added to the sum, which is divided by the expected batch size and
   fed to Adam; the EMA of the parameters is updated in the same compiled program;
4. the step is recorded in the privacy ledger, which refused it beforehand if it would have taken
   the spent epsilon past the target.

What differs between the DP and the non-private phase is the trainer's plan (`jaxdpdm.plans`);
what a workdir must satisfy to start or resume is checked in one place (`jaxdpdm.resume`). The
state (parameters, EMA, optimizer state, step) and the ledger are checkpointed together, so a
resumed run replays exactly the releases an uninterrupted run makes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdpdm import parallel, phases, storage
from jaxdpdm.checkpoint import CHECKPOINT_SUBDIR, CheckpointStore, load_init_params
from jaxdpdm.config import validate_config
from jaxdpdm.dp.report import archive_earlier_reports
from jaxdpdm.experiment import build_experiment, dataset_fingerprint
from jaxdpdm.interrupts import SignalFlag, pause_for_tests, signals_deferred
from jaxdpdm.models import count_params
from jaxdpdm.evaluation.label_consistency import format_consistency
from jaxdpdm.monitoring import GridWriter, MetricsLogger, memory_metrics, score_label_consistency
from jaxdpdm.plans import make_plan
from jaxdpdm.resume import check_workdir
from jaxdpdm.workdir_lock import WorkdirLock

log = logging.getLogger(__name__)


class Trainer:
    """Holds the compiled step functions and the mutable state of one training run.

    What differs between a DP and a non-private run lives in `self.plan` (`jaxdpdm.plans`).
    """

    def __init__(self, config, workdir: str, *, allow_restart_spent_workdir: bool = False,
                 canaries: Callable | None = None):
        """Checks config, workdir and data, restores the newest good checkpoint, compiles.

        Args:
          allow_restart_spent_workdir: start a DP run over in a workdir that holds traces of an
            earlier DP run (its privacy report, grids, samples) but no checkpoint to resume. The
            earlier report is kept as `privacy_report.earlier-<n>.json` and the new report lists
            it. Without it such a workdir is refused.
          canaries: audit runs only (`jaxdpdm.audit`, never a release workdir): `canaries(exp)`
            returns a CanaryInjector whose experiment's dataset also holds the canaries.
        """
        # Everything that can be wrong with the config, the data or the workdir is checked here,
        # before the first compilation, so a mistake costs seconds, not a compile.
        validate_config(config)
        self.workdir = storage.ensure_writable_dir(workdir)
        # One process per workdir (the lead process holds it for a multi-host job); released
        # when `run` ends, when this constructor fails, or at the latest when the trainer is
        # collected or the interpreter exits.
        self._lock = None
        self._make_canaries = canaries
        if jax.process_index() == 0:
            self._lock = WorkdirLock(self.workdir).acquire()
            weakref.finalize(self, self._lock.release)
            pause_for_tests("locked")
        try:
            self._setup(config, allow_restart_spent_workdir)
        except BaseException:
            self.release_workdir()
            raise

    def release_workdir(self) -> None:
        """Releases the workdir lock (idempotent); `run` does it when it returns or fails."""
        if self._lock is not None:
            self._lock.release()

    @property
    def ledger(self):
        """The privacy ledger of a DP run (None for a non-private one)."""
        return self.plan.ledger

    def _setup(self, config, allow_restart: bool):
        self.store = CheckpointStore(storage.join(self.workdir, CHECKPOINT_SUBDIR),
                                     keep=config.train.keep_checkpoints)
        resumption = check_workdir(self.store, config, self.workdir, allow_restart)
        self.seed_fixed = resumption.seed_fixed
        self.config = config = resumption.config
        self.exp = build_experiment(config)
        # Audit runs only (jaxdpdm.audit): the dataset also holds the canaries.
        self.canaries = None if self._make_canaries is None else self._make_canaries(self.exp)
        if self.canaries is not None:
            self.exp = self.canaries.experiment
        self.fingerprint = dataset_fingerprint(config, self.exp.dataset)
        resumption.check_data(self.fingerprint)
        self.mesh = parallel.make_data_mesh()
        self.num_devices = self.mesh.devices.size
        self.is_lead = jax.process_index() == 0
        log.info("%s", self.exp.dataset.summary())
        batch, n = config.train.batch_size, len(self.exp.dataset)
        if batch > n:
            raise ValueError(f"train.batch_size={batch} is larger than the dataset ({n} examples)")
        self.plan = make_plan(config, self.exp, self.mesh, resumption, self.canaries)
        self._grid_writer = None
        self._init_state(resumption.step)
        # Every check has passed: only now is an earlier run's report moved aside.
        traces = resumption.restart_traces
        self.earlier_releases = archive_earlier_reports(self.workdir, traces) if traces else []

    # --- state ---------------------------------------------------------------------------------

    def _init_state(self, latest: int | None):
        c = self.config
        params = self.exp.init_params()
        if latest is None and c.init_from is not None:
            params = load_init_params(c.init_from, params, c.init_reinit)
            log.info("initialised from the EMA parameters in %s", c.init_from)
        state = {
            "step": jnp.zeros(
                (), jnp.int32), "params": params, "ema_params": jax.tree.map(jnp.copy, params),
            "opt_state": self.plan.optimizer.init(params)
        }
        state = parallel.replicate(state, self.mesh)
        if latest is not None:
            try:
                state, _ = self.store.restore(state, latest)  # proven restorable above
            except ValueError as e:  # the config's model or optimizer changed since
                raise ValueError(f"{e}; a run resumes with the model and optimizer it started "
                                 "with: run it with that config, or use a new workdir") from e
            log.info("resumed from %s at step %d", self.store.directory, latest)
        self.state = state
        self.step = int(state["step"])
        self._saved_step = self.step if latest is not None else None
        self._failed_save_step = None  # a step whose checkpoint write raised (never retried)

    def _meta(self) -> dict:
        meta = {
            "config": self.config.to_json(), "phase": self.config.phase, "seed": self.config.seed,
            "num_classes": self.exp.dataset.num_classes,
            "unet": _jsonable(dataclasses.asdict(self.exp.unet_config)),
            "dataset": self.exp.dataset.summary(), "num_examples": len(self.exp.dataset),
            "dataset_fingerprint": self.fingerprint, "seed_fixed": self.seed_fixed
        }
        return {**meta, **self.plan.meta()}

    def save(self):
        """Checkpoints the current step (once: a step already saved is not written again).

        SIGINT and SIGTERM arriving during the write are held until it has finished, then
        delivered to their handlers: an interrupt never leaves a half-written checkpoint behind
        or starts a second write of the same step.
        """
        if self._saved_step == self.step or self._failed_save_step == self.step:
            return
        with signals_deferred():
            pause_for_tests("checkpoint_write", self.step)
            try:
                self.store.save(self.step, self.state, self._meta())
            except BaseException:
                # A write that failed (full disk, read-only mount) would fail again: the crash
                # handler must not retry it, or its error is buried under the retry's.
                self._failed_save_step = self.step
                raise
            self._saved_step = self.step

    # --- one step --------------------------------------------------------------------------------

    def train_step(self) -> Callable[[], dict[str, float]]:
        """Runs step `self.step`; returns a function that fetches the step's metrics.

        The metrics are fetched only when they are logged: reading them waits for the device,
        which would otherwise stall the dispatch of the next step on an accelerator.
        """
        params, opt_state, ema, metrics = self.plan.run_step(self.state, self.step,
                                                             self.exp.example_key(self.step))
        new_state = {
            "step": jnp.asarray(self.step + 1, jnp.int32), "params": params, "ema_params": ema,
            "opt_state": opt_state
        }
        # Commit the step: ledger first, then state, with nothing in between that can fail. An
        # interrupt landing between the two lines leaves the ledger one step AHEAD of the state,
        # which over-counts the spent budget (safe), never under-counts it.
        self.plan.record_step()
        self.state, self.step = new_state, self.step + 1
        return metrics

    def budget_allows_step(self) -> bool:
        return self.plan.allows_step()

    # --- the loop --------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Trains to `train.num_steps` (or to the privacy budget), then writes grid and report.

        The workdir lock is released when this returns or raises.
        """
        try:
            stopped_by_budget = self._train_loop()
            self.save()
            self.write_grid("grid_final.png")
            self.write_label_consistency()
            return self.finish(stopped_by_budget)
        finally:
            self.release_workdir()

    def _train_loop(self) -> bool:
        """Runs the steps; returns whether the privacy budget stopped them."""
        c = self.config
        logger = MetricsLogger(self.workdir, c.train.num_steps, enabled=self.is_lead)
        self._log_start()
        preempted = SignalFlag(signal.SIGTERM)
        try:
            while self.step < c.train.num_steps:
                if preempted.raised:
                    # A preemption notice (SIGTERM): save (unless this step is saved already)
                    # and leave with the conventional 128 + 15; rerunning resumes here.
                    log.warning("SIGTERM at step %d: checkpointing and exiting", self.step)
                    self.save()
                    raise SystemExit(143)
                if not self.budget_allows_step():
                    log.warning("privacy budget reached: stopping before step %d", self.step)
                    return True
                fetch_metrics = self.train_step()
                if self.step % c.train.log_every == 0 or self.step == c.train.num_steps:
                    logger.write(self.step,
                                 {**self.plan.annotate(fetch_metrics()), **memory_metrics()})
                if self.step % c.train.checkpoint_every == 0:
                    self.save()
                if c.train.sample_every and self.step % c.train.sample_every == 0:
                    self.write_grid(f"grid_step{self.step:06d}.png")
        except BaseException:
            # Ctrl-C or a crash: keep the steps done since the last checkpoint. State and ledger
            # are only ever updated together, after a completed step, so they are consistent.
            if self._saved_step != self.step:
                log.warning("interrupted at step %d: saving a checkpoint", self.step)
                self.save()
            raise
        finally:
            preempted.restore()
            logger.close()
        return False

    def finish(self, stopped_by_budget: bool) -> dict[str, Any]:
        report = self.plan.finish(self.state["params"], stopped_by_budget=stopped_by_budget,
                                  earlier_releases=self.earlier_releases, workdir=self.workdir,
                                  is_lead=self.is_lead)
        self.store.close()
        return {"step": self.step, "privacy": report}

    def write_grid(self, name: str) -> None:
        if not self.is_lead:
            return
        if self._grid_writer is None:
            self._grid_writer = GridWriter(self.exp)
        self._grid_writer.write(self.state["ema_params"], storage.join(self.workdir, name))

    def write_label_consistency(self) -> None:
        """Scores `eval.label_consistency_samples` EMA samples (if > 0) into
        WORKDIR/label_consistency.json; the classifier reads real data (not covered by DP)."""
        num = self.config.eval.label_consistency_samples
        if not num or not self.is_lead:
            return
        report = score_label_consistency(self.exp, self.state["ema_params"], num)
        report["step"] = self.step
        storage.write_text(storage.join(self.workdir, "label_consistency.json"),
                           json.dumps(report, indent=2) + "\n")
        print(format_consistency(report, report["class_names"]), flush=True)

    def _log_start(self):
        log.info("model: %s parameters; devices: %d; phase: %s",
                 f"{count_params(self.state['params']):,}", self.num_devices, self.config.phase)
        self.plan.describe()


def _jsonable(d):
    return {
        k: (str(v) if not isinstance(v, (int, float, str, bool, list, tuple, type(None))) else v)
        for k, v in d.items()
    }


def train(config, workdir: str, *, allow_restart_spent_workdir: bool = False) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns the final step and privacy report.

    With `config.pretrain.num_steps > 0`, first pretrains on the public part in
    `workdir/pretrain` (`jaxdpdm.phases`).
    """

    def train_one(one_config, one_workdir):
        return Trainer(one_config, one_workdir,
                       allow_restart_spent_workdir=allow_restart_spent_workdir).run()

    if phases.has_pretraining_phase(config):
        validate_config(config)
        return phases.train_in_phases(config, workdir, train_one)
    return train_one(config, workdir)
