"""One command, two phases: public pretraining, then DP fine-tuning on the private part.

With `config.pretrain.num_steps > 0` (see `jaxdpdm/config.py`), `--mode=train` runs

1. a non-private run on the *public* part of the data split (`data.subset = "public"`, the
   `pretrain.*` optimisation settings, uniform timesteps) in `WORKDIR/pretrain`;
2. the DP run the config describes, on the *private* part, in `WORKDIR`, initialised from the
   EMA parameters of phase 1 (`init_from = WORKDIR/pretrain`).

Both phases are ordinary runs: each resumes from its own checkpoints, and a finished phase 1
is not repeated. Phase 2's guard (`train._check_init_from`) verifies that phase 1 used the
public part of the same split, and its privacy report names the public images as unprotected.
"""

from __future__ import annotations

from jaxdpdm import storage
from jaxdpdm.checkpoint import CheckpointStore, checkpoint_dir, has_checkpoint

PRETRAIN_SUBDIR = "pretrain"


def has_pretraining_phase(config) -> bool:
    return config.pretrain.num_steps > 0


def pretraining_config(config):
    """The phase-1 config: non-private training on the public part with `config.pretrain.*`."""
    pre = config.copy_and_resolve_references()
    p = config.pretrain
    pre.phase = "pretrain"
    pre.data.subset = "public"
    pre.init_from = None
    pre.init_reinit = None
    pre.pretrain.num_steps = 0
    pre.diffusion.augmult = p.augmult
    pre.diffusion.timestep_ranges = ((0, config.diffusion.num_timesteps),)
    pre.diffusion.timestep_weights = (1.0,)
    t = pre.train
    t.num_steps, t.batch_size = p.num_steps, p.batch_size
    t.learning_rate, t.warmup_steps, t.ema_decay = p.learning_rate, p.warmup_steps, p.ema_decay
    t.checkpoint_every = min(t.checkpoint_every, p.num_steps)
    t.sample_every = 0
    return pre


def fine_tuning_config(config, pretrain_workdir: str):
    """The phase-2 config: `config` initialised from the phase-1 workdir."""
    fine = config.copy_and_resolve_references()
    fine.init_from = pretrain_workdir
    fine.pretrain.num_steps = 0
    return fine


def pretraining_done(workdir: str, num_steps: int) -> bool:
    """True when `workdir` holds a checkpoint at step >= `num_steps`."""
    if not has_checkpoint(workdir):
        return False
    store = CheckpointStore(checkpoint_dir(workdir), create=False)
    try:
        return (store.latest_step() or 0) >= num_steps
    finally:
        store.close()


def describe_initial_model(init_from: str | None) -> dict | None:
    """What the model in `init_from` was trained on, from its newest checkpoint's metadata.

    Returns:
      None without `init_from`; else {"workdir", "phase", "steps", "num_examples", "dataset"}.
    """
    if init_from is None:
        return None
    store = CheckpointStore(checkpoint_dir(init_from), create=False)
    try:
        step = store.latest_step()
        meta = store.restore_meta(step)
    finally:
        store.close()
    return {
        "workdir": init_from, "phase": meta.get("phase"), "steps": step,
        "num_examples": meta.get("num_examples"), "dataset": meta.get("dataset")
    }


def train_in_phases(config, workdir: str, train_one):
    """Runs phase 1 (unless finished, or phase 2 has begun) and then phase 2.

    Args:
      config: a DP config with `pretrain.num_steps > 0`.
      workdir: phase 2's workdir; phase 1 runs in `workdir/pretrain`.
      train_one: `train_one(config, workdir) -> result`, one ordinary run.

    Returns:
      phase 2's result.
    """
    pre_dir = storage.join(workdir, PRETRAIN_SUBDIR)
    if not has_checkpoint(workdir) and not pretraining_done(pre_dir, config.pretrain.num_steps):
        train_one(pretraining_config(config), pre_dir)
    return train_one(fine_tuning_config(config, pre_dir), workdir)
