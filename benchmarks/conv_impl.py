"""Which `dp.conv_impl` makes a config's DP step faster on this machine: both, side by side.

    python benchmarks/conv_impl.py --config=configs/fashion_mnist.py --repeats=5
    python benchmarks/conv_impl.py --config=configs/quickstart.py --nonprivate

The two implementations of the UNet's convolutions (`jaxdpdm.models.layers.CONV_IMPLS`) compute
the same values and gradients; they differ in how the per-example kernel gradients of a DP step
are computed: "xla" leaves it to XLA (under `vmap`, a grouped convolution with one group per
example), "patch_matmul" computes each kernel tap's gradient as one batched matmul. Which is
faster depends on the shapes (rows per call = microbatch x K x H x W, channel widths) and the
machine (benchmarks/RESULTS.md section 21), so a recipe sets `dp.conv_impl` from this benchmark.

The model is the config's (`experiment.unet_config`, `--num-classes` classes), at its K
(`diffusion.augmult`) and its microbatch (`train.microbatch_size`), unless overridden. A timed
step is `--batch` rows (default two microbatches): one compiled call per microbatch, then the
noise and the Adam update, exactly as `DPStep` runs in training (`dp_step.Bench`; the loss
draws uniform timesteps, which costs what the config's mixture costs). Both steps are compiled,
warmed up, then timed interleaved (one of each per repeat), so a load change hits both alike;
medians, the load average and the ratio are printed, then one JSON line (also to --json-out).
`--nonprivate` also times the non-private step (batched gradient) with each implementation,
which is why non-private training always uses "xla" (`experiment.conv_impl`).
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

from jaxdpdm import experiment  # noqa: E402
from jaxdpdm.models.layers import CONV_IMPLS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file[:variant]")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--augmult", type=int, default=None, help="K (default: the config's)")
    parser.add_argument("--microbatch", type=int, default=None,
                        help="rows per compiled call (default: train.microbatch_size)")
    parser.add_argument("--batch", type=int, default=None,
                        help="rows per timed step, a multiple of the microbatch (default: 2 "
                        "microbatches)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nonprivate", action="store_true",
                        help="also time the non-private step with each implementation")
    parser.add_argument("--json-out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    args.augmult = args.augmult or config.diffusion.augmult
    args.microbatch = args.microbatch or config.train.microbatch_size
    args.batch = args.batch or 2 * args.microbatch
    if min(args.augmult, args.microbatch, args.batch, args.repeats, args.num_classes) < 1:
        parser.error("--augmult, --microbatch, --batch, --repeats, --num-classes must be >= 1")
    if args.batch % args.microbatch:
        parser.error(f"--batch={args.batch} is not a multiple of microbatch {args.microbatch}")
    args.model = experiment.unet_config(config, args.num_classes)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    kinds = ("dp", "nonprivate") if args.nonprivate else ("dp",)
    load_before = harness.environment().get("loadavg")
    steps, compile_s = {}, {}
    for impl in CONV_IMPLS:
        bench = dp_step.Bench(dataclasses.replace(args.model, conv_impl=impl),
                              augmult=args.augmult, chunk_rows=args.batch)
        for kind in kinds:
            name = f"{kind}/{impl}"
            steps[name], compile_s[name] = bench.stepper(kind, args.microbatch)
    times = harness.time_interleaved(steps, args.repeats)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {kind: medians[f"{kind}/xla"] / medians[f"{kind}/patch_matmul"] for kind in kinds}
    m = args.model
    print(f"{args.config}: {m.image_size}x{m.image_size}, {bench.num_params:,} params, "
          f"K={args.augmult}, microbatch {args.microbatch}, {args.batch} rows per step, "
          f"median of {args.repeats} interleaved repeats")
    for name, t in times.items():
        print(f"  {name:<24}{medians[name]:8.3f} s  (min {min(t):.3f}, max {max(t):.3f}; "
              f"compile {compile_s[name]:.1f} s)")
    for kind, ratio in ratios.items():
        faster = "patch_matmul" if ratio > 1 else "xla"
        print(f"  {kind}: xla / patch_matmul = {ratio:.2f} ({faster} is faster)")
    env = harness.environment()
    env["loadavg"] = (load_before or []) + (env.get("loadavg") or [])
    result = {
        "benchmark": "conv_impl", "argv": sys.argv[1:] if argv is None else list(argv),
        "config": args.config, "num_params": bench.num_params, "image_size": m.image_size,
        "augmult": args.augmult, "microbatch": args.microbatch, "batch": args.batch,
        "environment": env, "times_s": times, "medians_s": medians, "compile_s": compile_s,
        "ratio_xla_over_patch_matmul": ratios
    }
    harness.emit_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
