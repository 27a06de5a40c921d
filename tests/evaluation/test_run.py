"""`--mode=evaluate` pieces: the summary text, and FID with a stand-in feature network.

No Inception weights exist on this machine, so `compute_fid` is run with
`inception_weights.load_inception_params` / `inception.make_feature_fn` replaced by a fixed
random projection of the pixels: that checks the plumbing (batching, statistics, caching), not
the network.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxdpdm.config import get_config
from jaxdpdm.data import DataSpec, load_dataset
from jaxdpdm.data.preprocessing import public_private_indices
from jaxdpdm.evaluation import fid, inception, inception_weights
from jaxdpdm.evaluation import run as run_lib
from jaxdpdm.evaluation.classifier_training import RECIPES, TrainConfig
from jaxdpdm.experiment import data_spec

FEATURE_DIM = 6


def _summary_report(*, with_fid: bool, with_privacy: bool, real_reference: bool = True):
    return {
        "samples": {"num": 40, "shape": [8, 8, 1]},
        "privacy":
            ({"epsilon_pld": 9.87654, "epsilon_rdp": 11.5, "delta": 1e-5} if with_privacy else None
            ),
        "fid": ({
            "fid": 12.3456, "num_synthetic": 40, "num_real": 1437, "reference": "digits_train_8px"
        } if with_fid else None),
        "downstream": {
            "synthetic_to_real_test_accuracy": 0.81234,
            "real_to_real_test_accuracy": 0.95 if real_reference else None
        },
    }


@pytest.mark.parametrize("with_fid", [True, False])
@pytest.mark.parametrize("with_privacy", [True, False])
def test_format_summary(with_fid, with_privacy):
    text = run_lib.format_summary(_summary_report(with_fid=with_fid, with_privacy=with_privacy))
    assert "40 of shape (8, 8, 1)" in text
    assert "0.8123" in text and "0.9500" in text
    if with_privacy:
        assert "(9.877, 1.0e-05)-DP" in text and "11.500" in text
    else:
        assert "no privacy_report.json" in text
    if with_fid:
        assert "FID: 12.35" in text and "40 synthetic vs 1437 real" in text
        assert "digits_train_8px" in text
    else:
        assert "FID: not computed" in text and "eval.inception_weights" in text
    assert text.endswith("\n")


def test_format_summary_without_real_reference():
    text = run_lib.format_summary(
        _summary_report(with_fid=False, with_privacy=False, real_reference=False))
    assert "trained on the real training data" not in text


# --- compute_fid with a stand-in feature function ---------------------------------------------------


class ProjectionFeatures:
    """`features(uint8 [b, H, W, C]) -> f32 [b, FEATURE_DIM]`: a fixed random projection; counts
    the images it saw and checks the batch size `compute_fid` promised."""

    def __init__(self, batch_size: int, num_pixels: int):
        self.batch_size = batch_size
        self.projection = np.random.default_rng(1).standard_normal((num_pixels, FEATURE_DIM))
        self.images_seen = 0

    def __call__(self, images):
        images = np.asarray(images)
        assert images.dtype == np.uint8 and 1 <= len(images) <= self.batch_size
        self.images_seen += len(images)
        return (images.reshape(len(images), -1) / 255.0 @ self.projection).astype(np.float32)


@pytest.fixture
def stand_in_inception(monkeypatch):
    """Replaces the Inception loader and feature function; returns the list of feature fns."""
    made = []

    def load_params(path):
        assert path == "/weights/pt_inception.npz"
        return {"params": "stand-in"}

    def make_feature_fn(params, batch_size, **kwargs):
        assert params == {"params": "stand-in"}
        made.append(ProjectionFeatures(batch_size, num_pixels=8 * 8))
        return made[-1]

    monkeypatch.setattr(inception_weights, "load_inception_params", load_params)
    monkeypatch.setattr(inception, "make_feature_fn", make_feature_fn)
    return made


def _config(batch_size=16):
    config = get_config()
    config.eval.inception_weights = "/weights/pt_inception.npz"
    config.eval.fid_batch_size = batch_size
    return config


def _images(seed, n=50):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)


def test_fid_of_a_set_with_itself_is_zero(tmp_path, stand_in_inception):
    real = _images(0)
    result = run_lib.compute_fid(_config(), real, real, str(tmp_path), "digits")
    assert abs(result["fid"]) < 1e-6
    assert (result["num_synthetic"], result["num_real"]) == (50, 50)
    assert result["reference"] == "digits"


def test_fid_grows_with_the_distance_between_sets(tmp_path, stand_in_inception):
    real = _images(0)
    near = np.clip(real.astype(int) + 10, 0, 255).astype(np.uint8)
    far = np.clip(real.astype(int) + 80, 0, 255).astype(np.uint8)
    fid_near = run_lib.compute_fid(_config(), near, real, str(tmp_path), "digits")["fid"]
    fid_far = run_lib.compute_fid(_config(), far, real, str(tmp_path), "digits")["fid"]
    assert 0 < fid_near < fid_far


def test_reference_statistics_are_cached_and_reused(tmp_path, stand_in_inception):
    real, synthetic = _images(0), _images(1, n=30)
    first = run_lib.compute_fid(_config(), synthetic, real, str(tmp_path), "digits_train_8px")
    cache = os.path.join(tmp_path, "fid_stats_digits_train_8px.npz")
    assert first["reference_stats"] == cache
    with np.load(cache) as stats:
        assert stats["mu"].shape == (FEATURE_DIM,)
        assert stats["sigma"].shape == (FEATURE_DIM, FEATURE_DIM)
    assert stand_in_inception[0].images_seen == 50 + 30

    # Second call: other "real" images under the same name are not even looked at.
    second = run_lib.compute_fid(_config(), synthetic, _images(2), str(tmp_path),
                                 "digits_train_8px")
    assert stand_in_inception[1].images_seen == 30
    assert second["fid"] == pytest.approx(first["fid"], rel=1e-9)
    mu, sigma = fid.load_stats(cache)
    assert mu.shape == (FEATURE_DIM,) and sigma.shape == (FEATURE_DIM, FEATURE_DIM)


def test_fid_does_not_depend_on_the_batch_size(tmp_path, stand_in_inception):
    real, synthetic = _images(0), _images(1, n=30)
    values = [
        run_lib.compute_fid(_config(batch), synthetic, real, str(tmp_path / str(batch)),
                            "digits")["fid"] for batch in (7, 50)
    ]
    assert values[0] == pytest.approx(values[1], rel=1e-6)


# --- the real test set, and where the samples came from ---------------------------------------


def _folder(root, value_per_class):
    """root/<class>/<i>.png: 3 gray 8x8 images per class, levels from `value_per_class`."""
    for name, value in value_per_class.items():
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), value + i, np.uint8)).save(root / name / f"{i}.png")
    return str(root)


def _folder_config(train_dir, test_dir=None):
    config = get_config()
    config.data.name, config.data.image_size, config.data.data_dir = "image_folder", 8, train_dir
    config.data.test_dir = test_dir
    return config


@pytest.fixture
def stub_downstream(monkeypatch):
    """Replaces classifier training; records the real test set and the options it was given."""
    seen = {}

    def evaluate_downstream(synthetic, real_train, real_test, cfg, **kwargs):
        seen.update(test=real_test, **kwargs)
        return {"synthetic_to_real_test_accuracy": 0.5, "real_to_real_test_accuracy": 0.75}

    monkeypatch.setattr(run_lib.downstream, "evaluate_downstream", evaluate_downstream)
    return seen


def _write_samples(workdir, step, n=6):
    samples = workdir / "samples"
    samples.mkdir(parents=True)
    np.savez(samples / "chunk_00000.npz", images=np.full((n, 8, 8, 1), 99, np.uint8),
             labels=np.arange(n) % 2)
    (samples / "meta.json").write_text(json.dumps({"checkpoint_step": step}))


def test_evaluate_an_image_folder_on_its_test_folder(tmp_path, stub_downstream):
    train_dir = _folder(tmp_path / "train", {"a": 10, "b": 200})
    test_dir = _folder(tmp_path / "test", {"a": 11, "b": 100})  # "a" 11, 12 are also in train
    workdir = tmp_path / "run"
    _write_samples(workdir, step=3)
    report = run_lib.evaluate_workdir(_folder_config(train_dir, test_dir), str(workdir))
    np.testing.assert_array_equal(stub_downstream["test"][0][:, 0, 0, 0],
                                  [11, 12, 13, 100, 101, 102])
    assert report["data"]["num_test"] == 6 and report["data"]["test_images_in_train"] == 2
    assert stub_downstream["public"] is None and report["data"]["num_public"] is None
    assert report["samples"]["checkpoint_step"] == 3
    summary = (workdir / "eval" / "summary.txt").read_text()
    assert "from checkpoint step 3" in summary and "(6 held-out images)" in summary
    assert "2 of those test images are identical to a training image" in summary


def test_a_test_folder_with_other_classes_is_refused(tmp_path, stub_downstream):
    train_dir = _folder(tmp_path / "train", {"a": 10, "b": 200})
    test_dir = _folder(tmp_path / "test", {"b": 100, "c": 50})  # label 0 would mean "b"
    _write_samples(tmp_path / "run", step=3)
    with pytest.raises(ValueError, match="label i must mean the same class"):
        run_lib.evaluate_workdir(_folder_config(train_dir, test_dir), str(tmp_path / "run"))


def test_samples_of_another_step_than_the_privacy_report_are_refused(tmp_path, stub_downstream):
    """The report used to print the final epsilon for samples of an earlier checkpoint."""
    workdir = tmp_path / "run"
    _write_samples(workdir, step=2)
    (workdir / "privacy_report.json").write_text(json.dumps({"mechanism": {"steps": 3}}))
    with pytest.raises(
            ValueError, match="drawn at checkpoint step 2, but privacy_report.json "
            "describes the model at step 3"):
        run_lib.samples_provenance(str(workdir))
    (workdir / "privacy_report.json").write_text(json.dumps({"mechanism": {"steps": 2}}))
    assert run_lib.samples_provenance(str(workdir))["checkpoint_step"] == 2


def test_evaluate_without_samples_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="run --mode=sample first"):
        run_lib.evaluate_workdir(get_config(), str(tmp_path))


def test_evaluate_a_published_set_with_the_guarantee_its_provenance_records(tmp_path,
                                                                            stub_downstream):
    """`eval.samples_npz`: the set and its privacy guarantee come from the published parts, not
    from the workdir (which may hold another run's report, or nothing)."""
    guarantee = {"epsilon_pld": 9.99, "epsilon_rdp": 12.4, "delta": 1e-5}
    folder = tmp_path / "published"
    folder.mkdir()
    for part, value in enumerate((40, 200)):
        np.savez(folder / f"part-{part:05d}.npz", images=np.full((3, 8, 8, 1), value, np.uint8),
                 labels=[0, 1, 0], provenance=json.dumps({
                     "dataset": "image_folder", "checkpoint_step": 150, "phase": "dp",
                     "privacy_guarantee": guarantee, "part": part, "num_parts": 2}))
    train_dir = _folder(tmp_path / "train", {"a": 10, "b": 200})
    config = _folder_config(train_dir, _folder(tmp_path / "test", {"a": 11, "b": 100}))
    config.eval.samples_npz = str(folder)
    workdir = tmp_path / "run"
    _write_samples(workdir, step=3)  # ignored: another run's samples and guarantee
    (workdir / "privacy_report.json").write_text(json.dumps({"guarantee": {"epsilon_pld": 1.0}}))
    report = run_lib.evaluate_workdir(config, str(workdir))
    assert report["samples"] == {"num": 6, "shape": [8, 8, 1], "source": str(folder),
                                 "checkpoint_step": 150, "phase": "dp"}
    assert report["privacy"] == guarantee
    summary = (workdir / "eval" / "summary.txt").read_text()
    assert f"read from the published set {folder}" in summary and "(9.990, 1.0e-05)-DP" in summary
    config.eval.samples_npz = str(folder / "part-00001.npz")  # one part: the report says so
    report = run_lib.evaluate_workdir(config, str(tmp_path / "elsewhere"))
    assert report["samples"]["num"] == 3 and report["samples"]["part"] == 1
    assert "(part 1 of 2 only)" in (tmp_path / "elsewhere" / "eval" / "summary.txt").read_text()
    config.data.name, config.data.data_dir = "digits", None  # a set of another dataset
    config.data.test_dir = None
    config.eval.samples_npz = str(folder)
    with pytest.raises(ValueError, match="holds samples of dataset 'image_folder'"):
        run_lib.evaluate_workdir(config, str(workdir))


# --- the real public part of a public/private split -------------------------------------------


def _digits_split_config(subset="private"):
    config = get_config()
    config.data.image_size, config.data.public_fraction, config.data.subset = 8, 0.2, subset
    config.eval.classifier_epochs, config.eval.train_real_reference = 1, False
    return config


def test_public_images_are_the_public_part_of_the_split(tmp_path, monkeypatch):
    """End to end on the 8x8 digits: the public images the classifiers see are exactly the
    public part (disjoint from the private training data); report and summary carry them."""
    seen = {}
    real_evaluate = run_lib.downstream.evaluate_downstream

    def spy(synthetic, real_train, real_test, cfg, **kwargs):
        seen.update(real_train=real_train, test=real_test, **kwargs)
        return real_evaluate(synthetic, real_train, real_test, cfg, **kwargs)

    monkeypatch.setattr(run_lib.downstream, "evaluate_downstream", spy)
    workdir = tmp_path / "run"
    _write_samples(workdir, step=None, n=40)
    report = run_lib.evaluate_workdir(_digits_split_config(), str(workdir))

    whole = load_dataset(DataSpec("digits", 8, 1))  # the train split, both parts
    public_at, private_at = public_private_indices(whole.labels, 0.2, seed=0)
    np.testing.assert_array_equal(seen["public"][0], whole.images[public_at])
    np.testing.assert_array_equal(seen["public"][1], whole.labels[public_at])
    np.testing.assert_array_equal(seen["real_train"][0], whole.images[private_at])
    assert not set(public_at) & set(private_at) and seen["public_mix"] is True
    test = load_dataset(DataSpec("digits", 8, 1, split="test"))
    np.testing.assert_array_equal(seen["test"][0], test.images)  # the held-out test split

    d = report["downstream"]
    assert report["data"]["num_public"] == len(public_at) == 288
    assert d["public"]["num_public"] == 288 and d["num_examples"]["public"] == 288
    for key in ("synthetic_to_real_public_accuracy", "public_to_real_test_accuracy",
                "public_plus_synthetic_to_real_test_accuracy"):
        assert 0.0 <= d[key] <= 1.0
    saved = json.loads((workdir / "eval" / "report.json").read_text())
    assert saved["downstream"]["public"]["public_only"]["selected_epoch"] == 1
    assert d["config"] == dataclasses.asdict(dataclasses.replace(
        RECIPES["cnn"], epochs=1)) and d["recipe_overrides"] == ["epochs"]
    summary = (workdir / "eval" / "summary.txt").read_text()
    assert ("Downstream classifier: cnn, adam lr 0.0003 constant, 1 epochs of batch 64, "
            "augmentation mnist (padding 2) (set by eval.*: epochs)") in summary
    assert "Real public images (288" in summary and "selection metric" in summary
    assert "trained on the public images + synthetic data" in summary


def test_a_config_trained_on_the_public_part_is_its_own_public_set():
    config = _digits_split_config(subset="public")
    trained_on = load_dataset(data_spec(config))
    assert run_lib.public_images(config, trained_on) is trained_on  # pretraining: itself
    assert run_lib.public_images(get_config(), trained_on) is None  # no public part


# --- the downstream classifier's recipe -------------------------------------------------------


def test_the_cnn_recipe_is_dpdms_protocol_as_before():
    """The numbers of earlier evaluations came from exactly this TrainConfig."""
    assert run_lib.downstream_config(get_config()) == TrainConfig(
        model="cnn", epochs=20, batch_size=64, learning_rate=3e-4, weight_decay=0.0,
        optimizer="adam", lr_schedule="constant", augment="mnist", crop_padding=2, val_fraction=0.1,
        eval_batch_size=512, seed=0)


def test_wrn16_4_gets_the_cifar_recipe_and_set_fields_override_it():
    config = get_config()
    config.eval.classifier = "wrn16_4"
    wrn = TrainConfig(model="wrn16_4", epochs=50, batch_size=128, learning_rate=0.1,
                      weight_decay=5e-4, optimizer="sgd", lr_schedule="cosine", augment="cifar",
                      crop_padding=4, val_fraction=0.1, eval_batch_size=512, seed=0)
    assert run_lib.downstream_config(config) == wrn and run_lib.recipe_overrides(config) == {}
    config.eval.classifier_epochs, config.eval.augment = 3, "none"
    config.eval.classifier_learning_rate, config.eval.classifier_batch_size = 0.05, 32
    config.eval.classifier_seed = 7
    assert run_lib.downstream_config(config) == dataclasses.replace(wrn, epochs=3, augment="none",
                                                                    learning_rate=0.05,
                                                                    batch_size=32, seed=7)
    assert run_lib.recipe_overrides(config) == {
        "epochs": 3, "augment": "none", "learning_rate": 0.05, "batch_size": 32, "seed": 7
    }
