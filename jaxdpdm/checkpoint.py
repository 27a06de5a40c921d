"""Atomic orbax checkpoints of the whole training state, privacy ledger included.

A checkpoint is a folder `WORKDIR/checkpoints/<step>/` with two items:

* `state`: the array pytree `{"step", "params", "ema_params", "opt_state"}`;
* `meta`: JSON with the privacy ledger, the noise multiplier, the model and data description and
    the config of the run that wrote it.

Both items are written by one orbax `CheckpointManager.save`, which writes into a temporary folder
and renames it only when complete, so a crash mid-write never leaves a checkpoint whose state and
ledger disagree. No RNG state is stored: all randomness derives from `(seed, step)`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxdpdm import storage
from jaxdpdm.dp.clipping import param_path

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
# A checkpoint that does not restore is renamed `<step>` -> `<step>.unrestorable` (kept for
# inspection, out of orbax's way) once the run has resumed from an older one.
SET_ASIDE_SUFFIX = ".unrestorable"


def checkpoint_dir(path: str) -> str:
    """Returns the checkpoint folder for `path`, which is a workdir or a checkpoint folder."""
    path = storage.normalize(path)
    nested = storage.join(path, CHECKPOINT_SUBDIR)
    return nested if storage.isdir(nested) else path


def has_checkpoint(path: str) -> bool:
    """Whether `path` (a workdir or checkpoint folder) holds at least one complete checkpoint."""
    directory = checkpoint_dir(path)
    if not storage.isdir(directory):
        return False
    return any(name.isdigit() for name in storage.listdir(directory))


class CheckpointStore:
    """Saves and restores `(state, meta)` pairs, keeping the newest `keep` checkpoints.

    Args:
        directory: the checkpoint folder (created if missing).
        keep: how many checkpoints to keep; older ones are deleted after a successful save.
    """

    def __init__(self, directory: str, *, keep: int = 3, create: bool = True):
        self.directory = storage.normalize(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=create,
            # Synchronous saves: the ledger on disk must never lag behind a step we report as saved,
            # and a Ctrl-C right after `save` returns must not lose the write.
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Writes `state` (array pytree) and `meta` (JSON-serialisable dict) as checkpoint `step`.

        Raises:
            OSError(ENOSPC): before anything is written, when a local disk has less free space
                than the arrays' size. orbax's own failure on a full disk surfaces as a wall of
                asyncio tracebacks from tensorstore's threads; this check fails first, cleanly.
        """
        self._check_free_space(step, state)
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()

    def _check_free_space(self, step: int, state: Any) -> None:
        if storage.is_remote(self.directory):
            return
        needed = sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree.leaves(state))
        existing = self.directory
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        free = shutil.disk_usage(existing).free
        if free < needed:
            raise OSError(
                errno.ENOSPC, f"No space left on device (checkpoint {step} needs about "
                f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free)", self.directory)

    def restore_meta(self, step: int | None = None) -> dict:
        """Reads only the JSON metadata of checkpoint `step` (default: the newest)."""
        step = self._resolve_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores checkpoint `step` (default: the newest) into the structure of `target`.

        Args:
            target: a pytree of arrays (or `jax.ShapeDtypeStruct`s with shardings) with the
                structure, shapes, dtypes and shardings the restored state must have (saved arrays
                of another dtype are cast to the target's).

        Returns:
            `(state, meta)`.

        Raises:
            ValueError: when the saved arrays do not fit `target` (a different model, say),
                naming the first array that is missing, extra or of another shape.
        """
        step = self._resolve_step(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        mismatch = f"checkpoint {step} in {self.directory} does not match this model/optimizer"
        problem = self._layout_problem(step, abstract)
        if problem is not None:
            raise ValueError(f"{mismatch}: {problem}")
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                              meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{mismatch}: {e}") from e
        return restored["state"], dict(restored["meta"])

    def _layout_problem(self, step: int, abstract: Any) -> str | None:
        """Why checkpoint `step` cannot fill `abstract`, judged from its metadata alone.

        Compares array names (as `param_path` writes them, so a NamedTuple field and the dict key
        orbax stores for it agree) and shapes without reading any array: a refused restore then
        leaves no reads behind and names the first offending array, where orbax's own error names
        neither and suggests padding. Returns None when the layouts agree or the metadata cannot
        be read (the restore itself then reports the problem). Dtypes are not compared: orbax
        casts to the target's.
        """
        try:
            saved = _flatten(self._manager.item_metadata(step)["state"])
        except Exception:  # noqa: BLE001 -- no usable metadata: leave the verdict to the restore
            return None
        wanted = _flatten(abstract)
        only_wanted, only_saved, reshaped = _layout_differences(saved, wanted)
        if only_wanted or only_saved:
            name = min(only_wanted + only_saved)
            where = "this model/optimizer" if name in wanted else "the checkpoint"
            return f"array {name!r} is only in {where}"
        if reshaped:
            name = reshaped[0]
            return (f"array {name!r} has shape {tuple(saved[name].shape)} in the checkpoint and "
                    f"{tuple(wanted[name].shape)} here")
        return None

    def restore_arrays(self, step: int | None = None) -> tuple[Any, dict]:
        """Restores checkpoint `step` without a target (as host numpy arrays), for `init_from`."""
        step = self._resolve_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                          meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def newest_restorable(
            self,
            meta_problem: Callable[[dict], str | None] | None = None) -> tuple[int | None, dict]:
        """The newest checkpoint that restores completely, and its metadata.

        Each candidate, newest first, is read in full (arrays and metadata) and its metadata
        checked by `meta_problem` (returns why it cannot be used, or None). A checkpoint that
        fails (truncated or missing files, missing `meta`, ...) is skipped with a warning that
        names it and the reason; when an older one restores, the skipped ones are renamed
        `<step>.unrestorable` (never deleted), so the resumed run can write those steps again.
        The price is one extra read of the chosen checkpoint at start-up (the trainer restores it
        again into its sharded state).

        Returns:
          `(step, meta)`, or `(None, {})` when the folder holds no checkpoint.

        Raises:
          ValueError: checkpoints exist but none restores (one line naming each and why).
        """
        skipped = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                _, meta = self.restore_arrays(step)
                problem = meta_problem(meta) if meta_problem is not None else None
            except Exception as e:  # noqa: BLE001 -- any failure to read makes it unusable
                problem = _one_line(e)
            if problem is None:
                for bad, why in skipped:
                    log.warning(
                        "checkpoint %d in %s does not restore (%s): skipped; resuming "
                        "from checkpoint %d; the bad one is kept as %s%s", bad, self.directory, why,
                        step, bad, SET_ASIDE_SUFFIX)
                    if jax.process_index() == 0:  # one renamer for a shared folder
                        self._set_aside(bad)
                if skipped:
                    if jax.process_count() > 1:
                        multihost_utils.sync_global_devices("jaxdpdm checkpoints set aside")
                    self._manager.reload()
                return step, meta
            skipped.append((step, problem))
        if skipped:
            raise ValueError(f"no checkpoint in {self.directory} restores: " +
                             "; ".join(f"step {step}: {why}" for step, why in skipped) +
                             " (left in place; move them "
                             "away to start over)")
        return None, {}

    def _set_aside(self, step: int) -> None:
        source = storage.join(self.directory, str(step))
        target, n = source + SET_ASIDE_SUFFIX, 1
        while storage.exists(target):
            n += 1
            target = f"{source}{SET_ASIDE_SUFFIX}{n}"
        storage.rename(source, target)

    def close(self) -> None:
        self._manager.close()

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint found in {self.directory}")
        return step


def _one_line(error: Exception, limit: int = 200) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit] + "..."


def load_init_params(path: str, template: Any, reinit_pattern: str | None = None) -> Any:
    """Parameters to start from: the EMA parameters of the newest checkpoint under `path`.

    The paper fine-tunes from the pretrained model's EMA weights, which are the better model.

    Args:
      path: a workdir or a checkpoint folder of an earlier (e.g. pretraining) run.
      template: freshly initialised parameters of this run's model; fixes structure and shapes.
      reinit_pattern: regular expression over parameter paths; a parameter whose path matches and
        whose shape differs keeps its fresh initialisation (e.g. the class embedding when the
        number of classes changes). Every other difference is an error.

    Raises:
      FileNotFoundError: when `path` holds no checkpoint.
      ValueError: naming the first parameter that is missing, extra or of another shape.
    """
    directory = checkpoint_dir(path)
    if not storage.isdir(directory):
        raise FileNotFoundError(f"init_from={path!r}: no such directory")
    store = CheckpointStore(directory, create=False)
    try:
        state, _ = store.restore_arrays()
    finally:
        store.close()
    loaded = _flatten(state["ema_params"])
    fresh = _flatten(template)
    regex = re.compile(reinit_pattern) if reinit_pattern else None
    missing, extra, reshaped = _layout_differences(loaded, fresh)
    if extra:
        raise ValueError(f"init_from={path!r} is incompatible: it has parameter {extra[0]!r}, "
                         "which this model does not have")
    if missing:
        raise ValueError(
            f"init_from={path!r} is incompatible: parameter {missing[0]!r} is missing")
    for name in reshaped:
        if regex is None or not regex.search(name):
            raise ValueError(
                f"init_from={path!r} is incompatible: parameter {name!r} has shape "
                f"{tuple(loaded[name].shape)} there and {tuple(fresh[name].shape)} here (set "
                "init_reinit to a pattern matching it to re-initialise it instead)")
    merged = {  # a reshaped parameter left here matches init_reinit: it keeps its fresh value
        name: value if name in reshaped else jnp.asarray(loaded[name], value.dtype)
        for name, value in fresh.items()
    }
    leaves_with_path = jax.tree_util.tree_flatten_with_path(template)[0]
    treedef = jax.tree.structure(template)
    return jax.tree.unflatten(treedef, [merged[param_path(p)] for p, _ in leaves_with_path])


def _layout_differences(saved: dict[str, Any],
                        wanted: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """Compares two flattened trees (`_flatten`: path -> leaf with a `.shape`).

    Returns:
      `(only_wanted, only_saved, reshaped)`: the paths only in `wanted` (in its order), only in
      `saved` (sorted), and in both with different shapes (in `wanted`'s order). A saved leaf
      without a shape (metadata of a non-array) is not compared.
    """
    only_wanted = [name for name in wanted if name not in saved]
    only_saved = sorted(set(saved) - set(wanted))
    reshaped = [
        name for name, leaf in wanted.items()
        if name in saved and getattr(saved[name], "shape", None) is not None
        and tuple(saved[name].shape) != tuple(leaf.shape)
    ]
    return only_wanted, only_saved, reshaped


def _flatten(tree) -> dict[str, Any]:
    return {param_path(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
