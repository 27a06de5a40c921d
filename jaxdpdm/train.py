"""The training loop, for non-private pretraining and DP-SGD fine-tuning alike.

One step of the DP phase (privacy reasoning in `jaxdpdm.dp`):

1. the host draws a Poisson batch from `(seed, step)` and splits it into fixed-shape padded chunks;
2. every device clips and sums the per-example gradients of its shard of each chunk (each
   example's loss averaged over K augmentation draws), the sums are `psum`-ed;
3. one Gaussian noise draw is added to the sum, which is divided by the expected batch size and
   fed to Adam; the EMA of the parameters is updated;
4. the step is recorded in the privacy ledger, which refused it beforehand if it would have taken
   the spent epsilon past the target.

The state (parameters, EMA, optimizer state, step) and the ledger are checkpointed together, so a
resumed run replays exactly the releases an uninterrupted run makes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import signal
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdpdm import parallel, phases, storage
from jaxdpdm.checkpoint import CHECKPOINT_SUBDIR, CheckpointStore, load_init_params
from jaxdpdm.config import validate_config
from jaxdpdm.dp import accounting, batching, dp_aggregate, trainable_mask
from jaxdpdm.evaluation.report import (archive_earlier_reports, privacy_report,
                                       write_privacy_report)
from jaxdpdm.experiment import build_experiment, count_params, dataset_fingerprint
from jaxdpdm.interrupts import SignalFlag, pause_for_tests, signals_deferred
from jaxdpdm.evaluation.label_consistency import format_consistency
from jaxdpdm.monitoring import GridWriter, MetricsLogger, score_label_consistency
from jaxdpdm.resume import (check_init_from, check_same_data, meta_problem, refuse_spent_workdir,
                            resumed_ledger, with_seed)
from jaxdpdm.workdir_lock import WorkdirLock

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DPPlan:
    """The privacy parameters of a DP run, fixed before the first step."""
    noise_multiplier: float
    sampling_rate: float
    expected_batch_size: int
    chunk_size: int
    calibrated: bool


def _adam(config) -> optax.GradientTransformation:
    t = config.train
    lr = optax.warmup_constant_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1))
    return optax.adamw(lr, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps,
                       weight_decay=t.weight_decay)


def _freeze(optimizer, mask) -> optax.GradientTransformation:
    """Frozen parameters get a zero update (not even weight decay)."""
    if mask is None:
        return optimizer
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": optimizer, "freeze": optax.set_to_zero()}, labels)


def plan_dp(config, num_examples: int, num_devices: int, ledger: accounting.PrivacyLedger,
            stored_sigma: float | None) -> DPPlan:
    """Chooses sigma (calibrated to spend exactly the target over `num_steps` steps) and shapes."""
    t, p = config.train, config.dp
    q = t.batch_size / num_examples
    if stored_sigma is not None:
        # Resuming: the checkpoint's sigma is what the ledger recorded; never silently change it.
        if p.noise_multiplier is not None and p.noise_multiplier != stored_sigma:
            raise ValueError(f"dp.noise_multiplier={p.noise_multiplier} differs from the "
                             f"checkpoint's {stored_sigma}; use a new workdir")
        sigma, calibrated = stored_sigma, p.noise_multiplier is None
        if not sigma > 0:  # written by a version that accepted sigma = 0: nothing was private
            raise ValueError(f"the checkpoint's noise multiplier is {sigma}: that run added no "
                             "noise, so it cannot be resumed as a DP run (use a new workdir)")
    elif p.noise_multiplier is not None:
        sigma, calibrated = float(p.noise_multiplier), False
    else:
        sigma = accounting.calibrate_noise_multiplier(
            target_epsilon=p.target_epsilon, delta=p.delta, sampling_rate=q,
            steps=t.num_steps - ledger.total_steps, accountant=p.accountant)
        # (no num_examples: the ledger already warned if delta >= 1/N; the report states it)
        calibrated = True
    # One chunk is one microbatch per device: a Poisson draw becomes ceil(n / chunk) calls of
    # the same compiled program, the last one padded. Looping over microbatches on the host
    # rather than with lax.scan inside one program is deliberate: on XLA:CPU the scanned
    # per-example gradients ran ~10x slower per example (measured: 259 vs 23 ms at 16x16, K=4).
    chunk = num_devices * t.microbatch_size
    return DPPlan(sigma, q, t.batch_size, chunk, calibrated)


@jax.jit
def _ema_update(ema, params, decay):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)


class Trainer:
    """Holds the compiled step functions and the mutable state of one training run."""

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

    def _setup(self, config, allow_restart: bool):
        self.store = CheckpointStore(storage.join(self.workdir, CHECKPOINT_SUBDIR),
                                     keep=config.train.keep_checkpoints)
        latest, meta = self.store.newest_restorable(meta_problem)
        if meta and meta.get("phase") != config.phase:
            raise ValueError(f"{self.workdir} holds a {meta.get('phase')!r} run, this config is "
                             f"phase {config.phase!r}: use a new workdir (and init_from)")
        restart_traces = []
        if not meta:
            check_init_from(config)
            if config.phase == "dp":
                restart_traces = refuse_spent_workdir(self.workdir, allow_restart)
        # Whether the seed (hence the noise) is known to whoever has the config; None: an old
        # checkpoint that did not record it.
        self.seed_fixed = meta.get("seed_fixed") if meta else config.seed is not None
        self.config = config = with_seed(config, meta.get("seed"))
        self.exp = build_experiment(config)
        # Audit runs only (jaxdpdm.audit): the dataset also holds the canaries.
        self.canaries = None if self._make_canaries is None else self._make_canaries(self.exp)
        if self.canaries is not None:
            self.exp = self.canaries.experiment
        self.dp = config.phase == "dp"
        if self.dp and self.seed_fixed:
            log.warning("*** DP run with a FIXED seed (seed=%d from the config): the DP noise "
                        "and batches are reproducible by anyone who has the config, and the "
                        "guarantee does not hold against them. Unset it (--config.seed=None) "
                        "for private data. The privacy report records this. ***", config.seed)
        self.fingerprint = dataset_fingerprint(config, self.exp.dataset)
        if meta:
            check_same_data(meta, self.fingerprint)
        self.mesh = parallel.make_data_mesh()
        self.num_devices = self.mesh.devices.size
        self.is_lead = jax.process_index() == 0
        log.info("%s", self.exp.dataset.summary())
        self._check_batch_size()
        self.mask = None  # None: every parameter is trained
        if self.dp and config.dp.trainable is not None:
            self.mask = trainable_mask(jax.eval_shape(self.exp.init_params), config.dp.trainable)
        self.ledger = self.plan = None
        if self.dp:
            self.ledger = (resumed_ledger(meta["ledger"], config) if meta else
                           accounting.PrivacyLedger(config.dp.target_epsilon, config.dp.delta,
                                                    accountant=config.dp.accountant,
                                                    num_examples=len(self.exp.dataset)))
            self.plan = plan_dp(config, len(self.exp.dataset), self.num_devices, self.ledger,
                                meta.get("noise_multiplier"))
        self._build_step()
        self._grid_writer = None
        self._init_state(latest)
        # Every check has passed: only now is an earlier run's report moved aside.
        self.earlier_releases = (archive_earlier_reports(self.workdir, restart_traces)
                                 if restart_traces else [])

    def _check_batch_size(self):
        batch, n = self.config.train.batch_size, len(self.exp.dataset)
        if batch > n:
            raise ValueError(f"train.batch_size={batch} is larger than the dataset ({n} examples)")
        if not self.dp and batch % self.num_devices:
            raise ValueError(f"train.batch_size={batch} must be divisible by the number of "
                             f"devices ({self.num_devices}) for pretraining")

    def _build_step(self):
        c = self.config
        if self.dp:
            self.optimizer = _freeze(optax.chain(
                dp_aggregate(clip_norm=c.dp.clip_norm, noise_multiplier=self.plan.noise_multiplier,
                             expected_batch_size=self.plan.expected_batch_size, seed=c.seed,
                             trainable=self.mask),
                *([self.canaries.release_tap(
                    noise_multiplier=self.plan.noise_multiplier,
                    sampling_rate=self.plan.sampling_rate,
                    expected_batch_size=self.plan.expected_batch_size)]
                  if self.canaries is not None else []),
                _adam(c)), self.mask)
            self.step_fn = parallel.make_dp_step(
                self.exp.loss_fn, self.optimizer, clip_norm=c.dp.clip_norm,
                microbatch_size=c.train.microbatch_size, mesh=self.mesh, trainable=self.mask)
        else:
            self.optimizer = _adam(c)
            self.step_fn = parallel.make_pretrain_step(self.exp.loss_fn, self.optimizer,
                                                       mesh=self.mesh)

    # --- state ---------------------------------------------------------------------------------

    def _init_state(self, latest: int | None):
        c = self.config
        params = self.exp.init_params()
        if latest is None and c.init_from is not None:
            params = load_init_params(c.init_from, params, c.init_reinit)
            log.info("initialised from the EMA parameters in %s", c.init_from)
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "ema_params": jax.tree.map(jnp.copy, params),
                 "opt_state": self.optimizer.init(params)}
        state = parallel.replicate(state, self.mesh)
        if latest is not None:
            state, _ = self.store.restore(state, latest)  # proven restorable above
            log.info("resumed from %s at step %d", self.store.directory, latest)
        self.state = state
        self.step = int(state["step"])
        self._saved_step = self.step if latest is not None else None
        self._failed_save_step = None  # a step whose checkpoint write raised (never retried)

    def _meta(self) -> dict:
        meta = {"config": self.config.to_json(), "phase": self.config.phase,
                "seed": self.config.seed, "num_classes": self.exp.dataset.num_classes,
                "unet": _jsonable(dataclasses.asdict(self.exp.unet_config)),
                "dataset": self.exp.dataset.summary(), "num_examples": len(self.exp.dataset),
                "dataset_fingerprint": self.fingerprint, "seed_fixed": self.seed_fixed}
        if self.dp:
            meta["ledger"] = self.ledger.to_dict()
            meta["noise_multiplier"] = self.plan.noise_multiplier
        return meta

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

    def _local_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """This process's slice of a global batch of dataset indices, gathered on the host."""
        local = batching.host_slice(indices, jax.process_index(), jax.process_count())
        return self.exp.host_batch(local)

    def _local_mask(self, mask: np.ndarray) -> np.ndarray:
        return batching.host_slice(mask, jax.process_index(), jax.process_count())

    def train_step(self) -> Callable[[], dict[str, float]]:
        """Runs step `self.step`; returns a function that fetches the step's metrics.

        The metrics are fetched only when they are logged: reading them waits for the device,
        which would otherwise stall the dispatch of the next step on an accelerator.
        """
        c, s = self.config, self.state
        key = self.exp.example_key(self.step)
        n = len(self.exp.dataset)
        if self.dp:
            selected = batching.poisson_sample(n, self.plan.sampling_rate, seed=c.seed,
                                               step=self.step)
            extra_sum = None
            if self.canaries is not None:
                selected, extra_sum = self.canaries.route(selected)
            host_chunks = batching.split_into_chunks(selected, self.plan.chunk_size)
            chunks = [(self._local_batch(idx), self._local_mask(m)) for idx, m in host_chunks]
            params, opt_state, stats = self.step_fn(s["params"], s["opt_state"], chunks, key,
                                                    extra_sum)
            real_rows = np.concatenate([m for _, m in host_chunks])
            metrics = functools.partial(_clip_metrics, stats, real_rows)
        else:
            idx = batching.shuffled_batch(n, c.train.batch_size, seed=c.seed, step=self.step)
            params, opt_state, m = self.step_fn(s["params"], s["opt_state"],
                                                self._local_batch(idx), key)
            metrics = functools.partial(lambda m: {k: float(v) for k, v in m.items()}, m)
        ema = _ema_update(s["ema_params"], params, c.train.ema_decay)
        new_state = {"step": jnp.asarray(self.step + 1, jnp.int32), "params": params,
                     "ema_params": ema, "opt_state": opt_state}
        # Commit the step: ledger first, then state, with nothing in between that can fail. An
        # interrupt landing between the two lines leaves the ledger one step AHEAD of the state,
        # which over-counts the spent budget (safe), never under-counts it.
        if self.dp:
            self.ledger.record(self.plan.noise_multiplier, self.plan.sampling_rate)
        self.state, self.step = new_state, self.step + 1
        return metrics

    def budget_allows_step(self) -> bool:
        return (not self.dp) or self.ledger.can_record(self.plan.noise_multiplier,
                                                       self.plan.sampling_rate)

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
                    metrics = fetch_metrics()
                    if self.dp:  # a PLD evaluation: once per log line, not once per step
                        metrics["epsilon"] = self.ledger.spent_epsilon()
                    logger.write(self.step, metrics)
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
        report = None
        if self.dp:
            report = privacy_report(
                self.ledger, config=self.config, num_examples=len(self.exp.dataset),
                num_params=count_params(self.state["params"]),
                num_trainable=count_params(_masked_leaves(self.state["params"], self.mask)),
                dataset=self.exp.dataset.summary(), stopped_by_budget=stopped_by_budget,
                calibrated=self.plan.calibrated, seed_fixed=self.seed_fixed,
                earlier_releases=self.earlier_releases,
                initial_model=phases.describe_initial_model(self.config.init_from))
            if self.is_lead:
                write_privacy_report(self.workdir, report)
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
        c = self.config
        log.info("model: %s parameters; devices: %d; phase: %s",
                 f"{count_params(self.state['params']):,}", self.num_devices, c.phase)
        if self.dp:
            p = self.plan
            log.info("DP: sigma=%.4f (%s), q=%.5f, expected batch %d, chunk %d, clip %.3g, K=%d, "
                     "target eps=%.3g at delta=%.2g over %d steps", p.noise_multiplier,
                     "calibrated" if p.calibrated else "given", p.sampling_rate,
                     p.expected_batch_size, p.chunk_size, c.dp.clip_norm, c.diffusion.augmult,
                     c.dp.target_epsilon, c.dp.delta, c.train.num_steps)


def _clip_metrics(stats, mask: np.ndarray) -> dict[str, float]:
    """Host metrics of one DP step, `mask` (`[num_chunks * chunk_size]`) marking real rows.

    These statistics are computed from the private data without noise: they are for monitoring
    the run and are not covered by the DP guarantee (the privacy report says so).
    """
    norms = parallel.to_host(stats.norms)[mask]
    norms = norms[np.isfinite(norms)]  # a non-finite gradient was zeroed (and counted)
    losses = parallel.to_host(stats.losses)[mask]
    batch_size = int(mask.sum())
    metrics = {"batch_size": float(batch_size),
               "num_clipped": float(stats.num_clipped),
               "num_nonfinite": float(stats.num_nonfinite),
               "fraction_clipped": float(stats.num_clipped) / max(batch_size, 1)}
    if norms.size:
        for q in (10, 50, 90):
            metrics[f"grad_norm_p{q}"] = float(np.percentile(norms, q))
        metrics["loss"] = float(losses.mean())
    return metrics


def _masked_leaves(params, mask):
    if mask is None:
        return params
    return [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]


def _jsonable(d):
    return {k: (str(v) if not isinstance(v, (int, float, str, bool, list, tuple, type(None)))
                else v) for k, v in d.items()}


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
