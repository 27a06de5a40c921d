"""Label consistency: do class-conditional samples look like the class they were generated for?

A classifier fit on *real* training images (never on generated ones) labels each synthetic
image; the metric is the fraction whose predicted class equals the label the image was
generated for, overall and per class. Chance is about 1 / num_classes; the classifier's own
accuracy on the real test split bounds what a perfect generator could score.

This is an evaluation that reads real data: the classifier is trained on the real training
split (for a DP run, that includes the private images, without noise), so the number it gives
is not covered by the DP guarantee; publish it as you would the training logs.

Two classifiers, both cheap on a CPU:

* "logistic": multinomial logistic regression (scikit-learn, L-BFGS) on the pixels scaled to
  [0, 1]. Seconds for the 8x8 digits (about 96% real test accuracy).
* "cnn": DPDM's downstream CNN (`jaxdpdm.evaluation.classifier_training`), trained on the
  real training split with its epoch chosen on a held-out tenth of it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

LABEL_CLASSIFIERS = ("logistic", "cnn")
Split = tuple[np.ndarray, np.ndarray]  # (images uint8[N, H, W, C], labels int[N])


@dataclasses.dataclass(frozen=True)
class LabelClassifier:
    """A classifier of real images, used to read the class of synthetic ones.

    Attributes:
      kind: one of LABEL_CLASSIFIERS.
      num_classes: number of classes.
      predict: images uint8 `[N, H, W, C]` -> predicted classes int `[N]`.
      real_test_accuracy: accuracy on the real test split (None if none was given).
      num_train: real training images it was fit on.
    """
    kind: str
    num_classes: int
    predict: Callable[[np.ndarray], np.ndarray]
    real_test_accuracy: float | None
    num_train: int


def _pixels(images: np.ndarray) -> np.ndarray:
    """uint8 `[N, H, W, C]` -> float64 `[N, H * W * C]` in [0, 1]."""
    return np.asarray(images, np.float64).reshape(len(images), -1) / 255.0


def fit_label_classifier(train: Split, test: Split | None, num_classes: int, *,
                         kind: str = "logistic", epochs: int = 20,
                         seed: int = 0) -> LabelClassifier:
    """Fits a `kind` classifier on the real `train` split and scores it on the real `test` split.

    Args:
      train: real (images uint8 `[N, H, W, C]`, labels int `[N]`).
      test: real held-out split for the reported accuracy, or None.
      num_classes: number of classes (labels are in [0, num_classes)).
      kind: "logistic" or "cnn".
      epochs: training epochs of the "cnn" classifier (the logistic one runs to convergence).
      seed: seeds the classifier's training.
    """
    if kind not in LABEL_CLASSIFIERS:
        raise ValueError(f"label classifier must be one of {LABEL_CLASSIFIERS}, got {kind!r}")
    images, labels = np.asarray(train[0]), np.asarray(train[1])
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
        raise ValueError("train must be (uint8 images [N, H, W, C], labels [N])")
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(max_iter=1000, random_state=seed)
        model.fit(_pixels(images), labels)

        def predict(x: np.ndarray) -> np.ndarray:
            return model.predict(_pixels(x)).astype(np.int32)
    else:
        from jaxdpdm.evaluation import classifier_training as training

        fit_part, val_part = training.split_holdout(images, labels, 0.1, seed)
        trained = training.train_classifier(
            *fit_part, *val_part,
            training.TrainConfig(epochs=epochs, batch_size=64, augment="none", seed=seed),
            num_classes=num_classes)

        def predict(x: np.ndarray) -> np.ndarray:
            return training.predict(trained, x)

    test_accuracy = None
    if test is not None:
        test_accuracy = float(np.mean(predict(test[0]) == np.asarray(test[1])))
    return LabelClassifier(kind, num_classes, predict, test_accuracy, int(len(labels)))


def consistency(predicted: np.ndarray, generated: np.ndarray, num_classes: int) -> dict:
    """Fraction of predicted == generated labels, overall and per generated class.

    Args:
      predicted: int `[N]`, the classifier's classes.
      generated: int `[N]`, the classes the images were generated for.

    Returns:
      {"overall": float, "per_class": [float or None per class (None: no sample of it)],
       "num_per_class": [int per class], "num_samples": N}.
    """
    predicted, generated = np.asarray(predicted), np.asarray(generated)
    if predicted.shape != generated.shape or predicted.ndim != 1 or not len(generated):
        raise ValueError(f"need two non-empty label vectors of one length, got shapes "
                         f"{predicted.shape} and {generated.shape}")
    hits = predicted == generated
    counts = np.bincount(generated, minlength=num_classes)[:num_classes]
    correct = np.bincount(generated[hits], minlength=num_classes)[:num_classes]
    return {
        "overall": float(hits.mean()),
        "per_class": [float(c / n) if n else None for c, n in zip(correct, counts)],
        "num_per_class": [int(n) for n in counts], "num_samples": int(len(generated))
    }


def label_consistency(classifier: LabelClassifier, images: np.ndarray, labels: np.ndarray) -> dict:
    """The label-consistency report of synthetic `images` uint8 `[N, H, W, C]`, `labels` `[N]`.

    Returns `consistency(...)` plus the classifier's description and the note that the metric
    reads real data.
    """
    report = consistency(classifier.predict(images), labels, classifier.num_classes)
    report.update(
        classifier=classifier.kind, classifier_real_test_accuracy=classifier.real_test_accuracy,
        classifier_num_real_train=classifier.num_train, chance=1.0 / classifier.num_classes,
        reads_real_data=("the classifier is trained on the real training split (private "
                         "images included, without noise): this number is not covered by the "
                         "DP guarantee"))
    return report


def format_consistency(report: dict, class_names=None) -> str:
    """One paragraph: overall fraction, the classifier's real accuracy, per-class fractions."""
    names = class_names or [str(i) for i in range(len(report["per_class"]))]
    per_class = ", ".join(
        f"{n}: {'-' if v is None else f'{v:.2f}'}" for n, v in zip(names, report["per_class"]))
    accuracy = report["classifier_real_test_accuracy"]
    real = "" if accuracy is None else f", real test accuracy {accuracy:.4f}"
    return (f"Label consistency: {report['overall']:.4f} of {report['num_samples']} samples are "
            f"classified as the class they were generated for (chance {report['chance']:.2f}) "
            f"by a {report['classifier']} classifier of {report['classifier_num_real_train']} "
            f"real training images{real}; reads real data, not covered by DP.\n"
            f"  per class: {per_class}")


