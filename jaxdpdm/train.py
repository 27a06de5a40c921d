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

import contextlib
import dataclasses
import functools
import json
import logging
import os
import secrets
import signal
import time
import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from jaxdpdm import parallel, storage
from jaxdpdm.checkpoint import (CHECKPOINT_SUBDIR, CheckpointStore, checkpoint_dir,
                                has_checkpoint, load_init_params)
from jaxdpdm.config import validate_config
from jaxdpdm.dp import accounting, batching, dp_aggregate, trainable_mask
from jaxdpdm.evaluation.report import (archive_earlier_reports, privacy_report, release_traces,
                                       write_privacy_report)
from jaxdpdm.experiment import (build_experiment, count_params, dataset_fingerprint,
                                fingerprint_mismatch)
from jaxdpdm.monitoring import GridWriter, MetricsLogger
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
            steps=t.num_steps - ledger.total_steps, accountant=p.accountant,
            num_examples=num_examples)
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

    def __init__(self, config, workdir: str, *, allow_restart_spent_workdir: bool = False):
        """Checks config, workdir and data, restores the newest good checkpoint, compiles.

        Args:
          allow_restart_spent_workdir: start a DP run over in a workdir that holds traces of an
            earlier DP run (its privacy report, grids, samples) but no checkpoint to resume. The
            earlier report is kept as `privacy_report.earlier-<n>.json` and the new report lists
            it. Without it such a workdir is refused.
        """
        # Everything that can be wrong with the config, the data or the workdir is checked here,
        # before the first compilation, so a mistake costs seconds, not a compile.
        validate_config(config)
        self.workdir = storage.ensure_writable_dir(workdir)
        # One process per workdir (the lead process holds it for a multi-host job); released
        # when `run` ends, when this constructor fails, or at the latest when the trainer is
        # collected or the interpreter exits.
        self._lock = None
        if jax.process_index() == 0:
            self._lock = WorkdirLock(self.workdir).acquire()
            weakref.finalize(self, self._lock.release)
            _test_pause("locked")
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
        latest, meta = self.store.newest_restorable(_meta_problem)
        if meta and meta.get("phase") != config.phase:
            raise ValueError(f"{self.workdir} holds a {meta.get('phase')!r} run, this config is "
                             f"phase {config.phase!r}: use a new workdir (and init_from)")
        restart_traces = []
        if not meta:
            _check_init_from(config)
            if config.phase == "dp":
                restart_traces = _refuse_spent_workdir(self.workdir, allow_restart)
        # Whether the seed (hence the noise) is known to whoever has the config; None: an old
        # checkpoint that did not record it.
        self.seed_fixed = meta.get("seed_fixed") if meta else config.seed is not None
        self.config = config = _with_seed(config, meta.get("seed"))
        self.exp = build_experiment(config)
        self.dp = config.phase == "dp"
        if self.dp and self.seed_fixed:
            log.warning("*** DP run with a FIXED seed (seed=%d from the config): the DP noise "
                        "and batches are reproducible by anyone who has the config, and the "
                        "guarantee does not hold against them. Unset it (--config.seed=None) "
                        "for private data. The privacy report records this. ***", config.seed)
        self.fingerprint = dataset_fingerprint(config, self.exp.dataset)
        if meta:
            _check_same_data(meta, self.fingerprint)
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
            self.ledger = (_resumed_ledger(meta["ledger"], config) if meta else
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
        if self._saved_step == self.step:
            return
        with _signals_deferred():
            _test_pause("checkpoint_write", self.step)
            self.store.save(self.step, self.state, self._meta())
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
            host_chunks = batching.split_into_chunks(selected, self.plan.chunk_size)
            chunks = [(self._local_batch(idx), self._local_mask(m)) for idx, m in host_chunks]
            params, opt_state, stats = self.step_fn(s["params"], s["opt_state"], chunks, key)
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
            return self.finish(stopped_by_budget)
        finally:
            self.release_workdir()

    def _train_loop(self) -> bool:
        """Runs the steps; returns whether the privacy budget stopped them."""
        c = self.config
        logger = MetricsLogger(self.workdir, c.train.num_steps, enabled=self.is_lead)
        self._log_start()
        preempted = _SignalFlag(signal.SIGTERM)
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
                _test_pause("step_done", self.step)
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
                earlier_releases=self.earlier_releases)
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


