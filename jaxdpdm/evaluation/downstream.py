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

The classifiers, their training recipes and the training loop are in
`jaxdpdm.evaluation.classifier_training`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping, Sequence

import numpy as np

from jaxdpdm.evaluation.classifier_training import (ProgressFn, Split, TrainConfig, accuracy,
                                                    check_split, split_holdout, train_classifier)

SWEEPABLE_FIELDS = ("learning_rate", "epochs", "weight_decay", "batch_size")


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
    configs = [
        dataclasses.replace(
            cfg, **{field: type(getattr(cfg, field))(value)
                    for field, value in zip(sweep, combo)})
        for combo in itertools.product(*sweep.values())
    ]
    for candidate in configs:
        candidate.validate()
    return configs


def evaluate_downstream(synthetic: Split, real_train: Split, real_test: Split, cfg: TrainConfig, *,
                        sweep: Mapping[str, Sequence] | None = None, num_classes: int | None = None,
                        real_reference: bool = True, public: Split | None = None,
                        public_mix: bool = True, progress: ProgressFn | None = None) -> dict:
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
    checked = [check_split(*split, name) for split, name in sets]
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

    def fit_and_test(fit: Split, val: Split, recipe: TrainConfig, val_name: str, run: str) -> dict:
        """`recipe` trained on `fit`, its epoch chosen on `val`, scored on the test set."""
        trained = train_classifier(*fit, *val, recipe, num_classes=num_classes,
                                   progress=tagged(run))
        return {
            "selected_epoch": trained.best_epoch, f"{val_name}_accuracy": trained.best_val_accuracy,
            "test_accuracy": accuracy(trained, test_images, test_labels, recipe.eval_batch_size),
            f"{val_name}_accuracy_by_epoch": list(trained.val_accuracy_by_epoch),
            "num_train": len(fit[1]), f"num_{val_name}": len(val[1])
        }

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
    table = {
        "candidates": rows, "chosen_by_synthetic_val": by_synthetic, "chosen_by_real_val": by_real,
        "test_accuracy_chosen_by_synthetic_val": chosen["test_accuracy"],
        "test_accuracy_chosen_by_real_val": rows[by_real]["test_accuracy_real_val_selected"]
    }

    reference = None
    if real_reference:
        reference = fit_and_test(real_fit, real_val, cfg, "real_val", "real_reference")
    sizes = {
        "synthetic_train": len(synthetic_fit[1]), "synthetic_val": len(synthetic_val[1]),
        "real_train": len(real_fit[1]), "real_val": len(real_val[1]), "real_test": len(test_labels)
    }

    public_report = None
    if public is not None:
        by_public = int(np.argmax([row["real_public_accuracy"] for row in rows]))
        table.update(chosen_by_real_public=by_public,
                     test_accuracy_chosen_by_real_public=rows[by_public]["test_accuracy"])
        public_report = {
            "num_public": len(public[1]), "public_only": None, "public_plus_synthetic": None
        }
        sizes["public"] = len(public[1])
        if public_mix:
            public_fit, public_val = split_holdout(*public, cfg.val_fraction, cfg.seed)
            public_report["public_only"] = fit_and_test(public_fit, public_val, cfg, "public_val",
                                                        "public_only")
            mixed = [np.concatenate(parts) for parts in zip(synthetic_fit, public_fit)]
            mixed_val = [np.concatenate(parts) for parts in zip(synthetic_val, public_val)]
            public_report["public_plus_synthetic"] = fit_and_test(mixed, mixed_val,
                                                                  candidates[by_synthetic],
                                                                  "mixed_val",
                                                                  "public_plus_synthetic")
    return {
        "synthetic_to_real_test_accuracy": chosen["test_accuracy"],
        "real_to_real_test_accuracy": None if reference is None else reference["test_accuracy"],
        "synthetic_to_real_public_accuracy": chosen.get("real_public_accuracy"),
        "public_to_real_test_accuracy": _test_accuracy(public_report, "public_only"),
        "public_plus_synthetic_to_real_test_accuracy": _test_accuracy(public_report,
                                                                      "public_plus_synthetic"),
        "selected": {
            "hyperparameters": chosen["hyperparameters"], "epoch": chosen["selected_epoch"],
            "synthetic_val_accuracy": chosen["synthetic_val_accuracy"]
        },
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