def fit_for_config(config, test_set=None, *,
                   seed: int = 0) -> tuple[LabelClassifier, tuple[str, ...]]:
    """The `config.eval.label_classifier` of the whole real training split of `config.data`.

    The whole split, public and private parts alike (`data.subset` is ignored): the more real
    images, the better the classifier.

    Args:
      test_set: the real test `ImageDataset` that scores it; default: the one `--mode=evaluate`
        uses (`experiment.real_test_spec`), or none for a splitless dataset without
        `data.test_dir` (the report then has no real test accuracy).

    Returns:
      (the classifier, the class names).
    """
    from jaxdpdm.data import load_dataset
    from jaxdpdm.evaluation.classifier_training import RECIPES
    from jaxdpdm.experiment import SPLITLESS_SOURCES, data_spec, real_test_spec

    spec = data_spec(config)
    train = load_dataset(dataclasses.replace(spec, subset="all", public_fraction=0.0))
    if test_set is None and not (config.data.name in SPLITLESS_SOURCES and
                                 config.data.test_dir is None):
        test_set = load_dataset(real_test_spec(config))
    test = None if test_set is None else (test_set.images, test_set.labels)
    epochs = config.eval.classifier_epochs or RECIPES["cnn"].epochs  # for kind "cnn"
    classifier = fit_label_classifier((train.images, train.labels), test, train.num_classes,
                                      kind=config.eval.label_classifier, epochs=epochs, seed=seed)
    return classifier, train.class_names
