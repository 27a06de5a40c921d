"""What a workdir must satisfy before a run starts or resumes in it.

A resumed run continues one privacy account, so everything the account depends on must be the
checkpoint's: the phase, the privacy target (ledger), the noise multiplier, the seed, the data.
A fresh start must not fine-tune from an unsound `init_from`, and a fresh DP start must not
silently make a second release next to an earlier one. `check_workdir` runs every one of these
checks (the data's once the dataset is built, with `Resumption.check_data`); each raises
ValueError with one line saying what differs and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxdpdm.checkpoint import CheckpointStore, checkpoint_dir, has_checkpoint
from jaxdpdm.dp import accounting
from jaxdpdm.dp.report import release_traces
from jaxdpdm.experiment import fingerprint_mismatch

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Resumption:
    """What a workdir fixes for the run about to start in it (every check has passed).

    Attributes:
      step: the newest restorable checkpoint's step; None for a fresh start.
      config: the config with its seed resolved (`with_seed`).
      seed_fixed: whether that seed is known to whoever has the config; None when an old
        checkpoint did not record it.
      ledger: the checkpoint's privacy ledger (DP resume only, else None).
      noise_multiplier: the checkpoint's sigma (DP resume only, else None).
      restart_traces: release traces of an earlier DP run in a fresh DP workdir that
        `allow_restart` lets this run start over in (else empty).
      meta: the checkpoint's metadata (empty for a fresh start).
    """
    step: int | None
    config: Any
    seed_fixed: bool | None
    ledger: accounting.PrivacyLedger | None = None
    noise_multiplier: float | None = None
    restart_traces: list[str] = dataclasses.field(default_factory=list)
    meta: dict = dataclasses.field(default_factory=dict)

    def check_data(self, fingerprint: dict) -> None:
        """Refuses to resume on other data than the checkpoint's (`check_same_data`)."""
        if self.meta:
            check_same_data(self.meta, fingerprint)


def check_workdir(store: CheckpointStore, config, workdir: str,
                  allow_restart: bool = False) -> Resumption:
    """Every check the start or resumption of `config` in `workdir` must pass, in one place.

    A resumption must keep the checkpoint's phase, seed, privacy target (`resumed_ledger`) and
    noise multiplier (`resumed_noise_multiplier`); a fresh start must pass `check_init_from` and,
    for a DP run, `refuse_spent_workdir`. The data are checked later with `check_data`.
    """
    latest, meta = store.newest_restorable(meta_problem)
    if not meta:
        check_init_from(config)
        traces = (refuse_spent_workdir(workdir, allow_restart) if config.phase == "dp" else [])
        return Resumption(None, with_seed(config, None), config.seed is not None,
                          restart_traces=traces)
    if meta.get("phase") != config.phase:
        raise ValueError(f"{workdir} holds a {meta.get('phase')!r} run, this config is "
                         f"phase {config.phase!r}: use a new workdir (and init_from)")
    ledger = sigma = None
    if config.phase == "dp":
        ledger = resumed_ledger(meta["ledger"], config)
        sigma = resumed_noise_multiplier(meta["noise_multiplier"], config)
    return Resumption(latest, with_seed(config, meta.get("seed")), meta.get("seed_fixed"), ledger,
                      sigma, meta=meta)


def check_init_from(config) -> None:
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
    if source["name"] == mine.name and (source["subset"] != "public" or
                                        source["public_fraction"] != mine.public_fraction or
                                        source["split_seed"] != mine.split_seed):
        raise ValueError(
            f"init_from={config.init_from!r} was trained on {source['name']} subset "
            f"{source['subset']!r} (public_fraction={source['public_fraction']}, "
            f"split_seed={source['split_seed']}); fine-tuning on the private subset needs a "
            f"model pretrained on the public subset of the same split")


def resumed_ledger(record: dict, config) -> accounting.PrivacyLedger:
    """The checkpoint's ledger, refusing a config whose privacy target says otherwise."""
    ledger = accounting.PrivacyLedger.from_dict(record)
    for name, saved in (("target_epsilon", ledger.target_epsilon), ("delta", ledger.delta),
                        ("accountant", ledger.accountant)):
        if config.dp[name] != saved:
            raise ValueError(f"dp.{name}={config.dp[name]!r} differs from the checkpoint's "
                             f"{saved!r}; a run's privacy target cannot change on resume (use "
                             "a new workdir)")
    return ledger


def resumed_noise_multiplier(stored: float, config) -> float:
    """The checkpoint's sigma, which the ledger recorded: a config may not change it."""
    given = config.dp.noise_multiplier
    if given is not None and given != stored:
        raise ValueError(f"dp.noise_multiplier={given} differs from the checkpoint's {stored}; "
                         "use a new workdir")
    if not stored > 0:  # written by a version that accepted sigma = 0: nothing was private
        raise ValueError(f"the checkpoint's noise multiplier is {stored}: that run added no "
                         "noise, so it cannot be resumed as a DP run (use a new workdir)")
    return float(stored)


def meta_problem(meta: dict) -> str | None:
    """Why a checkpoint's metadata cannot resume a run (None when it can)."""
    needed = ["phase", "seed", "config"
             ] + (["ledger", "noise_multiplier"] if meta.get("phase") == "dp" else [])
    missing = [key for key in needed if key not in meta]
    return f"its metadata lacks {', '.join(missing)}" if missing else None


def refuse_spent_workdir(workdir: str, allow_restart: bool) -> list[str]:
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
    log.warning(
        "starting over in %s although it holds traces of an earlier DP run (%s): the "
        "new privacy report states the earlier release(s) and their composition", workdir,
        ", ".join(traces))
    return traces


def check_same_data(meta: dict, fingerprint: dict) -> None:
    """Refuses to resume on other data than the checkpoint's ledger accounts for."""
    saved = meta.get("dataset_fingerprint")
    if saved is None:  # written before fingerprints were stored: size is all we can compare
        if meta.get("num_examples") != fingerprint["num_examples"]:
            raise ValueError(f"the training data have {fingerprint['num_examples']} examples, "
                             f"the checkpoint's had {meta.get('num_examples')}: a run's data "
                             "cannot change on resume (use a new workdir)")
        log.warning(
            "the checkpoint predates dataset fingerprints: only the number of examples "
            "(%d) was checked, not the content", fingerprint["num_examples"])
        return
    mismatch = fingerprint_mismatch(saved, fingerprint)
    if mismatch:
        raise ValueError(f"the training data differ from the checkpoint's ({mismatch}): a run's "
                         "data cannot change on resume (use a new workdir)")


def with_seed(config, stored_seed: int | None):
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
