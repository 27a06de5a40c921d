"""Tests for jaxdpdm/evaluation/downstream.py (the evaluation protocol) on the 8x8 digits."""

import json

import numpy as np
import pytest

from jaxdpdm.evaluation import downstream
from jaxdpdm.evaluation.classifier_training import TrainConfig, split_holdout
from jaxdpdm.evaluation.downstream import evaluate_downstream, sweep_configs

# Batch and eval batch as in test_classifier_training.py: the same compiled steps.
CFG = TrainConfig(model="cnn", epochs=3, batch_size=32, learning_rate=3e-3, augment="mnist",
                  crop_padding=1, val_fraction=0.2, eval_batch_size=128, seed=0)


def test_evaluate_downstream_is_json_and_never_selects_on_the_test_set(shuffled_digits):
    images, labels = shuffled_digits
    # "Synthetic" stand-in: real digits with 20% of labels shuffled, disjoint from the rest.
    noisy = labels[:500].copy()
    flip = np.random.default_rng(1).random(500) < 0.2
    noisy[flip] = np.random.default_rng(2).permutation(noisy[flip])
    synthetic, real_train = (images[:500], noisy), (images[500:1100], labels[500:1100])
    test = (images[1100:1400], labels[1100:1400])
    sweep = {"learning_rate": [3e-3, 3e-4]}
    cfg = CFG
    seen = []
    report = evaluate_downstream(synthetic, real_train, test, cfg, sweep=sweep,
                                 progress=lambda epoch, m: seen.append((m["run"], epoch)))
    json.dumps(report)
    assert 0.0 <= report["synthetic_to_real_test_accuracy"] <= 1.0
    # Measured 0.66 (45 steps on ~480 digits); chance is 0.1.
    assert report["real_to_real_test_accuracy"] > 0.3
    table = report["sweep"]
    assert len(table["candidates"]) == 2 and len(seen) == 3 * 3
    synthetic_val = [row["synthetic_val_accuracy"] for row in table["candidates"]]
    assert table["chosen_by_synthetic_val"] == int(np.argmax(synthetic_val))
    assert report["selected"]["hyperparameters"]["learning_rate"] == (
        sweep["learning_rate"][table["chosen_by_synthetic_val"]])
    sizes = report["num_examples"]
    assert sizes["synthetic_train"] + sizes["synthetic_val"] == 500
    assert sizes["real_train"] + sizes["real_val"] == 600 and sizes["real_test"] == 300
    assert abs(sizes["synthetic_val"] - 100) <= 5  # stratified: rounded per class

    # Scrambled test labels change the test accuracies and nothing that was selected.
    scrambled = (test[0], np.random.default_rng(3).permutation(test[1]))
    again = evaluate_downstream(synthetic, real_train, scrambled, cfg, sweep=sweep)
    for key in ("chosen_by_synthetic_val", "chosen_by_real_val"):
        assert again["sweep"][key] == table[key]
    assert again["selected"] == report["selected"]
    assert again["real_reference"]["selected_epoch"] == report["real_reference"]["selected_epoch"]
    assert again["synthetic_to_real_test_accuracy"] != report["synthetic_to_real_test_accuracy"]


def test_sweep_configs_grid_and_errors():
    grid = sweep_configs(CFG, {"learning_rate": [1e-3, 3e-4], "epochs": np.array([1, 2])})
    assert [(c.learning_rate, c.epochs) for c in grid] == [(1e-3, 1), (1e-3, 2), (3e-4, 1),
                                                           (3e-4, 2)]
    assert type(grid[0].epochs) is int  # numpy scalars are cast: the report stays JSON
    assert sweep_configs(CFG, None) == [CFG]
    with pytest.raises(ValueError, match="cannot sweep"):
        sweep_configs(CFG, {"model": ["cnn"]})
    with pytest.raises(ValueError, match="non-empty"):
        sweep_configs(CFG, {"epochs": []})


