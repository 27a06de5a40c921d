"""Choose sampler settings without touching the real test set or unaccounted private data.

    python benchmarks/sampler_sweep.py --config=configs/fashion_mnist_pretrain.py \\
        --workdir=runs/fashion_mnist_pretrain --guidance=0,1,2,4 --ddim-steps=25 --num=1000

For a trained workdir of a dataset with a public part (`data.public_fraction > 0`), each
setting draws `--num` class-balanced samples from the EMA model (same seeds for every setting)
and scores them on **public** real images only:

* `public_accuracy`: the downstream classifier of `--mode=evaluate` (same recipe), trained on
  the samples with its epoch chosen on a synthetic validation split, then scored on the real
  public images. This is the selection metric: a higher value means synthetic data that teaches
  more about real images.
* `label_consistency`: the fraction of samples that a logistic-regression classifier fit on the
  real public images assigns to the class they were generated for.

Neither number reads the test split or the private images, so choosing the sampler by them
costs no privacy and does not overfit the headline test accuracy. Sampling is post-processing of
the (DP) model: drawing any number of samples spends no budget.

Output: one line per setting, then one JSON document (also to --json-out).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import runpy
import sys
import time

import jax
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":  # run as a script: use the jaxdpdm of this checkout
    sys.path.insert(0, os.path.dirname(_HERE))
if _HERE not in sys.path:  # harness sits next to this file (not an installed package)
    sys.path.insert(0, _HERE)
import harness  # noqa: E402
from jaxdpdm import sampling  # noqa: E402
from jaxdpdm.data import load_dataset  # noqa: E402
from jaxdpdm.evaluation import classifier_training, label_consistency  # noqa: E402
from jaxdpdm.evaluation.run import downstream_config  # noqa: E402
from jaxdpdm.experiment import data_spec  # noqa: E402
from jaxdpdm.generate import load_trained  # noqa: E402
from jaxdpdm.images import from_model_range  # noqa: E402


def load_config(spec: str):
    """`path[:variant]` -> the config file's `get_config(variant)`."""
    path, _, variant = spec.partition(":")
    return runpy.run_path(path)["get_config"](variant or None)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def draw(exp, params, *, num: int, batch: int, guidance: float, steps: int, seed: int,
         eta: float = 0.0):
    """`num` class-balanced samples: (uint8 `[num, H, W, C]`, labels int `[num]`)."""
    u = exp.unet_config
    sample_fn = sampling.make_sample_fn(exp.eval_apply, params, exp.schedule,
                                        image_shape=(u.image_size, u.image_size, u.in_channels),
                                        method="ddim", num_steps=steps, eta=eta,
                                        guidance_scale=guidance, null_label=exp.null_label)
    labels = sampling.balanced_labels(num, u.num_classes, seed)
    out = []
    for i in range(-(-num // batch)):
        chunk = np.zeros((batch,), np.int32)
        part = labels[i * batch:(i + 1) * batch]
        chunk[:len(part)] = part
        images = sample_fn(jax.random.fold_in(jax.random.key(seed), i), chunk)
        out.append(from_model_range(np.asarray(images)[:len(part)]))
    return np.concatenate(out), labels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="config file[:variant] of the workdir")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--guidance", type=_floats, default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--ddim-steps", type=_floats, default=[25])
    parser.add_argument("--eta", type=_floats, default=[0.0],
                        help="DDIM eta values (0 deterministic, 1 DDPM-like ancestral noise)")
    parser.add_argument("--num", type=int, default=1000, help="samples per setting")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    config = load_config(args.config)
    if not config.data.public_fraction:
        print("this config has no public part (data.public_fraction = 0): nothing to select on")
        return 2
    public = load_dataset(dataclasses.replace(data_spec(config), subset="public"))
    exp, params, meta = load_trained(config, args.workdir)
    num_classes = exp.unet_config.num_classes
    reader = label_consistency.fit_label_classifier((public.images, public.labels), None,
                                                    num_classes, kind="logistic")
    recipe = downstream_config(config)
    results = []
    settings = [(int(steps), eta, guidance)
                for steps in args.ddim_steps
                for eta in args.eta
                for guidance in args.guidance]
    for steps, eta, guidance in settings:
        start = time.perf_counter()
        images, labels = draw(exp, params, num=args.num, batch=args.batch, guidance=guidance,
                              steps=steps, seed=args.seed, eta=eta)
        sample_s = time.perf_counter() - start
        (train_x,
         train_y), (val_x, val_y) = classifier_training.split_holdout(images, labels,
                                                                      recipe.val_fraction,
                                                                      seed=recipe.seed)
        trained = classifier_training.train_classifier(train_x, train_y, val_x, val_y, recipe,
                                                       num_classes=num_classes)
        row = {
            "guidance": guidance, "ddim_steps": steps, "eta": eta, "num": args.num,
            "public_accuracy": classifier_training.accuracy(trained, public.images, public.labels),
            "label_consistency": label_consistency.label_consistency(reader, images, labels)
                                 ["overall"], "sample_seconds": round(sample_s, 1),
            "total_seconds": round(time.perf_counter() - start, 1)
        }
        results.append(row)
        print(
            f"guidance={guidance:g} ddim_steps={steps} eta={eta:g}: public_accuracy="
            f"{row['public_accuracy']:.4f} label_consistency="
            f"{row['label_consistency']:.3f} ({row['sample_seconds']:.0f}s sampling, "
            f"{row['total_seconds']:.0f}s total)", flush=True)
    doc = {
        "config": args.config, "workdir": args.workdir, "checkpoint_step": meta["step"],
        "num_public": len(public), "recipe": dataclasses.asdict(recipe),
        "environment": harness.environment(), "results": results
    }
    harness.emit_json(doc, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
