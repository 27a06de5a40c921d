"""What differs between a non-private run (pretraining) and a DP fine-tuning run: one plan object.

The trainer (`jaxdpdm.train`) runs the same loop, state, EMA and checkpoints for both phases; its
plan decides the rest: how a step's examples are drawn and which compiled step runs on them,
whether a step spends privacy budget, what the checkpoint metadata, the log and the final report
add. `make_plan` is the one place that looks at `config.phase`.

Frozen parameters (`dp.trainable`) are resolved here, once, to one bool mask given to the two
halves of the Gaussian mechanism and nowhere else (privacy reasoning in `jaxdpdm.dp`):

* `parallel.make_dp_step(trainable=)`: frozen leaves are not differentiated, so the clipped norm
  (the sensitivity) is over the trainable leaves only, and `apply` returns them unchanged,
  whatever the optimizer does with their zero updates (decoupled weight decay included);
* `dp_aggregate(trainable=)`: noise only on trainable coordinates, each taking its slice of one
  draw laid out over ALL leaves, so a trainable leaf's noise does not depend on which others are
  frozen (tests/test_plans.py checks this through this module's optimizer and compiled step).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import jax
import numpy as np
import optax

from jaxdpdm import parallel, phases
from jaxdpdm.dp import accounting, batching, dp_aggregate, trainable_mask
from jaxdpdm.dp.report import privacy_report, write_privacy_report
from jaxdpdm.experiment import report_settings
from jaxdpdm.models import count_params

log = logging.getLogger(__name__)

Metrics = Callable[[], dict[str, float]]


def adamw(train_config) -> optax.GradientTransformation:
    """AdamW with a linear warmup from 0 to `learning_rate`, then constant."""
    t = train_config
    lr = optax.warmup_constant_schedule(0.0, t.learning_rate, max(t.warmup_steps, 1))
    return optax.adamw(lr, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, weight_decay=t.weight_decay)


def calibrated_noise_multiplier(config, sampling_rate: float,
                                ledger: accounting.PrivacyLedger) -> float:
    """The sigma that spends exactly the target over the steps left to `train.num_steps`."""
    # (no num_examples: the ledger already warned if delta >= 1/N; the report states it)
    return accounting.calibrate_noise_multiplier(target_epsilon=config.dp.target_epsilon,
                                                 delta=config.dp.delta, sampling_rate=sampling_rate,
                                                 steps=config.train.num_steps - ledger.total_steps,
                                                 accountant=config.dp.accountant)


def _local(rows: np.ndarray) -> np.ndarray:
    """This process's slice of the rows of a global batch (`batching.host_slice`)."""
    return batching.host_slice(rows, jax.process_index(), jax.process_count())


def _host_batch(exp, indices: np.ndarray) -> dict[str, np.ndarray]:
    """This process's slice of a global batch of dataset indices, gathered on the host."""
    return exp.host_batch(_local(indices))


