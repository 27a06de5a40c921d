"""Downstream evaluation: train a classifier on synthetic images, test it on real ones.

The protocol of Ghalebikesabi et al. (2023) and DPDM: a classifier (`models.classifiers`)
is trained non-privately on synthetic data only; its epoch and, optionally, its
hyperparameters are chosen on a held-out *synthetic* validation split; its accuracy is
reported on the real test set. The same classifier trained on the real training data gives
the real-data reference accuracy. The real test set is never used to choose anything.

When the data was split into a public and a private part, the real public images give three
more numbers: the synthetic-only classifier scored on them (a selection metric: public data may
choose hyperparameters, the test set and private data may not), and the test accuracy of the
classifier trained on the public images alone and on the public images plus the synthetic set
(what a practitioner holding public data would compare and use).

Conventions: images are uint8 [N, H, W, C] on the host and become float32 in [-1, 1] on the
device (as for the diffusion models); labels are int [N]. One train step and one eval step
are jitted and cached per (model, classes, optimizer, augmentation), so a hyperparameter
sweep and the real-data reference reuse the same compiled code (one compile per shape).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdpdm.models.classifiers import CLASSIFIER_NAMES, classifier_for, init_classifier

AUGMENTATIONS = ("none", "mnist", "cifar")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
SWEEPABLE_FIELDS = ("learning_rate", "epochs", "weight_decay", "batch_size")

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
    _check_split(images, labels, "images")
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


def _to_model_input(images_u8: jax.Array) -> jax.Array:
    """uint8[..., H, W, C] -> float32 in [-1, 1] (conversion on device: 4x less transfer)."""
    return images_u8.astype(jnp.float32) / 127.5 - 1.0


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

    def step(params, opt_state, images_u8, labels, indices, step_key, learning_rate,
             weight_decay):
        augment_key, dropout_key = jax.random.split(step_key)
        images = augment_images(_to_model_input(images_u8), indices, augment_key,
                                kind=augment, crop_padding=crop_padding)

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
    return jax.jit(lambda params, images_u8: jnp.argmax(module.apply(
        {"params": params}, _to_model_input(images_u8), train=False), axis=-1))


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
    images, labels = _check_split(images, labels, "images")
    return float(np.mean(predict(trained, images, batch_size) == labels))


def train_classifier(train_images: np.ndarray, train_labels: np.ndarray,
                     val_images: np.ndarray, val_labels: np.ndarray, cfg: TrainConfig, *,
                     num_classes: int | None = None,
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
    sets = {"train": (train_images, train_labels), "val": (val_images, val_labels),
            **(monitor_sets or {})}
    sets = {name: _check_split(*split, f"{name} set") for name, split in sets.items()}
    num_classes = num_classes or int(max(sets["train"][1].max(), sets["val"][1].max())) + 1
    for name, split in sets.items():
        _check_split(*split, f"{name} set", num_classes)
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
            params, opt_state, loss = step_fn(
                params, opt_state, train_images[indices], train_labels[indices],
                indices.astype(np.int32), jax.random.fold_in(train_key, step),
                np.float32(_learning_rate(cfg, step, total_steps)), np.float32(cfg.weight_decay))
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

    selections = {name: TrainedClassifier(cfg.model, num_classes, best[name][2], best[name][1],
                                          tuple(history[name]), tuple(train_losses), {})
                  for name in sets}
    return dataclasses.replace(selections.pop("val"), monitored=selections)


def _learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Host-side schedule: constant, or cosine decay from cfg.learning_rate to 0."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    return 0.5 * cfg.learning_rate * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def sweep_configs(cfg: TrainConfig, sweep: Mapping[str, Sequence] | None) -> list[TrainConfig]:
    """The grid of configs `cfg` with every combination of the `sweep` values.

    sweep: field -> candidate values, fields from SWEEPABLE_FIELDS, e.g.
      {"learning_rate": [1e-3, 3e-4], "epochs": [20, 50]}. None or {} gives [cfg].
    Changing batch_size changes the compiled shape: one more compile per value.
    """
    sweep = dict(sweep or {})
    for field, values in sweep.items():
        if field not in SWEEPABLE_FIELDS:
            raise ValueError(f"cannot sweep {field!r}; sweepable fields: {SWEEPABLE_FIELDS}")
        if isinstance(values, (str, bytes)) or len(values) == 0:
            raise ValueError(f"sweep[{field!r}] must be a non-empty sequence; got {values!r}")
    # Cast to the field's type so numpy scalars from a grid stay JSON-serialisable.
    configs = [dataclasses.replace(cfg, **{field: type(getattr(cfg, field))(value)
                                           for field, value in zip(sweep, combo)})
               for combo in itertools.product(*sweep.values())]
    for candidate in configs:
        candidate.validate()
    return configs


def evaluate_downstream(synthetic: Split, real_train: Split, real_test: Split,
                        cfg: TrainConfig, *, sweep: Mapping[str, Sequence] | None = None,
                        num_classes: int | None = None, real_reference: bool = True,
                        public: Split | None = None, public_mix: bool = True,
                        progress: ProgressFn | None = None) -> dict:
    """Synthetic-to-real and real-to-real downstream accuracy; a JSON-serialisable dict.

    Each candidate of `sweep_configs(cfg, sweep)` is trained on the synthetic data minus a
    stratified synthetic validation split (cfg.val_fraction), which picks its epoch and
    then the candidate (the paper tunes on synthetic data). For comparison only, every
    candidate is also scored on a real validation split held out from `real_train` (never
    the test set), which makes its own epoch and candidate choice. The real reference is
    `cfg` trained on the rest of `real_train`, its epoch chosen on that real validation split.

    With `public` (the real images of the non-private part of a public/private split):
    * every candidate is also scored on all of `public` after each epoch ("synthetic -> real
      public"); this reads no test and no private image, so, unlike the real validation split
      of a DP run, it may choose hyperparameters (`sweep["chosen_by_real_public"]`). Scoring
      changes no training: the synthetic-only numbers are those of a call without `public`.
    * with `public_mix`, two more classifiers, both with the same stratified holdout fraction
      and seed as the synthetic one and never selected on the test set: `cfg` trained on
      `public` alone (epoch chosen on a holdout of `public`), and the chosen candidate trained
      on `public` + synthetic (epoch chosen on the synthetic validation split above together
      with that holdout of `public`).

    Args:
      synthetic, real_train, real_test: (images uint8[N, H, W, C], labels int[N]) each.
      cfg: base recipe.  sweep: see `sweep_configs`.
      num_classes: default: max label over all sets + 1.
      real_reference: whether to train the real-data reference (costs one more training).
      public: (images uint8[P, H, W, C], labels int[P]) or None.
      public_mix: with `public`, train the public-only and public + synthetic classifiers.
      progress: progress(epoch, metrics) with metrics["run"] naming the training run.
    Returns:
      {"synthetic_to_real_test_accuracy", "real_to_real_test_accuracy" (None without the
      reference), "synthetic_to_real_public_accuracy", "public_to_real_test_accuracy",
      "public_plus_synthetic_to_real_test_accuracy" (None without `public` / `public_mix`),
      "selected": {hyperparameters, epoch, synthetic_val_accuracy},
      "real_reference": {...} | None, "public": {...} | None, "sweep": {"candidates": [...],
      "chosen_by_synthetic_val", "chosen_by_real_val", "chosen_by_real_public", test
      accuracies of the choices}, "num_classes", "num_examples", "config" (`cfg`, the recipe
      the runs used, as a dict)}.
    """
    cfg.validate()
    sets = [(synthetic, "synthetic"), (real_train, "real_train"), (real_test, "real_test")]
    if public is not None:
        sets.append((public, "public"))
    checked = [_check_split(*split, name) for split, name in sets]
    synthetic, real_train, real_test = checked[:3]
    public = checked[3] if public is not None else None
    for images, name in ((real_train[0], "real_train"), (real_test[0], "real_test"),
                         *([(public[0], "public")] if public is not None else [])):
        if images.shape[1:] != synthetic[0].shape[1:]:
            raise ValueError(f"{name} images have shape {images.shape[1:]}, the synthetic ones "
                             f"{synthetic[0].shape[1:]}")
    if num_classes is None:
        num_classes = int(max(s[1].max() for s in checked)) + 1
    candidates = sweep_configs(cfg, sweep)
    synthetic_fit, synthetic_val = split_holdout(*synthetic, cfg.val_fraction, cfg.seed)
    real_fit, real_val = split_holdout(*real_train, cfg.val_fraction, cfg.seed)
    test_images, test_labels = real_test
    monitor = {"real_val": real_val, **({"real_public": public} if public is not None else {})}

    def tagged(run: str) -> ProgressFn | None:  # adds metrics["run"] = run
        return progress and (lambda epoch, metrics: progress(epoch, {"run": run, **metrics}))

    def fit_and_test(fit: Split, val: Split, recipe: TrainConfig, val_name: str,
                     run: str) -> dict:
        """`recipe` trained on `fit`, its epoch chosen on `val`, scored on the test set."""
        trained = train_classifier(*fit, *val, recipe, num_classes=num_classes,
                                   progress=tagged(run))
        return {"selected_epoch": trained.best_epoch,
                f"{val_name}_accuracy": trained.best_val_accuracy,
                "test_accuracy": accuracy(trained, test_images, test_labels,
                                          recipe.eval_batch_size),
                f"{val_name}_accuracy_by_epoch": list(trained.val_accuracy_by_epoch),
                "num_train": len(fit[1]), f"num_{val_name}": len(val[1])}

    rows = []
    for number, candidate in enumerate(candidates):
        hyperparameters = {f: getattr(candidate, f) for f in SWEEPABLE_FIELDS}
        trained = train_classifier(*synthetic_fit, *synthetic_val, candidate,
                                   num_classes=num_classes, monitor_sets=monitor,
                                   progress=tagged(f"synthetic[{number}] {hyperparameters}"))
        by_real = trained.monitored["real_val"]
        # Every candidate's test accuracy is for the report only: no choice reads it.
        row = {
            "hyperparameters": hyperparameters,
            "selected_epoch": trained.best_epoch,
            "synthetic_val_accuracy": trained.best_val_accuracy,
            "test_accuracy": accuracy(trained, test_images, test_labels, cfg.eval_batch_size),
            "real_val_selected_epoch": by_real.best_epoch,
            "real_val_accuracy": by_real.best_val_accuracy,
            "test_accuracy_real_val_selected": accuracy(by_real, test_images, test_labels,
                                                        cfg.eval_batch_size),
            "synthetic_val_accuracy_by_epoch": list(trained.val_accuracy_by_epoch),
            "real_val_accuracy_by_epoch": list(by_real.val_accuracy_by_epoch),
            "train_loss_by_epoch": list(trained.train_loss_by_epoch),
        }
        if public is not None:  # at the epoch the synthetic validation split chose
            curve = trained.monitored["real_public"].val_accuracy_by_epoch
            row["real_public_accuracy"] = curve[trained.best_epoch - 1]
            row["real_public_accuracy_by_epoch"] = list(curve)
        rows.append(row)
    by_synthetic = int(np.argmax([row["synthetic_val_accuracy"] for row in rows]))
    by_real = int(np.argmax([row["real_val_accuracy"] for row in rows]))
    chosen = rows[by_synthetic]
    table = {"candidates": rows, "chosen_by_synthetic_val": by_synthetic,
             "chosen_by_real_val": by_real,
             "test_accuracy_chosen_by_synthetic_val": chosen["test_accuracy"],
             "test_accuracy_chosen_by_real_val": rows[by_real]["test_accuracy_real_val_selected"]}

    reference = None
    if real_reference:
        reference = fit_and_test(real_fit, real_val, cfg, "real_val", "real_reference")
    sizes = {"synthetic_train": len(synthetic_fit[1]), "synthetic_val": len(synthetic_val[1]),
             "real_train": len(real_fit[1]), "real_val": len(real_val[1]),
             "real_test": len(test_labels)}

    public_report = None
    if public is not None:
        by_public = int(np.argmax([row["real_public_accuracy"] for row in rows]))
        table.update(chosen_by_real_public=by_public,
                     test_accuracy_chosen_by_real_public=rows[by_public]["test_accuracy"])
        public_report = {"num_public": len(public[1]), "public_only": None,
                         "public_plus_synthetic": None}
        sizes["public"] = len(public[1])
        if public_mix:
            public_fit, public_val = split_holdout(*public, cfg.val_fraction, cfg.seed)
            public_report["public_only"] = fit_and_test(public_fit, public_val, cfg,
                                                        "public_val", "public_only")
            mixed = [np.concatenate(parts) for parts in zip(synthetic_fit, public_fit)]
            mixed_val = [np.concatenate(parts) for parts in zip(synthetic_val, public_val)]
            public_report["public_plus_synthetic"] = fit_and_test(
                mixed, mixed_val, candidates[by_synthetic], "mixed_val", "public_plus_synthetic")
    return {
        "synthetic_to_real_test_accuracy": chosen["test_accuracy"],
        "real_to_real_test_accuracy": None if reference is None else reference["test_accuracy"],
        "synthetic_to_real_public_accuracy": chosen.get("real_public_accuracy"),
        "public_to_real_test_accuracy": _test_accuracy(public_report, "public_only"),
        "public_plus_synthetic_to_real_test_accuracy": _test_accuracy(
            public_report, "public_plus_synthetic"),
        "selected": {"hyperparameters": chosen["hyperparameters"], "epoch": chosen[
            "selected_epoch"], "synthetic_val_accuracy": chosen["synthetic_val_accuracy"]},
        "real_reference": reference,
        "public": public_report,
        "sweep": table,
        "num_classes": num_classes,
        "num_examples": sizes,
        "config": dataclasses.asdict(cfg),
    }


def _test_accuracy(public_report: dict | None, run: str) -> float | None:
    """The test accuracy of `public_report[run]`, or None when that run did not happen."""
    result = (public_report or {}).get(run)
    return None if result is None else result["test_accuracy"]


def _check_split(images: np.ndarray, labels, name: str, num_classes: int | None = None) -> Split:
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
