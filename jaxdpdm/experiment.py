"""Builds the pieces of a run (data, UNet, schedule, loss) from a config, for every mode.

This is the one place where the ml_collections config is turned into the typed objects that the
library modules take (`DataSpec`, `UNetConfig`, `Schedule`, `TimestepDistribution`, the privacy
report's `RunSettings`), so models and the DP engine never see the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
import numpy as np

from jaxdpdm import diffusion, sampling
from jaxdpdm.data import DataSpec, ImageDataset, load_dataset
from jaxdpdm.dp.report import RunSettings
from jaxdpdm.images import to_model_range
from jaxdpdm.models import unet
from jaxdpdm.models.unet import UNetConfig

# Example keys are derived from this stream of the run's seed, so they never coincide with the
# DP noise keys (which dp_aggregate derives from the seed and the step count).
_EXAMPLE_STREAM = 0x7FFF_0001
_SAMPLE_STREAM = 0x7FFF_0002
_INIT_STREAM = 0x7FFF_0003

# Data sources without named splits: their real test set is a separate folder or file.
SPLITLESS_SOURCES = ("image_folder", "npz")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a mode needs, built once from the config.

    Attributes:
        dataset: the training data (uint8 `[N, H, W, C]`, labels `[N]`); None when sampling.
        unet_config: the model's typed config (image size, channels, classes from the data).
        schedule: the DDPM noise schedule.
        timestep_dist: the training timestep distribution.
    """
    config: Any
    dataset: ImageDataset | None
    unet_config: UNetConfig
    schedule: diffusion.Schedule
    timestep_dist: diffusion.TimestepDistribution

    @property
    def null_label(self) -> int | None:
        return self.unet_config.null_label

    def init_params(self) -> Any:
        """Fresh UNet parameters from the run's seed."""
        key = jax.random.fold_in(jax.random.key(self.config.seed), _INIT_STREAM)
        return unet.init_params(self.unet_config, key)

    def train_apply(self, params, x, t, y, rng):
        """UNet forward in training mode (dropout on). `x`: `[K, H, W, C]` -> eps `[K, H, W, C]`."""
        return unet.make_apply_fn(self.unet_config, train=True)(params, x, t, y, rng)

    def eval_apply(self, params, x, t, y):
        """Deterministic UNet forward for sampling. `x`: `[B, H, W, C]` -> eps `[B, H, W, C]`."""
        return unet.make_apply_fn(self.unet_config, train=False)(params, x, t, y, None)

    def loss_fn(self, params, example, rng) -> jax.Array:
        """Per-example diffusion loss; `example` holds one uint8 image `[H, W, C]` and its label."""
        d = self.config.diffusion
        image = to_model_range(example["image"])
        return diffusion.per_example_loss(self.train_apply, params,
                                          {"image": image, "label": example["label"]}, rng,
                                          schedule=self.schedule, timestep_dist=self.timestep_dist,
                                          augmult=d.augmult, random_flip=d.random_flip,
                                          label_dropout=d.label_dropout, null_label=self.null_label)

    def sampler(self) -> sampling.Sampler:
        """The sampler `config.sample` describes, for this model: the one factory behind the
        training-time grids and `--mode=sample`.

        Returns:
          A pure, jittable `sample(params, schedule, key, labels i32[B]) -> f32[B, H, W, C]` in
          [-1, 1] (`sampling.make_sampler`); `sampling.jit_sampler` binds it to parameters.
        """
        s, u = self.config.sample, self.unet_config
        return sampling.make_sampler(self.eval_apply, self.schedule,
                                     image_shape=(u.image_size, u.image_size,
                                                  u.in_channels), method=s.sampler,
                                     num_steps=s.ddim_steps if s.sampler == "ddim" else None,
                                     eta=s.eta, guidance_scale=s.guidance_scale,
                                     null_label=self.null_label)

    def example_key(self, step: int) -> jax.Array:
        """The key of step `step` from which every example's key is folded (by example index)."""
        root = jax.random.fold_in(jax.random.key(self.config.seed), _EXAMPLE_STREAM)
        return jax.random.fold_in(root, step)

    def sample_key(self, tag: int) -> jax.Array:
        root = jax.random.fold_in(jax.random.key(self.config.seed), _SAMPLE_STREAM)
        return jax.random.fold_in(root, tag)

    def host_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Gathers examples by dataset index.

        Returns `{"image": u8[B, H, W, C], "label": i32[B], "index": i32[B]}`; images stay uint8
        until they are on the device (a quarter of the host-to-device traffic of float32).
        """
        return {
            "image": self.dataset.images[indices],
            "label": self.dataset.labels[indices].astype(np.int32),
            "index": indices.astype(np.int32),
        }


def data_spec(config, split: str | None = None) -> DataSpec:
    """The `DataSpec` of `config.data`, or of another split of the same source.

    The public/private subset and `max_examples` select *training* examples; another split
    (the real test set of `--mode=evaluate`) is taken whole.
    """
    fields = config.data.to_dict()
    fields.pop("test_split", None)
    fields.pop("test_dir", None)
    if split is not None and split != fields["split"]:
        fields.update(split=split, subset="all", public_fraction=0.0, max_examples=None)
    if fields.get("classes") is not None:
        fields["classes"] = tuple(fields["classes"])
    return DataSpec.from_dict(fields)


def real_test_spec(config) -> DataSpec:
    """The DataSpec of the real test set that `--mode=evaluate` scores against.

    `data.test_split` of the training source, taken whole; for a source without splits
    (`SPLITLESS_SOURCES`), the folder or file `data.test_dir`.

    Raises:
      ValueError: no held-out test set is configured, or the one configured is the training
        data.
    """
    d = config.data
    if d.name in SPLITLESS_SOURCES:
        if d.test_dir is None:
            like = ("a folder laid out like"
                    if d.name == "image_folder" else "an npz file or folder like")
            raise ValueError(
                f"dataset {d.name!r} has no splits, so --mode=evaluate needs a real test set held "
                f"out from training: set data.test_dir to {like} data.data_dir ({d.data_dir}, "
                "the training data)")
        if os.path.realpath(d.test_dir) == os.path.realpath(d.data_dir):
            raise ValueError(f"data.test_dir is the training data ({d.data_dir}); the real test "
                             "set must be held out from training")
        return dataclasses.replace(data_spec(config), data_dir=d.test_dir, subset="all",
                                   public_fraction=0.0, max_examples=None, skip_corrupt=False)
    if d.test_dir is not None:
        raise ValueError(f"data.test_dir only applies to {' and '.join(SPLITLESS_SOURCES)} "
                         f"datasets; {d.name!r} has splits: set data.test_split instead")
    if d.test_split == d.split:
        raise ValueError(f"data.test_split={d.test_split!r} is the training split; the real "
                         "test set must be held out from training (e.g. 'test')")
    return data_spec(config, split=d.test_split)


def unet_config(config, num_classes: int) -> UNetConfig:
    """The UNet of `config.model` for images of `config.data` with `num_classes` classes.

    Raises:
      ValueError: for an architecture the UNet cannot build (e.g. an image size that the
        number of levels cannot halve evenly).
    """
    m = config.model
    return UNetConfig(
        image_size=config.data.image_size,
        in_channels=config.data.channels,
        base_channels=m.base_channels,
        channel_mult=tuple(m.channel_mult),
        num_res_blocks=m.num_res_blocks,
        attention_resolutions=tuple(m.attention_resolutions),
        num_heads=m.num_heads,
        dropout=m.dropout,
        num_classes=num_classes if m.class_conditional else None,
        resblock_updown=m.resblock_updown,
        dtype=m.dtype,
        conv_impl=conv_impl(config),
    )


def conv_impl(config) -> str:
    """`UNetConfig.conv_impl` of the run's training steps: `config.dp.conv_impl` in DP steps,
    XLA's own otherwise (faster for a batched gradient; benchmarks/RESULTS.md sections 10b and
    21). Values and gradients are the same for either choice; only speed and memory differ.
    """
    return config.dp.conv_impl if config.phase == "dp" else "xla"


def timestep_distribution(config) -> diffusion.TimestepDistribution:
    d = config.diffusion
    return diffusion.TimestepDistribution(
        ranges=tuple((int(lo), int(hi)) for lo, hi in d.timestep_ranges),
        weights=tuple(float(w) for w in d.timestep_weights))


def report_settings(config) -> RunSettings:
    """The settings of a DP run that `dp.report.privacy_report` states."""
    return RunSettings(expected_batch_size=config.train.batch_size, clip_norm=config.dp.clip_norm,
                       augmult=config.diffusion.augmult, trainable_pattern=config.dp.trainable,
                       init_from=config.init_from)


def build_experiment(config, dataset: ImageDataset | None = None, *,
                     num_classes: int | None = None) -> Experiment:
    """Builds the model, schedule and loss; loads the training data unless told the classes.

    Args:
      dataset: the training data, if already loaded.
      num_classes: build without data (sampling from a checkpoint) for this many classes.
    """
    if dataset is None and num_classes is None:
        dataset = load_dataset(data_spec(config))
    if dataset is not None:
        num_classes = dataset.num_classes
    schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    return Experiment(
        config=config,
        dataset=dataset,
        unet_config=unet_config(config, num_classes),
        schedule=schedule,
        timestep_dist=timestep_distribution(config),
    )


def dataset_fingerprint(config, dataset: ImageDataset) -> dict[str, Any]:
    """What identifies the training data of a run, stored with every checkpoint.

    A resumed DP run must train on the data its ledger accounts for: the selection fields of
    `config.data`, the size, the class counts and a SHA-256 over the image and label bytes (in
    dataset order, with their shapes) all have to match. JSON-serialisable.
    """
    d = config.data
    digest = hashlib.sha256()
    for array in (dataset.images, dataset.labels):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.data)
    counts = np.bincount(dataset.labels, minlength=dataset.num_classes)
    return {
        "name": d.name,
        "split": d.split,
        "subset": d.subset,
        "public_fraction": d.public_fraction,
        "split_seed": d.split_seed,
        "classes": None if d.classes is None else list(d.classes),
        "max_examples": d.max_examples,
        "num_examples": len(dataset),
        "class_counts": [int(c) for c in counts],
        "sha256": digest.hexdigest(),
    }


def fingerprint_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Names the first field in which two fingerprints differ (with both values), else None."""
    for key in current:
        if saved.get(key) != current[key]:
            return f"{key}: {saved.get(key)!r} in the checkpoint, {current[key]!r} now"
    return None