def _check_init_from(config) -> None:
    """Refuses a fine-tuning start that would silently weaken or void the guarantee.

    * `init_reinit` is only set by fine-tuning configs: without `init_from` such a run would
      train from scratch and spend the budget on a model that cannot be good.
    * Pretraining on one part of a dataset and fine-tuning on its private part is sound only
      if the pretraining run used the *public* part of the same split; otherwise the "public"
      model has seen private images, which the accountant does not cover.
    """
    if config.init_from is None:
        if config.init_reinit is not None:
            raise ValueError("init_reinit is set but init_from is not: this config fine-tunes a "
                             "pretrained model; set --config.init_from=<pretraining workdir>")
        return
    if not has_checkpoint(config.init_from):
        raise FileNotFoundError(f"init_from={config.init_from!r} holds no checkpoint")
    if config.phase != "dp" or config.data.subset != "private":
        return
    store = CheckpointStore(checkpoint_dir(config.init_from), create=False)
    try:
        source = json.loads(store.restore_meta()["config"])["data"]
    finally:
        store.close()
    mine = config.data
    if source["name"] == mine.name and (
            source["subset"] != "public" or source["public_fraction"] != mine.public_fraction
            or source["split_seed"] != mine.split_seed):
        raise ValueError(
            f"init_from={config.init_from!r} was trained on {source['name']} subset "
            f"{source['subset']!r} (public_fraction={source['public_fraction']}, "
            f"split_seed={source['split_seed']}); fine-tuning on the private subset needs a "
            f"model pretrained on the public subset of the same split")


def _resumed_ledger(record: dict, config) -> accounting.PrivacyLedger:
    """The checkpoint's ledger, refusing a config whose privacy target says otherwise."""
    ledger = accounting.PrivacyLedger.from_dict(record)
    for name, saved in (("target_epsilon", ledger.target_epsilon), ("delta", ledger.delta),
                        ("accountant", ledger.accountant)):
        if config.dp[name] != saved:
            raise ValueError(f"dp.{name}={config.dp[name]!r} differs from the checkpoint's "
                             f"{saved!r}; a run's privacy target cannot change on resume (use "
                             "a new workdir)")
    return ledger


def _meta_problem(meta: dict) -> str | None:
    """Why a checkpoint's metadata cannot resume a run (None when it can)."""
    needed = ["phase", "seed", "config"] + (["ledger", "noise_multiplier"]
                                            if meta.get("phase") == "dp" else [])
    missing = [key for key in needed if key not in meta]
    return f"its metadata lacks {', '.join(missing)}" if missing else None


def _refuse_spent_workdir(workdir: str, allow_restart: bool) -> list[str]:
    """Refuses a fresh DP start in a workdir that an earlier DP run has released from, unless
    `allow_restart`; returns the traces of that run (empty for a clean workdir)."""
    traces = release_traces(workdir)
    if not traces:
        return []
    if not allow_restart:
        raise ValueError(
            f"workdir {workdir} holds traces of an earlier DP run ({', '.join(traces)}) but no "
            "checkpoint to resume: starting over would train on the same data again with a new "
            "seed and spend the budget a second time. Use a new workdir, or pass "
            "--allow_restart_spent_workdir to start over here (the new privacy report then "
            "states the earlier release)")
    log.warning("starting over in %s although it holds traces of an earlier DP run (%s): the "
                "new privacy report states the earlier release(s) and their composition",
                workdir, ", ".join(traces))
    return traces


