"""Which YNNPACK fusion setting of XLA:CPU makes a config's programs faster: each, side by side.

    python benchmarks/xla_options.py --config=configs/fashion_mnist.py --repeats=7
    JAXDPDM_XLA_DEFAULTS=0 python benchmarks/xla_options.py --config=configs/quickstart.py \\
        --candidates="env;dot"

`import jaxdpdm` adds one XLA:CPU flag to `XLA_FLAGS`, `--xla_cpu_experimental_ynn_fusion_type`
(`jaxdpdm.DEFAULT_XLA_FLAGS`): which kinds of HLO fusion XLA hands to the YNNPACK library
("dot": matmuls and convolutions, "eltwise": elementwise chains, "reduce": reductions) instead
of compiling them itself. The flag is read once per process, so comparing processes compares
two different moments of a shared machine; this benchmark instead lowers each program ONCE and
compiles it once per candidate setting, passed as a per-compilation option (the same option the
environment flag sets), then times all compiled programs interleaved in one process. The
candidate "env" compiles without the option, i.e. with the process's XLA_FLAGS: run with
`JAXDPDM_XLA_DEFAULTS=0` (and no XLA_FLAGS of your own) to compare with XLA's own default.

The programs are the ones a config's run spends its time in:
  dp          the DP gradient call of one microbatch (the config's K, `train.microbatch_size`
              and `dp.conv_impl`; `make_dp_step(...).accumulate`, as in training);
  nonprivate  the pretraining gradient call (`--pretrain-rows` rows at `--pretrain-augmult`
              draws; both shipped pretrainings use 64 rows and K = 1);
  sample      one UNet forward pass over `sample.batch_size` images (a DDIM step without
              guidance);
  classifier  one training step of the downstream classifier (`eval.classifier`'s recipe with
              the config's eval.* overrides, as `--mode=evaluate` trains it).
The Adam and noise update, a small separate program, is left out. Inputs are random (timing
does not depend on values). Medians, the load average and each candidate's speed relative to
the first candidate are printed, then one JSON line (also to --json-out).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from typing import Any

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":  # run as a script: use the jaxdpdm of this checkout
    sys.path.insert(0, os.path.dirname(_HERE))
if _HERE not in sys.path:  # dp_step, harness and sampler_sweep sit next to this file
    sys.path.insert(0, _HERE)

import dp_step  # noqa: E402
import harness  # noqa: E402
from sampler_sweep import load_config  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdpdm import experiment  # noqa: E402
from jaxdpdm.evaluation import classifier_training  # noqa: E402
from jaxdpdm.evaluation import run as evaluation_run  # noqa: E402
from jaxdpdm.models import unet  # noqa: E402
from jaxdpdm.models.classifiers import classifier_for, init_classifier  # noqa: E402

OPTION = "xla_cpu_experimental_ynn_fusion_type"
KINDS = ("dot", "eltwise", "reduce", "individual_convolution", "individual_dot")
PROGRAMS = ("dp", "nonprivate", "sample", "classifier")
ENV = "env"  # the candidate "no option": what the process's XLA_FLAGS give


def compiler_option(candidate: str) -> dict[str, str]:
    """"dot,reduce" -> the per-compilation option XLA takes for that flag value; "env" -> none
    (the process's own XLA_FLAGS)."""
    if candidate.strip() == ENV:
        return {}
    kinds = [k.strip() for k in candidate.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if not kinds or unknown:
        raise ValueError(f"candidate {candidate!r}: expected comma-separated kinds of {KINDS}")
    return {OPTION: ",".join("LIBRARY_FUSION_TYPE_" + k.upper() for k in kinds)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file[:variant]")
    parser.add_argument(
        "--candidates", default="dot,reduce;dot;dot,eltwise,reduce",
        help="';'-separated flag values (or 'env'); speed-ups are relative to "
        "the first (by default jaxdpdm's own setting)")
    parser.add_argument("--programs", default=",".join(PROGRAMS),
                        help=f"comma-separated subset of {PROGRAMS}")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--pretrain-rows", type=int, default=64)
    parser.add_argument("--pretrain-augmult", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json-out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    args.candidates = [c.strip() for c in args.candidates.split(";") if c.strip()]
    args.programs = [p.strip() for p in args.programs.split(",") if p.strip()]
    try:
        for c in args.candidates:
            compiler_option(c)
    except ValueError as err:
        parser.error(str(err))
    if not args.candidates or not set(args.programs) <= set(PROGRAMS) or not args.programs:
        parser.error(f"need >= 1 candidate and programs from {PROGRAMS}")
    if min(args.num_classes, args.pretrain_rows, args.pretrain_augmult, args.repeats) < 1:
        parser.error("--num-classes, --pretrain-rows, --pretrain-augmult, --repeats must be >= 1")
    args.config_dict = load_config(args.config)
    return args


def lowered_programs(args) -> dict[str, tuple[Any, tuple]]:
    """program name -> (lowered program, its arguments), for `args.programs`."""
    config, out = args.config_dict, {}
    model = experiment.unet_config(config, args.num_classes)
    if "dp" in args.programs:
        rows = config.train.microbatch_size
        bench = dp_step.Bench(dataclasses.replace(model, conv_impl=experiment.conv_impl(config)),
                              augmult=config.diffusion.augmult, chunk_rows=rows)
        out["dp"] = bench.lowered("dp", rows)
    if "nonprivate" in args.programs:
        bench = dp_step.Bench(dataclasses.replace(model, conv_impl="xla"),
                              augmult=args.pretrain_augmult, chunk_rows=args.pretrain_rows)
        out["nonprivate"] = bench.lowered("nonprivate", args.pretrain_rows)
    if "sample" in args.programs:
        rows, size = config.sample.batch_size, model.image_size
        params = unet.init_params(model, jax.random.key(0))
        apply_fn = unet.make_apply_fn(model, train=False)
        x = jax.random.normal(jax.random.key(1), (rows, size, size, model.in_channels))
        t = jnp.full((rows,), 500, jnp.int32)
        y = jnp.arange(rows, dtype=jnp.int32) % args.num_classes
        forward = jax.jit(lambda p, x, t, y: apply_fn(p, x, t, y, None))
        out["sample"] = (forward.lower(params, x, t, y), (params, x, t, y))
    if "classifier" in args.programs:
        recipe = evaluation_run.downstream_config(config)
        step = classifier_training._compiled_train_step(  # pylint: disable=protected-access
            recipe.model, args.num_classes, recipe.optimizer, recipe.augment, recipe.crop_padding)
        size, channels, rows = model.image_size, model.in_channels, recipe.batch_size
        module = classifier_for(recipe.model, args.num_classes)
        params = init_classifier(module, jax.random.key(0), (size, size, channels))
        # The evaluation's own optimizer state (Adam for the CNN, momentum for the WRN).
        direction = classifier_training._update_direction(recipe.optimizer)  # pylint: disable=W0212
        rng = np.random.default_rng(0)
        step_args = (params, direction.init(params),
                     rng.integers(0, 256, (rows, size, size, channels)).astype(np.uint8),
                     np.arange(rows, dtype=np.int32) % args.num_classes,
                     np.arange(rows, dtype=np.int32), jax.random.key(2),
                     jnp.float32(recipe.learning_rate), jnp.float32(recipe.weight_decay))
        out["classifier"] = (step.lower(*step_args), step_args)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    load_before = harness.environment().get("loadavg")
    steps = {}
    for program, (lowered, call_args) in lowered_programs(args).items():
        for candidate in args.candidates:
            compiled = lowered.compile(compiler_options=compiler_option(candidate))
            steps[f"{program}/{candidate}"] = (
                lambda c=compiled, a=call_args: jax.block_until_ready(c(*a)))
    times = harness.time_interleaved(steps, args.repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    first = args.candidates[0]
    speedups = {name: medians[f"{name.split('/')[0]}/{first}"] / m for name, m in medians.items()}
    print(f"{args.config}: median of {args.repeats} interleaved repeats; speed-up = median of "
          f"'{first}' / median")
    for name, t in times.items():
        print(f"  {name:<40}{1e3 * medians[name]:9.1f} ms  (min {1e3 * min(t):.1f})  "
              f"speed-up {speedups[name]:.3f}")
    env = harness.environment()
    env["loadavg"] = (load_before or []) + (env.get("loadavg") or [])
    result = {
        "benchmark": "xla_options", "argv": sys.argv[1:] if argv is None else list(argv),
        "config": args.config, "candidates": args.candidates, "environment": env, "times_s": times,
        "medians_s": medians, "speedup_over_first": speedups
    }
    harness.emit_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