def test_public_images_give_a_selection_metric_and_two_more_classifiers(
        shuffled_digits, monkeypatch):
    """Real public images: synthetic -> public scoring, public-only and public + synthetic
    classifiers; no epoch or candidate is chosen on the test set, and the synthetic-only
    numbers are those of a run without public images."""
    images, labels = shuffled_digits
    synthetic, real_train = (images[:300], labels[:300]), (images[300:600], labels[300:600])
    public, test = (images[600:900], labels[600:900]), (images[900:1200], labels[900:1200])
    cfg = CFG
    sweep = {"learning_rate": [3e-3, 1e-3]}
    calls = []
    real_train_classifier = downstream.train_classifier

    def spy(fit_images, fit_labels, val_images, val_labels, recipe, **kwargs):
        calls.append((fit_images, val_images, sorted(kwargs.get("monitor_sets") or {})))
        return real_train_classifier(fit_images, fit_labels, val_images, val_labels, recipe,
                                     **kwargs)

    monkeypatch.setattr(downstream, "train_classifier", spy)
    report = evaluate_downstream(synthetic, real_train, test, cfg, sweep=sweep, public=public,
                                 real_reference=False)
    json.dumps(report)
    for key in ("synthetic_to_real_public_accuracy", "public_to_real_test_accuracy",
                "public_plus_synthetic_to_real_test_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    rows = report["sweep"]["candidates"]
    chosen = rows[report["sweep"]["chosen_by_synthetic_val"]]
    assert report["synthetic_to_real_public_accuracy"] == chosen["real_public_accuracy"]
    assert chosen["real_public_accuracy"] == pytest.approx(
        chosen["real_public_accuracy_by_epoch"][chosen["selected_epoch"] - 1])
    assert report["sweep"]["chosen_by_real_public"] == int(
        np.argmax([row["real_public_accuracy"] for row in rows]))
    # Measured 0.28 (public only: 24 steps on 270 digits) and 0.57 (public + "synthetic" real
    # digits: 48 steps on 540); chance is 0.1.
    assert report["public_to_real_test_accuracy"] > 0.15
    assert (report["public_plus_synthetic_to_real_test_accuracy"]
            > report["public_to_real_test_accuracy"])

    # Which data each training saw: 2 synthetic candidates, public only, public + synthetic.
    synthetic_fit, synthetic_val = split_holdout(*synthetic, cfg.val_fraction, cfg.seed)
    public_fit, public_val = split_holdout(*public, cfg.val_fraction, cfg.seed)
    assert [monitored for *_, monitored in calls] == [["real_public", "real_val"]] * 2 + [[]] * 2
    np.testing.assert_array_equal(calls[2][0], public_fit[0])
    np.testing.assert_array_equal(calls[2][1], public_val[0])
    np.testing.assert_array_equal(calls[3][0], np.concatenate([synthetic_fit[0], public_fit[0]]))
    np.testing.assert_array_equal(calls[3][1], np.concatenate([synthetic_val[0], public_val[0]]))
    sizes = report["num_examples"]
    assert sizes["public"] == 300
    assert report["public"]["public_plus_synthetic"]["num_train"] == (sizes["synthetic_train"] +
                                                                      len(public_fit[1]))

    # Scrambled test labels change test accuracies only, never a choice.
    scrambled = (test[0], np.random.default_rng(3).permutation(test[1]))
    again = evaluate_downstream(synthetic, real_train, scrambled, cfg, sweep=sweep, public=public,
                                real_reference=False)
    for key in ("chosen_by_synthetic_val", "chosen_by_real_public"):
        assert again["sweep"][key] == report["sweep"][key]
    for run in ("public_only", "public_plus_synthetic"):
        assert again["public"][run]["selected_epoch"] == report["public"][run]["selected_epoch"]
    assert again["public_to_real_test_accuracy"] != report["public_to_real_test_accuracy"]

    # Without public images (or without the mix): the synthetic-only numbers are unchanged.
    plain = evaluate_downstream(synthetic, real_train, test, cfg, sweep=sweep, real_reference=False)
    assert plain["synthetic_to_real_test_accuracy"] == report["synthetic_to_real_test_accuracy"]
    assert plain["selected"] == report["selected"]
    assert plain["public"] is None and plain["public_to_real_test_accuracy"] is None
    calls.clear()
    no_mix = evaluate_downstream(synthetic, real_train, test, cfg, public=public,
                                 real_reference=False, public_mix=False)
    assert len(calls) == 1 and no_mix["public"]["public_only"] is None
    assert no_mix["public_plus_synthetic_to_real_test_accuracy"] is None
    assert 0.0 <= no_mix["synthetic_to_real_public_accuracy"] <= 1.0
