"""`--mode=audit`: train the configured DP run with canaries, score them, bound epsilon.

The audit run lives in `<workdir>/audit/`, a workdir of its own (checkpoints, logs, the secret
canary file, the reports): nothing is written next to the release run's checkpoints or reports,
and the canary-trained model is never the one meant for release. Rerunning the command resumes an
interrupted audit (the canaries are read back from the audit folder) or re-scores a finished one.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxdpdm import diffusion, storage
from jaxdpdm.audit.canaries import (CANARY_FILE, CanaryInjector, CanarySet, draw_canaries,
                                    num_trainable_coordinates, released_scores)
from jaxdpdm.audit.report import VERDICT_KINDS, audit_report, lower_bounds, write_audit_report
from jaxdpdm.config import validate_config
from jaxdpdm.images import to_model_range

log = logging.getLogger(__name__)

AUDIT_SUBDIR = "audit"
# The fixed noise draws of the input-canary score (public: they are part of the attack).
_SCORE_NOISE_SEED = 0x5C0E


def audit_directory(workdir: str) -> str:
    """`<workdir>/audit`: where an audit of the run configured for `workdir` writes."""
    return storage.join(storage.normalize(workdir), AUDIT_SUBDIR)


def _secret_seed() -> int:
    """128 secret bits from the OS, the same on every host of a multi-host job."""
    seed = secrets.randbits(128)
    if jax.process_count() > 1:
        words = np.array([(seed >> (32 * i)) & 0xFFFFFFFF for i in range(4)], np.uint32)
        words = np.asarray(multihost_utils.broadcast_one_to_all(words))
        seed = sum(int(w) << (32 * i) for i, w in enumerate(words))
    return seed


def _canary_factory(config, directory: str):
    """`exp -> CanaryInjector`: loads the audit's canaries, or draws and saves them once."""
    path = storage.join(directory, CANARY_FILE)

    def make(exp) -> CanaryInjector:
        if storage.exists(path):
            canaries = CanarySet.load(path)
        else:
            canaries = draw_canaries(
                config.audit.kind, config.audit.num_canaries, image_shape=exp.dataset.image_shape,
                num_classes=exp.dataset.num_classes,
                num_trainable=num_trainable_coordinates(jax.eval_shape(exp.init_params),
                                                        config.dp.trainable),
                secret_seed=_secret_seed())
            if jax.process_index() == 0:
                canaries.save(path)
        return CanaryInjector(canaries, exp, clip_norm=config.dp.clip_norm,
                              trainable=config.dp.trainable)

    return make


def input_canary_scores(exp, params, images: np.ndarray, labels: np.ndarray, *, num_timesteps: int,
                        batch_size: int = 32) -> np.ndarray:
    """Minus each canary's diffusion loss under `params`, over fixed timesteps and noise.

    Every canary sees the same n timesteps (evenly spread over [0, T)) and the same n noise
    images, so the scores differ only through the canaries and the model.

    Args:
      images: uint8 `[m, H, W, C]`; labels: int32 `[m]`.
      num_timesteps: n.

    Returns:
      f32[m], higher for canaries the model fits better.
    """
    schedule = exp.schedule
    total = schedule.num_timesteps
    ts = jnp.asarray(((np.arange(num_timesteps) + 0.5) * total / num_timesteps).astype(np.int32))
    noise = jax.random.normal(jax.random.key(_SCORE_NOISE_SEED),
                              (num_timesteps,) + images.shape[1:], jnp.float32)
    conditional = exp.unet_config.num_classes is not None

    def score(example):
        image, label = example
        x0 = jnp.broadcast_to(to_model_range(image), noise.shape)
        x_t = diffusion.q_sample(schedule, x0, ts, noise)
        y = jnp.full((num_timesteps,), label, jnp.int32) if conditional else None
        eps = exp.eval_apply(params, x_t, ts, y)
        return -jnp.mean(jnp.square(eps.astype(jnp.float32) - noise))

    run = jax.jit(lambda im, lb: jax.lax.map(score, (im, lb), batch_size=batch_size))
    return np.asarray(run(jnp.asarray(images), jnp.asarray(labels)))


def run_audit(config, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the canary-audited training of `config` in `<workdir>/audit`.

    Returns:
      The audit report (also written as audit_report.json / .txt in the audit folder).
    """
    from jaxdpdm.train import Trainer  # pylint: disable=import-outside-toplevel

    validate_config(config)
    if config.phase != "dp":
        raise ValueError(f"--mode=audit audits a DP run; this config is phase {config.phase!r}")
    directory = storage.ensure_writable_dir(audit_directory(workdir))
    start = time.perf_counter()
    trainer = Trainer(config, directory, canaries=_canary_factory(config, directory))
    result = trainer.run()
    trained = time.perf_counter()
    canaries = trainer.canaries.canaries
    # Scores first, from the released parameters and updates only; the bits are read after.
    scores = {}
    if canaries.num_gradient:
        tap = released_scores(trainer.state["opt_state"])
        scores["gradient"], scores["gradient_sum"] = tap.log_likelihood_ratio, tap.released
    if canaries.num_input:
        scores["input"] = input_canary_scores(trainer.exp, trainer.state["ema_params"],
                                              canaries.input_images, canaries.input_labels,
                                              num_timesteps=config.audit.score_timesteps)
    scored = time.perf_counter()
    bits = {
        "gradient": canaries.gradient_bits, "gradient_sum": canaries.gradient_bits,
        "input": canaries.input_bits
    }
    privacy = result["privacy"]
    delta = privacy["guarantee"]["delta"]
    claimed = privacy["guarantee"][f"epsilon_{privacy['guarantee']['enforced_accountant']}"]
    # Bonferroni over the kinds in the verdict: the verdict errs with at most 1 - confidence.
    num_tests = sum(kind in VERDICT_KINDS for kind in scores)
    per_kind = 1.0 - (1.0 - config.audit.confidence) / num_tests
    bounds = {
        kind: lower_bounds(s, bits[kind], delta=delta, confidence=per_kind)
        for kind, s in scores.items()
    }
    compute = {
        "training_seconds": trained - start, "scoring_seconds": scored - trained,
        "statistics_seconds": time.perf_counter() - scored
    }
    report = audit_report(bounds, claimed_epsilon=claimed, delta=delta,
                          confidence=config.audit.confidence, per_kind_confidence=per_kind,
                          privacy=privacy, compute=compute)
    if trainer.is_lead:
        print(write_audit_report(directory, report), end="")
    return report
