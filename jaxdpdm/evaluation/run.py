"""`--mode=evaluate`: how useful are a workdir's synthetic samples?

Reads `WORKDIR/samples/` (written by `--mode=sample`), or with `eval.samples_npz` a published
`.npz` set (`export.read_published`; its provenance gives the checkpoint step and the privacy
guarantee), and reports

* FID against the real training split, through the JAX FID Inception, when
  `eval.inception_weights` names a local weights file or `eval.download_inception_weights` lets
  the weights be fetched once into a cache (reference statistics are cached in `WORKDIR/eval/`);
* label consistency (`label_consistency`): the fraction of samples that a classifier of the
  real training split assigns to the class they were generated for, overall and per class
  (it reads real data: not covered by the DP guarantee);
* downstream accuracy: a classifier trained only on the synthetic data (epoch chosen on a
  synthetic validation split) and tested on the real test set, beside the same classifier
  trained on the real training data. `eval.classifier` picks the classifier and its training
  recipe (`classifier_training.RECIPES`: DPDM's CNN protocol, or WRN-16-4 with the CIFAR
  recipe); the eval.* fields of `RECIPE_OVERRIDES` replace the recipe's values when set. The
  report records the recipe used (`downstream.config`) and which fields were overridden;
* for data split into a public and a private part (`data.public_fraction > 0`), with the real
  public images (`public_images`, the part the pretraining phase trains on, disjoint from the
  private part): the synthetic-only classifier scored on them ("synthetic -> real public", a
  selection metric: it reads neither the test set nor private data, so it may choose
  hyperparameters; for a config trained on the public part itself it scores the generator's own
  training images), and, with `eval.public_mix` (default on), the test accuracy of the same
  classifier trained on the public images alone and on the public images + the synthetic set;

into `WORKDIR/eval/report.json` and `WORKDIR/eval/summary.txt`, next to the run's privacy
guarantee from `privacy_report.json`. The workdir must be local (copy a `gs://` workdir down
first, e.g. with `launch/tpu_pod.py collect`).

The real test set is `data.test_split` of the training source, or, for sources without splits
(image_folder, npz), the folder or file `data.test_dir`; the training data itself is refused
(`experiment.real_test_spec`).
The samples must come from the checkpoint the privacy report describes (`samples/meta.json`
records their step): otherwise the run is refused, since the epsilon printed would belong to
another model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import numpy as np

from jaxdpdm import export, sampling
from jaxdpdm.config import validate_config
from jaxdpdm.checkpoint import CheckpointStore, checkpoint_dir, has_checkpoint
from jaxdpdm.data import ImageDataset, load_dataset
from jaxdpdm.evaluation import (classifier_training, downstream, fid, inception, inception_weights,
                                label_consistency)
from jaxdpdm import storage
from jaxdpdm.dp.report import PRIVACY_JSON
from jaxdpdm.experiment import data_spec, real_test_spec

EVAL_SUBDIR = "eval"

log = logging.getLogger(__name__)


def _progress_printer(what: str):
    start = time.perf_counter()

    def show(done: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        width = 30
        filled = int(width * done / max(total, 1))
        left = elapsed / max(done, 1) * (total - done)
        print(
            f"\r[{what}] [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
            f"{elapsed:.0f}s, ~{left:.0f}s left", end="\n" if done >= total else "", flush=True)

    return show


def _batches(images: np.ndarray, batch_size: int, show):
    total = -(-len(images) // batch_size)
    for i in range(total):
        yield images[i * batch_size:(i + 1) * batch_size]
        show(i + 1, total)


def compute_fid(config, synthetic: np.ndarray, real: np.ndarray, cache_dir: str, real_name: str,
                weights: str | None = None) -> dict[str, Any]:
    """FID between uint8 image sets `[N, H, W, C]`; the real statistics are cached by name.

    `weights`: the Inception weights file (default `config.eval.inception_weights`).
    """
    params = inception_weights.load_inception_params(weights or config.eval.inception_weights)
    batch = config.eval.fid_batch_size
    features = inception.make_feature_fn(params, batch)
    cache = os.path.join(cache_dir, f"fid_stats_{real_name}.npz")
    mu_r, sigma_r = fid.load_or_compute_stats(
        cache, lambda: fid.compute_statistics(features,
                                              _batches(real, batch, _progress_printer("FID real"))))
    mu_s, sigma_s = fid.compute_statistics(
        features, _batches(synthetic, batch, _progress_printer("FID synthetic")))
    return {
        "fid": fid.frechet_distance(mu_s, sigma_s, mu_r,
                                    sigma_r), "num_synthetic": int(len(synthetic)),
        "num_real": int(len(real)), "reference": real_name, "reference_stats": cache
    }


def _reference_name(config, dataset_name: str, weights: str) -> str:
    """A cache name that changes whenever the reference images or the Inception weights do."""
    identity = json.dumps({"data": config.data.to_dict(), "weights": os.path.abspath(weights)},
                          sort_keys=True, default=str)
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return f"{dataset_name.replace('/', '_')}_{config.data.split}_{digest}"


# The eval.* fields that override a field of the classifier's recipe when they are set.
RECIPE_OVERRIDES = {
    "classifier_epochs": "epochs", "classifier_batch_size": "batch_size",
    "classifier_learning_rate": "learning_rate", "augment": "augment",
    "classifier_seed": "seed"
}


def recipe_overrides(config) -> dict[str, Any]:
    """The recipe fields that `config.eval` sets (TrainConfig field -> value)."""
    return {
        field: config.eval[name]
        for name, field in RECIPE_OVERRIDES.items()
        if config.eval[name] is not None
    }


def downstream_config(config) -> classifier_training.TrainConfig:
    """The recipe of `eval.classifier` (`classifier_training.RECIPES`) with the set eval.*
    overrides."""
    return classifier_training.recipe(config.eval.classifier, **recipe_overrides(config))


def public_images(config, train: ImageDataset) -> ImageDataset | None:
    """The real public part of the split (`data.subset="public"`), or None without a public part.

    `train` is the dataset of `data_spec(config)`, returned as is when it is the public part.
    """
    if config.data.public_fraction <= 0:
        return None
    spec = data_spec(config)
    if spec.subset == "public":
        return train
    return load_dataset(dataclasses.replace(spec, subset="public"))


def shared_images(train: np.ndarray, test: np.ndarray) -> int:
    """How many test images (uint8 `[M, H, W, C]`) are byte-identical to a training image
    (uint8 `[N, H, W, C]`)."""
    seen = {image.tobytes() for image in train}
    return int(sum(image.tobytes() in seen for image in test))


def samples_provenance(workdir: str) -> dict[str, Any]:
    """The checkpoint step of the samples, of the privacy report and of the newest checkpoint.

    Raises:
      ValueError: the samples were drawn from another step than the one whose privacy
        guarantee the report would print.
    """
    meta_path = os.path.join(workdir, "samples", "meta.json")
    with open(meta_path) as f:
        sample_step = json.load(f).get("checkpoint_step")
    privacy_path = os.path.join(workdir, PRIVACY_JSON)
    report_step = (json.loads(storage.read_text(privacy_path)).get("mechanism", {}).get("steps")
                   if os.path.exists(privacy_path) else None)
    latest = None
    if has_checkpoint(workdir):
        store = CheckpointStore(checkpoint_dir(workdir), create=False)
        try:
            latest = store.latest_step()
        finally:
            store.close()
    rerun = "run --mode=sample again (it replaces samples of an older checkpoint), then evaluate"
    if sample_step is not None and report_step is not None and sample_step != report_step:
        raise ValueError(f"the samples in {workdir}/samples were drawn at checkpoint step "
                         f"{sample_step}, but {PRIVACY_JSON} describes the model at step "
                         f"{report_step}: {rerun}")
    if sample_step is not None and latest is not None and sample_step != latest:
        log.warning(
            "the samples were drawn at checkpoint step %s but the newest checkpoint is "
            "step %s: %s", sample_step, latest, rerun)
    return {
        "checkpoint_step": sample_step, "privacy_report_step": report_step,
        "latest_checkpoint_step": latest
    }


def synthetic_samples(config, workdir: str) -> tuple[np.ndarray, np.ndarray, dict, dict | None]:
    """The samples to evaluate: `WORKDIR/samples`, or the published set `eval.samples_npz`.

    Returns:
      (images uint8 [N, H, W, C], labels int32 [N], where they came from (checkpoint steps;
      for a published set also its path, phase, subset and sampler), the privacy guarantee of
      the model that drew them or None): from `WORKDIR/privacy_report.json`, or for a
      published set from its provenance.

    Raises:
      FileNotFoundError: no samples.
      ValueError: samples of another checkpoint than the privacy report's
        (`samples_provenance`), or a published set of another dataset than `data.name`.
    """
    if config.eval.samples_npz:
        images, labels, published = export.read_published(config.eval.samples_npz)
        if published.get("dataset") not in (None, config.data.name):
            raise ValueError(f"{config.eval.samples_npz} holds samples of dataset "
                             f"{published['dataset']!r}, but data.name is "
                             f"{config.data.name!r}: evaluate it with its own config")
        info = {"source": os.path.abspath(os.path.expanduser(config.eval.samples_npz)),
                "checkpoint_step": published.get("checkpoint_step"),
                **{key: published[key] for key in ("phase", "subset", "sampler", "part",
                                                   "num_parts") if key in published}}
        return images, labels, info, published.get("privacy_guarantee")
    if not os.path.isdir(os.path.join(workdir, "samples")):
        raise FileNotFoundError(f"no samples in {os.path.join(workdir, 'samples')}: run "
                                "--mode=sample first, or set eval.samples_npz to a published set")
    provenance = samples_provenance(workdir)
    images, labels = sampling.load_samples(workdir)
    privacy_path = os.path.join(workdir, PRIVACY_JSON)
    privacy = (json.loads(storage.read_text(privacy_path))["guarantee"]
               if os.path.exists(privacy_path) else None)
    return images, labels, provenance, privacy


def evaluate_workdir(config, workdir: str) -> dict[str, Any]:
    """Evaluates the samples in `workdir`; writes and returns the report."""
    validate_config(config)
    test_spec = real_test_spec(config)
    images, labels, samples_info, privacy = synthetic_samples(config, workdir)
    real_train = load_dataset(data_spec(config))
    real_test = load_dataset(test_spec)
    if images.shape[1:] != real_train.images.shape[1:]:
        raise ValueError(f"samples have shape {images.shape[1:]} but the data "
                         f"{real_train.images.shape[1:]}: evaluate with the training config")
    if real_test.class_names != real_train.class_names:
        raise ValueError(f"the test data's classes {list(real_test.class_names)} differ from the "
                         f"training data's {list(real_train.class_names)}; label i must mean the "
                         "same class in both")
    overlap = shared_images(real_train.images, real_test.images)
    if overlap:
        log.warning("%d of %d real test images are identical to a training image", overlap,
                    len(real_test))
    public = public_images(config, real_train)
    out_dir = os.path.join(workdir, EVAL_SUBDIR)
    os.makedirs(out_dir, exist_ok=True)
    report: dict[str, Any] = {
        "samples": {"num": int(len(images)), "shape": list(images.shape[1:]), **samples_info},
        "data": {
            "train": real_train.summary(), "test": real_test.summary(), "num_test": len(real_test),
            "test_images_in_train": overlap, "public": None if public is None else public.summary(),
            "num_public": None if public is None else len(public)
        }
    }

    if config.eval.inception_weights or config.eval.download_inception_weights:
        weights = inception_weights.resolve(config.eval.inception_weights,
                                            download=config.eval.download_inception_weights)
        report["fid"] = compute_fid(config, images, real_train.images, out_dir,
                                    _reference_name(config, real_train.name, weights), weights)
    else:
        report["fid"] = None

    report["label_consistency"] = None
    if config.model.class_conditional:  # an unconditional model's samples carry no label
        classifier, class_names = label_consistency.fit_for_config(config, real_test)
        report["label_consistency"] = label_consistency.label_consistency(
            classifier, images, labels)
        report["label_consistency"]["class_names"] = list(class_names)

    def progress(epoch: int, metrics: dict) -> None:
        print(
            f"[classifier {metrics.get('run', '')}] epoch {epoch}/{metrics.get('epochs')} "
            f"loss={metrics.get('train_loss', float('nan')):.4f} "
            f"val_acc={metrics.get('val_accuracy', float('nan')):.4f}", flush=True)

    report["downstream"] = downstream.evaluate_downstream(
        (images, labels),
        (real_train.images, real_train.labels), (real_test.images, real_test.labels),
        downstream_config(config), num_classes=real_train.num_classes,
        real_reference=config.eval.train_real_reference, public=None if public is None else
        (public.images,
         public.labels), public_mix=config.eval.public_mix is not False, progress=progress)
    report["downstream"]["recipe_overrides"] = sorted(recipe_overrides(config))
    report["privacy"] = privacy
    storage.write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2) + "\n")
    text = format_summary(report)
    storage.write_text(os.path.join(out_dir, "summary.txt"), text)
    print(text, flush=True)
    return report


def format_summary(report: dict[str, Any]) -> str:
    d = report["downstream"]
    step = report["samples"].get("checkpoint_step")
    lines = [
        "Evaluation summary (jaxdpdm)", "============================",
        f"Synthetic samples: {report['samples']['num']} of shape "
        f"{tuple(report['samples']['shape'])}"
        f"{f', from checkpoint step {step}' if step is not None else ''}"
    ]
    source = report["samples"].get("source")
    if source:
        part = report["samples"].get("part")
        lines.append(f"  read from the published set {source}" +
                     (f" (part {part} of {report['samples'].get('num_parts')} only)"
                      if part is not None else ""))
    p = report["privacy"]
    if p:
        lines.append(f"Privacy of the model that made them: ({p['epsilon_pld']:.3f}, "
                     f"{p['delta']:.1e})-DP (PLD); RDP epsilon {p['epsilon_rdp']:.3f}")
        if p.get("delta_warning"):
            lines.append(f"WARNING: {p['delta_warning']}.")
    else:
        lines.append("Privacy: none recorded in the published set (a non-private run?)" if source
                     else "Privacy: no privacy_report.json in the workdir (a non-private run?)")
    if report["fid"]:
        f = report["fid"]
        lines.append(f"FID: {f['fid']:.2f} ({f['num_synthetic']} synthetic vs "
                     f"{f['num_real']} real, {f['reference']})")
    else:
        lines.append("FID: not computed (set eval.inception_weights to a local weights file, or "
                     "eval.download_inception_weights=True on a machine with internet)")
    if report.get("label_consistency"):
        c = report["label_consistency"]
        lines.append(label_consistency.format_consistency(c, c.get("class_names")))
    data = report.get("data", {})
    if d.get("config"):
        lines.append(f"Downstream classifier: {format_recipe(d['config'])}" +
                     (f" (set by eval.*: {', '.join(d['recipe_overrides'])})" if d.
                      get("recipe_overrides") else ""))
    lines.append(f"Downstream accuracy on the real test set ({data.get('num_test', '?')} held-out "
                 f"images), trained on synthetic data only: "
                 f"{d['synthetic_to_real_test_accuracy']:.4f}")
    if data.get("test_images_in_train"):
        lines.append(f"  note: {data['test_images_in_train']} of those test images are identical "
                     "to a training image")
    if d.get("real_to_real_test_accuracy") is not None:
        lines.append(f"Same classifier trained on the real training data: "
                     f"{d['real_to_real_test_accuracy']:.4f}")
    if d.get("synthetic_to_real_public_accuracy") is not None:
        lines += [
            f"Real public images ({data.get('num_public', '?')}, the non-private part of "
            "the split):", f"  synthetic-only classifier scored on them: "
            f"{d['synthetic_to_real_public_accuracy']:.4f} (selection metric: public data, "
            "not the test set nor private data, so it may choose hyperparameters)"
        ]
        for key, what in (("public_to_real_test_accuracy", "public images only"),
                          ("public_plus_synthetic_to_real_test_accuracy",
                           "public images + synthetic data")):
            if d.get(key) is not None:
                lines.append(f"  test accuracy, trained on the {what}: {d[key]:.4f}")
    return "\n".join(lines) + "\n"


def format_recipe(recipe: dict[str, Any]) -> str:
    """One line for a `downstream.TrainConfig` as a dict (the report's `downstream.config`)."""
    decay = f", weight decay {recipe['weight_decay']:g}" if recipe["weight_decay"] else ""
    crop = (f" (padding {recipe['crop_padding']})" if recipe["augment"] != "none" else "")
    return (f"{recipe['model']}, {recipe['optimizer']} lr {recipe['learning_rate']:g} "
            f"{recipe['lr_schedule']}{decay}, {recipe['epochs']} epochs of batch "
            f"{recipe['batch_size']}, augmentation {recipe['augment']}{crop}")
