"""Training and scoring one downstream image classifier (`models.classifiers`).

`RECIPES` holds one training recipe (`TrainConfig`) per classifier; `train_classifier` trains
one and keeps the parameters of its best epoch on a validation set; `predict` and `accuracy`
score it. `jaxdpdm.evaluation.downstream` runs the evaluation protocol with these pieces.

Conventions: images are uint8 [N, H, W, C] on the host and become float32 in [-1, 1] on the
device (as for the diffusion models); labels are int [N]. One train step and one eval step
are jitted and cached per (model, classes, optimizer, augmentation), so a hyperparameter
sweep and the real-data reference reuse the same compiled code (one compile per shape).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdpdm.images import to_model_range
from jaxdpdm.models.classifiers import CLASSIFIER_NAMES, classifier_for, init_classifier

AUGMENTATIONS = ("none", "mnist", "cifar")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")

ProgressFn = Callable[[int, dict], None]
Split = tuple[np.ndarray, np.ndarray]  # (images uint8[N, H, W, C], labels int[N])


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train one downstream classifier. Defaults are DPDM's CNN recipe (`RECIPES`).

    Attributes:
      model: "cnn" (DPDM's CNN) or "wrn16_4".
      epochs: passes over the training split; the best epoch on validation is kept.
      batch_size: training batch; the last partial batch of each shuffled epoch is dropped
        (one compiled shape; a non-private classifier loses nothing by it).
      learning_rate: peak step size.
      weight_decay: decoupled (AdamW-style) for "adam", L2 added to the gradient for "sgd".
      optimizer: "adam" or "sgd" (Nesterov momentum 0.9, the usual WRN recipe).
      lr_schedule: "constant" or "cosine" (decay to 0 over all training steps).
      augment: "none"; "mnist" = random shift (crop of the image padded by `crop_padding`),
        no flip; "cifar" = the same crop plus a random horizontal flip.
      crop_padding: pixels of black padding for the random crop (2 for MNIST, 4 for CIFAR).
      val_fraction: fraction of a training set held out (stratified) for validation.
      eval_batch_size: batch for evaluation; the last batch is padded, not dropped.
      seed: seeds parameter init, shuffling, augmentation, dropout and the splits.
    """

    model: str = "cnn"
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    optimizer: str = "adam"
    lr_schedule: str = "constant"
    augment: str = "mnist"
    crop_padding: int = 2
    val_fraction: float = 0.1
    eval_batch_size: int = 512
    seed: int = 0

    def validate(self) -> None:
        """Raises ValueError for an unusable configuration."""
        for field, allowed in (("model", CLASSIFIER_NAMES), ("optimizer", OPTIMIZERS),
                               ("lr_schedule", LR_SCHEDULES), ("augment", AUGMENTATIONS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}; got {getattr(self, field)!r}")
        for field in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1; got {getattr(self, field)}")
        if not self.learning_rate > 0 or self.weight_decay < 0 or self.crop_padding < 0:
            raise ValueError("need learning_rate > 0, weight_decay >= 0 and crop_padding >= 0; "
                             f"got {self.learning_rate}, {self.weight_decay}, {self.crop_padding}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1); got {self.val_fraction}")


# One recipe per classifier. "cnn": DPDM's protocol for (Fashion-)MNIST (Adam 3e-4, constant,
# batch 64, 20 epochs, random shifts of up to 2 pixels). "wrn16_4": the usual CIFAR recipe
# (SGD with Nesterov momentum 0.9 at 0.1, cosine decay to 0, L2 5e-4, batch 128, 50 epochs,
# 4-pixel random crops and horizontal flips).
RECIPES = {
    "cnn": TrainConfig(),
    "wrn16_4": TrainConfig(model="wrn16_4", epochs=50, batch_size=128, learning_rate=0.1,
                           weight_decay=5e-4, optimizer="sgd", lr_schedule="cosine",
                           augment="cifar", crop_padding=4),
}


def recipe(model: str, **overrides) -> TrainConfig:
    """The training recipe of classifier `model` (`RECIPES`), with `overrides` of its fields.

    Raises:
      ValueError: an unknown model or field, or a value `TrainConfig.validate` refuses.
    """
    if model not in RECIPES:
        raise ValueError(f"no training recipe for classifier {model!r}; known: {sorted(RECIPES)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise ValueError(f"TrainConfig has no fields {unknown}")
    chosen = dataclasses.replace(RECIPES[model], **overrides)
    chosen.validate()
    return chosen


@dataclasses.dataclass(frozen=True)
class TrainedClassifier:
    """A classifier trained by `train_classifier`.

    Attributes:
      model: classifier name ("cnn" | "wrn16_4").
      num_classes: number of logits.
      params: parameters of the epoch with the best accuracy on the validation set.
      best_epoch: that epoch (1-based).
      val_accuracy_by_epoch: validation accuracy after each epoch.
      train_loss_by_epoch: mean training cross-entropy of each epoch.
      monitored: for each extra set passed as `monitor_sets`, the classifier that set would
        have selected (its params, best epoch and accuracy curve as `val_*`); for
        comparison only: monitored sets never change `params`.
    """

    model: str
    num_classes: int
    params: Any
    best_epoch: int
    val_accuracy_by_epoch: tuple[float, ...]
    train_loss_by_epoch: tuple[float, ...]
    monitored: dict[str, "TrainedClassifier"]

    @property
    def best_val_accuracy(self) -> float:
        return self.val_accuracy_by_epoch[self.best_epoch - 1]


def split_holdout(images: np.ndarray, labels: np.ndarray, fraction: float,
                  seed: int) -> tuple[Split, Split]:
    """Stratified seeded split of images uint8[N, H, W, C], labels int[N] into
    ((images, labels) kept, (images, labels) held out), both in input order.

    Each class contributes round(fraction * its count) examples to the held-out part (at
    least one example overall), so a small validation split still covers the classes.
    """
    check_split(images, labels, "images")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1); got {fraction}")
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held[members[:int(round(fraction * len(members)))]] = True
    if not held.any():
        held[rng.integers(len(labels))] = True
    if held.all():
        raise ValueError(f"{len(labels)} examples are too few to hold out {fraction:.0%}")
    return (images[~held], labels[~held]), (images[held], labels[held])


@functools.partial(jax.jit, static_argnames=("kind", "crop_padding"))
def augment_images(images: jax.Array, indices: jax.Array, key: jax.Array, *, kind: str,
                   crop_padding: int) -> jax.Array:
    """Per-example random crop (and flip for "cifar") of images f32[B, H, W, C] in [-1, 1].

    Example b uses the key fold_in(key, indices[b]), so its augmentation depends on its
    dataset index and the step, not on its position in the batch. Padding is -1 (black).
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"kind must be one of {AUGMENTATIONS}; got {kind!r}")
    if kind == "none":
        return images
    height, width, channels = images.shape[1:]
    pad = crop_padding

    def augment_one(image, index):
        crop_key, flip_key = jax.random.split(jax.random.fold_in(key, index))
        padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=-1.0)
        offset = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
        image = jax.lax.dynamic_slice(padded, (offset[0], offset[1], 0), (height, width, channels))
        if kind == "cifar":
            image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1], image)
        return image

    return jax.vmap(augment_one)(images, indices)


@functools.lru_cache(maxsize=None)
def _compiled_train_step(model: str, num_classes: int, optimizer: str, augment: str,
                         crop_padding: int):
    """Jitted step(params, opt_state, images u8[B,H,W,C], labels i32[B], indices i32[B],
    step_key, learning_rate f32[], weight_decay f32[]) -> (params, opt_state, loss f32[]).

    Learning rate and weight decay are arguments, not constants, so a sweep over them and
    any host-side schedule reuse one compiled function.
    """
    module = classifier_for(model, num_classes)
    direction = _update_direction(optimizer)

    def step(params, opt_state, images_u8, labels, indices, step_key, learning_rate, weight_decay):
        augment_key, dropout_key = jax.random.split(step_key)
        images = augment_images(to_model_range(images_u8), indices, augment_key, kind=augment,
                                crop_padding=crop_padding)

        def loss_fn(p):
            logits = module.apply({"params": p}, images, train=True, rngs={"dropout": dropout_key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        decay = lambda tree: jax.tree.map(lambda g, p: g + weight_decay * p, tree, params)
        if optimizer == "sgd":  # classic L2: the decay goes through the momentum
            grads = decay(grads)
        updates, opt_state = direction.update(grads, opt_state, params)
        if optimizer == "adam":  # decoupled weight decay (AdamW)
            updates = decay(updates)
        params = jax.tree.map(lambda p, u: p - learning_rate * u, params, updates)
        return params, opt_state, loss

    return jax.jit(step)


def _update_direction(optimizer: str) -> optax.GradientTransformation:
    """The optimizer without its step size: the caller scales by the learning rate."""
    if optimizer == "adam":
        return optax.scale_by_adam()
    return optax.trace(decay=0.9, nesterov=True)


@functools.lru_cache(maxsize=None)
def _compiled_predict(model: str, num_classes: int):
    """Jitted predict(params, images u8[B, H, W, C]) -> i32[B] argmax class (eval mode)."""
    module = classifier_for(model, num_classes)
    return jax.jit(lambda params, images_u8: jnp.argmax(
        module.apply({"params": params}, to_model_range(images_u8), train=False), axis=-1))


def predict(trained: TrainedClassifier, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Predicted classes int32[N] for images uint8[N, H, W, C].

    Batches have one fixed shape: the last one is padded with zeros and the padding's
    predictions are discarded, so every example counts once and nothing recompiles.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    predict_fn = _compiled_predict(trained.model, trained.num_classes)
    predictions = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        padded = np.zeros((batch_size, *images.shape[1:]), np.uint8)
        padded[:len(batch)] = batch
        predictions.append(np.asarray(predict_fn(trained.params, padded))[:len(batch)])
    return np.concatenate(predictions).astype(np.int32) if predictions else np.zeros(0, np.int32)


def accuracy(trained: TrainedClassifier, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 512) -> float:
    """Fraction of images uint8[N, H, W, C] whose predicted class equals labels int[N]."""
    images, labels = check_split(images, labels, "images")
    return float(np.mean(predict(trained, images, batch_size) == labels))


def train_classifier(train_images: np.ndarray, train_labels: np.ndarray, val_images: np.ndarray,
                     val_labels: np.ndarray, cfg: TrainConfig, *, num_classes: int | None = None,
                     monitor_sets: Mapping[str, Split] | None = None,
                     progress: ProgressFn | None = None) -> TrainedClassifier:
    """Trains `cfg.model` and keeps the params of its best epoch on the validation set.

    Args:
      train_images: uint8[N, H, W, C].  train_labels: int[N].
      val_images: uint8[M, H, W, C].  val_labels: int[M]; chooses the returned epoch.
      cfg: the training recipe.
      num_classes: number of logits; default max label (train and val) + 1.
      monitor_sets: name -> (images, labels) scored after every epoch too; each gets its
        own best-epoch selection in `.monitored`, but they never influence `.params`.
      progress: called as progress(epoch, metrics) after each epoch (1-based), metrics =
        {"train_loss", "val_accuracy", "<name>_accuracy" per monitor set, "epochs"}.
    """
    cfg.validate()
    if {"train", "val"} & set(monitor_sets or {}):
        raise ValueError('monitor_sets may not be named "train" or "val"')
    sets = {
        "train": (train_images, train_labels), "val": (val_images, val_labels),
        **(monitor_sets or {})
    }
    sets = {name: check_split(*split, f"{name} set") for name, split in sets.items()}
    num_classes = num_classes or int(max(sets["train"][1].max(), sets["val"][1].max())) + 1
    for name, split in sets.items():
        check_split(*split, f"{name} set", num_classes)
    train_labels = sets.pop("train")[1].astype(np.int32)

    init_key, train_key = jax.random.split(jax.random.key(cfg.seed))
    module = classifier_for(cfg.model, num_classes)
    params = init_classifier(module, init_key, train_images.shape[1:])
    opt_state = _update_direction(cfg.optimizer).init(params)
    step_fn = _compiled_train_step(cfg.model, num_classes, cfg.optimizer, cfg.augment,
                                   cfg.crop_padding)
    batch_size = min(cfg.batch_size, len(train_labels))
    steps_per_epoch = len(train_labels) // batch_size
    total_steps = steps_per_epoch * cfg.epochs

    best = {name: (-1.0, 0, params) for name in sets}  # (accuracy, epoch, params)
    history: dict[str, list[float]] = {name: [] for name in sets}
    train_losses = []
    for epoch in range(1, cfg.epochs + 1):
        # Seeded by (seed, epoch) so any epoch's order is reproducible on its own.
        order = np.random.default_rng((cfg.seed, epoch)).permutation(len(train_labels))
        losses = []
        for step_in_epoch in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + step_in_epoch
            indices = order[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size]
            params, opt_state, loss = step_fn(params, opt_state, train_images[indices],
                                              train_labels[indices], indices.astype(np.int32),
                                              jax.random.fold_in(train_key, step),
                                              np.float32(_learning_rate(cfg, step, total_steps)),
                                              np.float32(cfg.weight_decay))
            losses.append(loss)
        train_losses.append(float(jnp.mean(jnp.stack(losses))))
        probe = TrainedClassifier(cfg.model, num_classes, params, epoch, (), (), {})
        metrics = {"train_loss": train_losses[-1], "epochs": cfg.epochs}
        for name, (images, labels) in sets.items():
            score = accuracy(probe, images, labels, cfg.eval_batch_size)
            history[name].append(score)
            metrics[f"{name}_accuracy"] = score
            if score > best[name][0]:  # strict: the earliest epoch wins ties
                # No buffer donation anywhere, so keeping a reference keeps these params.
                best[name] = (score, epoch, params)
        if progress is not None:
            progress(epoch, metrics)

    selections = {
        name: TrainedClassifier(cfg.model, num_classes, best[name][2], best[name][1],
                                tuple(history[name]), tuple(train_losses), {}) for name in sets
    }
    return dataclasses.replace(selections.pop("val"), monitored=selections)


def _learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Host-side schedule: constant, or cosine decay from cfg.learning_rate to 0."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    return 0.5 * cfg.learning_rate * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def check_split(images: np.ndarray, labels, name: str, num_classes: int | None = None) -> Split:
    """(images, labels as numpy) after checking: images uint8[N, H, W, C], N >= 1, labels
    int[N], in [0, num_classes) when num_classes is given; else raises ValueError."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{name} must be a uint8 numpy array [N, H, W, C]; got "
                         f"{getattr(images, 'dtype', type(images))} {np.shape(images)}")
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: labels must be int [{len(images)}]; got "
                         f"{labels.dtype} {labels.shape}")
    if len(images) == 0:
        raise ValueError(f"{name} is empty")
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name}: labels must lie in [0, {num_classes}); "
                         f"got {labels.min()}..{labels.max()}")
    return images, labels