def _check_same_data(meta: dict, fingerprint: dict) -> None:
    """Refuses to resume on other data than the checkpoint's ledger accounts for."""
    saved = meta.get("dataset_fingerprint")
    if saved is None:  # written before fingerprints were stored: size is all we can compare
        if meta.get("num_examples") != fingerprint["num_examples"]:
            raise ValueError(f"the training data have {fingerprint['num_examples']} examples, "
                             f"the checkpoint's had {meta.get('num_examples')}: a run's data "
                             "cannot change on resume (use a new workdir)")
        log.warning("the checkpoint predates dataset fingerprints: only the number of examples "
                    "(%d) was checked, not the content", fingerprint["num_examples"])
        return
    mismatch = fingerprint_mismatch(saved, fingerprint)
    if mismatch:
        raise ValueError(f"the training data differ from the checkpoint's ({mismatch}): a run's "
                         "data cannot change on resume (use a new workdir)")


@contextlib.contextmanager
def _signals_deferred(signums=(signal.SIGINT, signal.SIGTERM)):
    """Holds `signums` while the body runs, then re-raises them for their own handlers.

    In a thread other than the main one (where handlers cannot be set) it does nothing.
    """
    held, previous = [], {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, lambda n, _: held.append(n))
    except ValueError:
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)


# Test-only seam, for deterministic signal and concurrency tests: with
# JAXDPDM_TEST_PAUSE_AT="point[@step],..." and JAXDPDM_TEST_PAUSE_DIR=<dir>, the trainer creates
# `<dir>/<point>.reached` at each named point and waits there until `<dir>/<point>.go` exists.
# Points: "locked" (workdir lock taken), "step_done" (after step `step`, before its
# checkpoint), "checkpoint_write" (inside the save of step `step`). Unset: a no-op.
_PAUSE_ENV, _PAUSE_DIR_ENV = "JAXDPDM_TEST_PAUSE_AT", "JAXDPDM_TEST_PAUSE_DIR"


def _test_pause(point: str, step: int | None = None) -> None:
    wanted = os.environ.get(_PAUSE_ENV)
    if not wanted:
        return
    name = point if step is None else f"{point}@{step}"
    if name not in wanted.split(","):
        return
    directory = os.environ[_PAUSE_DIR_ENV]
    with open(os.path.join(directory, f"{point}.reached"), "w") as f:
        f.write(str(os.getpid()))
    while not os.path.exists(os.path.join(directory, f"{point}.go")):
        time.sleep(0.01)


class _SignalFlag:
    """Records a signal instead of dying of it, so the loop can stop between two steps."""

    def __init__(self, signum: int):
        self.raised = False
        self._signum = signum
        try:
            self._previous = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: leave the default behaviour alone
            self._previous = None

    def _handle(self, signum, frame):
        del signum, frame
        self.raised = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(self._signum, self._previous)


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


def _with_seed(config, stored_seed: int | None):
    """`config` with its seed resolved: the checkpoint's, the configured one, or a secret one.

    The seed determines the DP noise and the Poisson batches, so it must not be guessable: an
    unset seed is drawn from the OS's entropy (and then kept in the private checkpoint only).
    """
    if stored_seed is not None:
        if config.seed is not None and config.seed != stored_seed:
            raise ValueError(f"seed={config.seed} differs from the checkpoint's seed; resuming "
                             "with another seed would replay different releases")
        seed = stored_seed
    elif config.seed is not None:
        seed = config.seed
    else:
        seed = secrets.randbits(31)
        if jax.process_count() > 1:  # every host must use the same (secret) seed
            seed = int(multihost_utils.broadcast_one_to_all(np.int32(seed)))
    config = config.copy_and_resolve_references()
    config.seed = seed
    return config


def train(config, workdir: str, *, allow_restart_spent_workdir: bool = False) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns the final step and privacy report."""
    return Trainer(config, workdir, allow_restart_spent_workdir=allow_restart_spent_workdir).run()