class PretrainPlan:
    """Non-private training: shuffled fixed-size batches, the plain mean gradient, no ledger."""

    ledger = None

    def __init__(self, config, exp, mesh):
        batch, devices = config.train.batch_size, mesh.devices.size
        if batch % devices:
            raise ValueError(f"train.batch_size={batch} must be divisible by the number of "
                             f"devices ({devices}) for pretraining")
        self.config, self.exp = config, exp
        self.optimizer = adamw(config.train)
        self.step_fn = parallel.make_pretrain_step(exp.loss_fn, self.optimizer, mesh=mesh,
                                                   ema_decay=config.train.ema_decay)

    def run_step(self, state: dict, step: int, key: jax.Array) -> tuple[Any, Any, Any, Metrics]:
        """`(params, opt_state, ema_params, fetch_metrics)` after step `step` from `state`."""
        c = self.config
        idx = batching.shuffled_batch(len(self.exp.dataset), c.train.batch_size, seed=c.seed,
                                      step=step)
        params, opt_state, m, ema = self.step_fn(state["params"], state["opt_state"],
                                                 _host_batch(self.exp, idx), key,
                                                 ema=state["ema_params"])
        return params, opt_state, ema, functools.partial(
            lambda m: {k: float(v) for k, v in m.items()}, m)

    def allows_step(self) -> bool:
        return True

    def record_step(self) -> None:
        """Nothing to account for."""

    def annotate(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def meta(self) -> dict:
        return {}

    def describe(self) -> None:
        """Nothing beyond the trainer's own start line."""

    def finish(self, params, *, stopped_by_budget: bool, earlier_releases: list[dict], workdir: str,
               is_lead: bool) -> None:
        del params, stopped_by_budget, earlier_releases, workdir, is_lead


class DPPlan:
    """DP-SGD: Poisson batches, clipped sums, one noise draw per step, a budget-enforcing ledger.

    Attributes:
      noise_multiplier: sigma, fixed before the first step (the checkpoint's on resume).
      sampling_rate: q = batch_size / N.
      expected_batch_size: q * N, the public normaliser.
      chunk_size: rows of one compiled call (one microbatch per device).
      calibrated: whether sigma was calibrated to the target (not given by the config).
      ledger: the privacy ledger (the checkpoint's on resume).
      mask: the bool pytree of trainable leaves, or None (everything is trained).
    """

    def __init__(self, config, exp, mesh, resumption, canaries=None):
        t, p = config.train, config.dp
        self.config, self.exp, self.canaries = config, exp, canaries
        self.seed_fixed = resumption.seed_fixed
        if self.seed_fixed:
            log.warning(
                "*** DP run with a FIXED seed (seed=%d from the config): the DP noise "
                "and batches are reproducible by anyone who has the config, and the "
                "guarantee does not hold against them. Unset it (--config.seed=None) "
                "for private data. The privacy report records this. ***", config.seed)
        n = len(exp.dataset)
        self.sampling_rate = t.batch_size / n
        self.expected_batch_size = t.batch_size
        self.ledger = resumption.ledger or accounting.PrivacyLedger(
            p.target_epsilon, p.delta, accountant=p.accountant, num_examples=n)
        self.calibrated = p.noise_multiplier is None
        if resumption.noise_multiplier is not None:  # what the ledger recorded; checked there
            self.noise_multiplier = resumption.noise_multiplier
        elif self.calibrated:
            self.noise_multiplier = calibrated_noise_multiplier(config, self.sampling_rate,
                                                                self.ledger)
        else:
            self.noise_multiplier = float(p.noise_multiplier)
        # One chunk is one microbatch per device: a Poisson draw becomes ceil(n / chunk) calls
        # of the same compiled program, the last one padded. Looping over microbatches on the
        # host rather than with lax.scan inside one program is deliberate: on XLA:CPU the
        # scanned per-example gradients ran ~10x slower per example (measured: 259 vs 23 ms at
        # 16x16, K=4).
        self.chunk_size = mesh.devices.size * t.microbatch_size
        self.mask = (None if p.trainable is None else trainable_mask(
            jax.eval_shape(exp.init_params), p.trainable))
        self.optimizer = optax.chain(
            dp_aggregate(clip_norm=p.clip_norm, noise_multiplier=self.noise_multiplier,
                         expected_batch_size=self.expected_batch_size, seed=config.seed,
                         trainable=self.mask),
            *([
                canaries.release_tap(noise_multiplier=self.noise_multiplier,
                                     sampling_rate=self.sampling_rate,
                                     expected_batch_size=self.expected_batch_size)
            ] if canaries is not None else []), adamw(t))
        self.step_fn = parallel.make_dp_step(exp.loss_fn, self.optimizer, clip_norm=p.clip_norm,
                                             microbatch_size=t.microbatch_size, mesh=mesh,
                                             trainable=self.mask, ema_decay=t.ema_decay)

    def run_step(self, state: dict, step: int, key: jax.Array) -> tuple[Any, Any, Any, Metrics]:
        """`(params, opt_state, ema_params, fetch_metrics)` after step `step` from `state`."""
        selected = batching.poisson_sample(len(self.exp.dataset), self.sampling_rate,
                                           seed=self.config.seed, step=step)
        extra_sum = None
        if self.canaries is not None:
            selected, extra_sum = self.canaries.route(selected)
        host_chunks = batching.split_into_chunks(selected, self.chunk_size)
        chunks = [(_host_batch(self.exp, idx), _local(m)) for idx, m in host_chunks]
        params, opt_state, stats, ema = self.step_fn(state["params"], state["opt_state"], chunks,
                                                     key, extra_sum, ema=state["ema_params"])
        real_rows = np.concatenate([m for _, m in host_chunks])
        return params, opt_state, ema, functools.partial(_clip_metrics, stats, real_rows)

    def allows_step(self) -> bool:
        return self.ledger.can_record(self.noise_multiplier, self.sampling_rate)

    def record_step(self) -> None:
        self.ledger.record(self.noise_multiplier, self.sampling_rate)

    def annotate(self, metrics: dict[str, float]) -> dict[str, float]:
        # A PLD evaluation: once per log line, not once per step.
        return {**metrics, "epsilon": self.ledger.spent_epsilon()}

    def meta(self) -> dict:
        return {"ledger": self.ledger.to_dict(), "noise_multiplier": self.noise_multiplier}

    def describe(self) -> None:
        c = self.config
        log.info(
            "DP: sigma=%.4f (%s), q=%.5f, expected batch %d, chunk %d, clip %.3g, K=%d, "
            "target eps=%.3g at delta=%.2g over %d steps", self.noise_multiplier,
            "calibrated" if self.calibrated else "given", self.sampling_rate,
            self.expected_batch_size, self.chunk_size, c.dp.clip_norm, c.diffusion.augmult,
            c.dp.target_epsilon, c.dp.delta, c.train.num_steps)

    def finish(self, params, *, stopped_by_budget: bool, earlier_releases: list[dict], workdir: str,
               is_lead: bool) -> dict[str, Any]:
        """The privacy report of the run (written to `workdir` by the lead process)."""
        report = privacy_report(self.ledger, settings=report_settings(self.config),
                                num_examples=len(self.exp.dataset), num_params=count_params(params),
                                num_trainable=count_params(params, self.mask),
                                dataset=self.exp.dataset.summary(),
                                stopped_by_budget=stopped_by_budget, calibrated=self.calibrated,
                                seed_fixed=self.seed_fixed, earlier_releases=earlier_releases,
                                initial_model=phases.describe_initial_model(self.config.init_from))
        if is_lead:
            write_privacy_report(workdir, report)
        return report


def make_plan(config, exp, mesh, resumption, canaries=None) -> PretrainPlan | DPPlan:
    """The plan of `config.phase` ("pretrain" or "dp"); `resumption` from `resume.check_workdir`.

    `canaries` (audit runs only, `jaxdpdm.audit`) is a CanaryInjector for `exp`.
    """
    if config.phase == "dp":
        return DPPlan(config, exp, mesh, resumption, canaries)
    return PretrainPlan(config, exp, mesh)


def _clip_metrics(stats, mask: np.ndarray) -> dict[str, float]:
    """Host metrics of one DP step, `mask` (`[num_chunks * chunk_size]`) marking real rows.

    These statistics are computed from the private data without noise: they are for monitoring
    the run and are not covered by the DP guarantee (the privacy report says so).
    """
    norms = parallel.to_host(stats.norms)[mask]
    norms = norms[np.isfinite(norms)]  # a non-finite gradient was zeroed (and counted)
    losses = parallel.to_host(stats.losses)[mask]
    batch_size = int(mask.sum())
    metrics = {
        "batch_size": float(batch_size), "num_clipped": float(stats.num_clipped),
        "num_nonfinite": float(stats.num_nonfinite),
        "fraction_clipped": float(stats.num_clipped) / max(batch_size, 1)
    }
    if norms.size:
        for q in (10, 50, 90):
            metrics[f"grad_norm_p{q}"] = float(np.percentile(norms, q))
        metrics["loss"] = float(losses.mean())
    return metrics
