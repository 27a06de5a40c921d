"""Label consistency: exact fractions, a classifier of real digits, the report's wording."""

import numpy as np
import pytest

from jaxdpdm.data import DataSpec, load_dataset
from jaxdpdm.evaluation import label_consistency as lc


def test_consistency_counts_per_generated_class():
    generated = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 0, 1, 1, 0, 2])
    report = lc.consistency(predicted, generated, num_classes=4)
    assert report["overall"] == pytest.approx(4 / 6)
    assert report["per_class"] == [pytest.approx(2 / 3), 0.5, 1.0, None]
    assert report["num_per_class"] == [3, 2, 1, 0]
    assert report["num_samples"] == 6


def test_consistency_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="one length"):
        lc.consistency(np.zeros(3, int), np.zeros(4, int), num_classes=2)


@pytest.fixture(scope="module")
def digits():
    train = load_dataset(DataSpec("digits", 8, 1, split="train"))
    test = load_dataset(DataSpec("digits", 8, 1, split="test"))
    return train, test


def test_logistic_classifier_of_real_digits_reads_real_labels_not_wrong_ones(digits):
    train, test = digits
    classifier = lc.fit_label_classifier((train.images, train.labels), (test.images, test.labels),
                                         10, kind="logistic")
    assert classifier.real_test_accuracy > 0.9 and classifier.num_train == len(train)
    # Real test images "generated" for their true class are consistent as often as the
    # classifier is right; the same images with shifted labels almost never are.
    right = lc.label_consistency(classifier, test.images, test.labels)
    wrong = lc.label_consistency(classifier, test.images, (test.labels + 1) % 10)
    assert right["overall"] == pytest.approx(classifier.real_test_accuracy)
    assert wrong["overall"] < 0.1
    assert min(v for v in right["per_class"]) > 0.7
    assert "not covered by the DP guarantee" in right["reads_real_data"]
    text = lc.format_consistency(right)
    assert f"{right['overall']:.4f} of {len(test)} samples" in text
    assert "reads real data" in text and "per class: 0:" in text


def test_cnn_classifier_trains_on_real_images(digits):
    train, test = digits
    classifier = lc.fit_label_classifier((train.images, train.labels), (test.images, test.labels),
                                         10, kind="cnn", epochs=3)
    assert classifier.kind == "cnn" and classifier.real_test_accuracy > 0.5
    assert classifier.predict(test.images[:7]).shape == (7,)


def test_unknown_classifier_is_refused(digits):
    train, _ = digits
    with pytest.raises(ValueError, match="must be one of"):
        lc.fit_label_classifier((train.images, train.labels), None, 10, kind="svm")
