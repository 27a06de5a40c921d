"""One prepared check of jaxdpdm on a single-GPU machine (no network, no TensorFlow needed).

    bash benchmarks/gpu_check.sh            # full: H200, < 8 minutes including compiles
    bash benchmarks/gpu_check.sh --smoke    # the same code paths, tiny preset, CPU, < 60 s
    bash benchmarks/gpu_check.sh --conv     # only: the two `conv_impl`s at K = 4 and K = 32
    bash benchmarks/gpu_check.sh --conv --smoke

Sections, in order of importance (the full run skips what would start after --budget-s):

1. DP invariants, on the device, with a real UNet: per-example clipped gradient norms <= C
   (and unclipped ones passed through unchanged); padding rows (even NaN images) contribute
   exactly nothing; a non-finite example is zeroed and counted; sigma = 0 with C = inf reproduces
   the plain mean gradient; the noise has std sigma * C / expected batch, is reproducible from
   (seed, step) and fresh at every step; TensorFlow was never imported.
2. DP step vs non-private step (benchmarks/dp_step.py's `Bench`): the 89M-parameter
   "paper_cifar" UNet at 32x32, K = 4, chunks of 256 (logical batch 1024 = 4 chunks, reusing the
   compiled programs), microbatches 64 and 128, bfloat16 and float32: time ratio, per-example
   cost, compiled footprint and allocator peak.
3. Sampling throughput: DDIM, 100 steps, images/s.
4. Accounting (CPU): epsilon for an illustrative CIFAR-10-sized run, only if `dp_accounting`
   can be imported (gpu_check.sh installs it from carried wheels in .whl/ if present; nothing is
   ever fetched from a network). Without it, the rest still runs: jaxdpdm.dp loads its
   accounting module (and dp_accounting) only on first use.

`--conv` runs only a step comparison of the UNet's two convolution implementations
(`UNetConfig.conv_impl`: "xla" and "patch_matmul", whose per-example kernel gradients are batched
matmuls): the 89M UNet, bfloat16, a chunk of 64 examples, K = 4 (one vmap of 64) and K = 32
(vmaps of 8, the CIFAR-10 configs' setting); DP and non-private for each, K = 4 first; no item
starts after --budget-s. Target: the DP step <= 2x the non-private step at K = 4 with an XLA
footprint per example not above today's ("xla").

Prints compact tables and a final JSON line; writes the JSON to --out, default $OUT/gpu_check.json
when $OUT is set (after every section, so a run cut short keeps what it measured).
Exit status 1 if an invariant fails; benchmark errors (e.g. out of memory) are recorded, not fatal.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# dp_step is imported from this folder, not as `benchmarks.dp_step`: Opacus installs a top-level
# package named `benchmarks` that would shadow this (namespace) folder.
for _path in (os.path.join(REPO_ROOT, "benchmarks"), REPO_ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def _prepare_environment(argv: list[str]) -> None:
    """Settings that must precede the first `import jax` (stdlib only)."""
    if "--smoke" in argv:
        # The smoke run checks code paths, not speed: CPU, and a cheap LLVM pipeline (compiling
        # the UNet's programs dominates a tiny run).
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_backend_optimization_level" not in flags:
            os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0 "
                                       "--xla_llvm_disable_expensive_passes=true").strip()
    if "--simulate-missing-dp-accounting" in argv:
        sys.modules["dp_accounting"] = None  # makes `import dp_accounting` fail, as on the GPU box


def _accounting_available() -> bool:
    """Whether dp_accounting imports here (jaxdpdm.dp loads it only on first use)."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    _prepare_environment(sys.argv[1:])
ACCOUNTING_AVAILABLE = _accounting_available()

# Imported after the environment is prepared (XLA flags are read when jax initialises).
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import dp_step  # noqa: E402
import harness  # noqa: E402
from jaxdpdm import diffusion, parallel, sampling  # noqa: E402
from jaxdpdm.dp import dp_aggregate  # noqa: E402
from jaxdpdm.models import unet  # noqa: E402


@dataclasses.dataclass(frozen=True)
class StepItem:
    """A DP-vs-non-private comparison (see dp_step.compare)."""
    preset: str
    image_size: int
    dtype: str
    chunk: int
    chunks: int
    microbatches: tuple[int, ...]
    nonprivate_microbatch: int
    augmult: int | None = None  # K; None: the plan's
    conv_impl: str = "xla"  # UNetConfig.conv_impl


@dataclasses.dataclass(frozen=True)
class SampleItem:
    """A DDIM sampling throughput measurement."""
    preset: str
    image_size: int
    dtype: str
    batch: int
    steps: int


@dataclasses.dataclass(frozen=True)
class Plan:
    invariants: tuple[str, int, int, int] | None  # preset, image size, rows, microbatch
    augmult: int
    repeats: int
    items: tuple[StepItem | SampleItem, ...]
    accounting: tuple[int, int, float, int]  # num examples, expected batch, sigma, steps
    budget_s: float


# The full plan aims at < 8 minutes on an H200 including compiles; no item starts after
# `budget_s`. Measured there (jax 0.11.2, 2026-11-28): invariants 119 s, each 89M-UNet step
# program ~90 s to compile (the first step item took 330 s), DDIM sampling 14 s. So the cheap
# sampling item runs first, then the step comparison; the rest (the batch-1024 item reuses the
# bfloat16 programs, float32 compiles anew) runs only on a faster-compiling setup.
FULL = Plan(
    invariants=("cpu_small", 16, 8, 4), augmult=4, repeats=3,
    items=(SampleItem("paper_cifar", 32, "bfloat16", 256,
                      100), StepItem("paper_cifar", 32, "bfloat16", 256, 1, (64, 128), 128),
           StepItem("paper_cifar", 32, "bfloat16", 256, 4, (64,),
                    128), StepItem("paper_cifar", 32, "float32", 256, 1, (64,),
                                   64), SampleItem("paper_cifar", 32, "float32", 256, 100)),
    accounting=(50_000, 1024, 1.0, 1000), budget_s=360.0)
# Smoke: the same sections and item kinds, at the fewest compiles (XLA:CPU compiles of the UNet
# dominate): the float32 items share the invariants' Bench and programs; bfloat16 runs in the
# sampler only (the step code does not depend on the dtype, the model does).
SMOKE = Plan(
    invariants=("tiny", 8, 4, 2), augmult=2, repeats=1,
    items=(SampleItem("tiny", 8, "bfloat16", 4, 5), StepItem("tiny", 8, "float32", 4, 1, (2,), 2),
           StepItem("tiny", 8, "float32", 4, 2, (2,),
                    2)), accounting=(1_000, 50, 1.0, 10), budget_s=300.0)


def _conv_items(preset, size, dtype, chunk, settings):
    """Step items comparing the conv implementations at each (K, DP microbatch) in settings."""
    return tuple(
        StepItem(preset, size, dtype, chunk, 1, (micro,), micro, augmult=k, conv_impl=impl)
        for k, micro in settings
        for impl in ("xla", "patch_matmul"))


# --conv: about 90 s of compile per 89M program on the H200 (section 3 of RESULTS.md), 2 per
# item, so K = 4 (4 programs) fits in ~7 minutes and K = 32 needs ~6 more: give it --budget-s.
CONV = Plan(invariants=None, augmult=4, repeats=3, items=_conv_items("paper_cifar", 32, "bfloat16",
                                                                     64, ((4, 64), (32, 8))),
            accounting=None, budget_s=420.0)
CONV_SMOKE = Plan(invariants=None, augmult=2, repeats=1,
                  items=_conv_items("tiny", 8, "float32", 4,
                                    ((2, 4), (4, 2))), accounting=None, budget_s=300.0)


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    value: float
    limit: float
    detail: str


def _flat(tree) -> np.ndarray:
    """All leaves as one float64 host vector: comparisons run in numpy, which compiles nothing
    (eager jnp ops on the ~100 differently shaped leaves would each compile a small kernel)."""
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| of two flat vectors."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_invariants(bench: dp_step.Bench, microbatch: int) -> list[Check]:
    """The DP invariants on the current device, with the Bench's UNet and loss."""
    checks = []
    rows, key, loss_fn = bench.chunk_rows, bench.key, bench.loss_fn
    if rows < 4 or rows % microbatch:
        raise ValueError(f"invariants need >= 4 rows, a multiple of {microbatch}; got {rows}")
    # Perturbed parameters: the UNet's output conv starts at zero, which would leave most
    # gradients exactly zero and the clipping checks nearly vacuous. Drawn on the host (numpy) to
    # avoid compiling one random kernel per parameter shape.
    rng = np.random.default_rng(7)
    params = jax.device_put(
        jax.tree.map(
            lambda x: np.asarray(x) + 0.02 * rng.standard_normal(x.shape).astype(np.float32),
            bench.params))

    # 1. sigma = 0 and C = inf: the DP step's update is exactly minus the mean gradient. The
    # update is applied to zero parameters so that it comes back exactly (p - u would lose bits).
    inf_optimizer = optax.chain(
        dp_aggregate(clip_norm=math.inf, noise_multiplier=0.0, expected_batch_size=rows, seed=0),
        optax.sgd(1.0))
    # Every sum below is computed as training computes it: one compiled call per microbatch.
    inf_step = parallel.make_dp_step(loss_fn, inf_optimizer, clip_norm=math.inf,
                                     microbatch_size=microbatch, mesh=bench.mesh)
    grad_sum, inf_stats = inf_step.grad_sum(params, bench.microbatches(microbatch), key)
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params)
    minus_mean, _ = inf_step.apply(zeros, inf_optimizer.init(zeros), grad_sum)
    nonprivate_sum = bench.grad_sum("nonprivate", microbatch, params,
                                    bench.microbatches(microbatch), key)
    err = _rel(-_flat(minus_mean), _flat(nonprivate_sum) / rows)
    checks.append(
        Check("sigma0_Cinf_equals_mean_grad", err <= 1e-4, err, 1e-4,
              "relative L2 error, DP step update vs batched mean gradient"))

    # 2. Clipping at C = median pre-clip norm: half the examples clipped, half passed through.
    # The Bench's own DP program is compiled at this C (a later timing of it is unaffected), so
    # the checks below run the exact program that is timed, one-example masks included.
    norms = np.asarray(inf_stats.norms, np.float64)
    if bench.has_program("dp", microbatch):
        raise ValueError("check_invariants must run before the Bench's DP program is compiled")
    bench.clip_norm = clip_norm = float(np.median(norms))

    def clipped_sum(batch, mask):
        return bench.grad_sum("dp", microbatch, params, bench.split(batch, mask, microbatch), key)

    host = bench.host_batch
    per_example = [_flat(clipped_sum(host, np.eye(rows, dtype=bool)[i])[0]) for i in range(rows)]
    clipped_norms = np.array([np.linalg.norm(g) for g in per_example])
    worst = float(np.max(clipped_norms / clip_norm))
    checks.append(
        Check("clipped_norm_le_C", worst <= 1 + 1e-5, worst, 1 + 1e-5,
              f"max per-example ||clip(g)|| / C over {rows} examples, C={clip_norm:.4g}"))
    small = norms <= clip_norm
    passthrough = float(np.max(np.abs(clipped_norms[small] - norms[small]) / norms[small]))
    checks.append(
        Check("unclipped_passed_through", passthrough <= 1e-4, passthrough, 1e-4,
              "relative norm change of examples with norm <= C"))
    full_sum, full_stats = clipped_sum(host, np.ones(rows, bool))
    count_ok = int(full_stats.num_clipped) == int(np.sum(~small))
    checks.append(
        Check("num_clipped_counts", count_ok, float(full_stats.num_clipped), float(np.sum(~small)),
              "examples with norm > C"))
    linear = _rel(_flat(full_sum), np.sum(per_example, axis=0))
    checks.append(
        Check("sum_of_per_example_terms", linear <= 1e-5, linear, 1e-5,
              "batch sum vs sum of one-example sums (no cross-example terms)"))

    # 3. Padding: the last 3 rows are padding, filled with NaN images or with other images.
    real = rows - 3
    mask = np.arange(rows) < real
    nan_batch = {k: v.copy() for k, v in host.items()}
    nan_batch["image"][real:] = np.nan
    other_batch = {k: v.copy() for k, v in host.items()}
    other_batch["image"][real:] = -other_batch["image"][real:]
    nan_sum, nan_stats = clipped_sum(nan_batch, mask)
    other_sum, _ = clipped_sum(other_batch, mask)
    nan_sum, other_sum = _flat(nan_sum), _flat(other_sum)
    pad_err = max(_rel(nan_sum, other_sum), _rel(nan_sum, np.sum(per_example[:real], axis=0)))
    pad_clean = (bool(np.all(np.isfinite(nan_sum))) and
                 float(np.max(np.abs(np.asarray(nan_stats.norms)[real:]))) == 0.0 and
                 int(nan_stats.num_nonfinite) == 0)
    checks.append(
        Check("padding_contributes_zero", pad_err <= 1e-5 and pad_clean, pad_err, 1e-5,
              "NaN or other padding vs the real rows' own sum; padding norms 0"))

    # 4. A non-finite real example is zeroed and counted, not allowed to poison the sum.
    bad_batch = {k: v.copy() for k, v in host.items()}
    bad_batch["image"][0] = np.nan
    bad_sum, bad_stats = clipped_sum(bad_batch, np.ones(rows, bool))
    bad_err = _rel(_flat(bad_sum), np.sum(per_example[1:], axis=0))
    checks.append(
        Check("nonfinite_example_zeroed", bad_err <= 1e-5 and int(bad_stats.num_nonfinite) == 1,
              bad_err, 1e-5, "sum with a NaN example vs the others' sum; counted once"))

    checks.extend(check_noise())
    checks.append(
        Check("no_tensorflow_imported", "tensorflow" not in sys.modules,
              float("tensorflow" in sys.modules), 0.0, "the GPU path imports no TF"))
    return checks


def check_noise() -> list[Check]:
    """dp_aggregate's noise on a zero sum: std sigma C / B, reproducible, fresh every step."""
    sigma, clip_norm, expected = 1.3, 0.7, 2.0
    agg = dp_aggregate(clip_norm=clip_norm, noise_multiplier=sigma, expected_batch_size=expected,
                       seed=11)
    zeros = {"a": jnp.zeros((1 << 20,), jnp.float32), "b": jnp.zeros((256, 256), jnp.float32)}
    update = jax.jit(lambda state: agg.update(zeros, state)[0])
    state0 = agg.init(zeros)
    first, again = _flat(update(state0)), _flat(update(state0))
    second = _flat(update(state0._replace(count=state0.count + 1)))
    target = sigma * clip_norm / expected
    std_err = abs(float(np.std(first)) / target - 1.0)
    mean_z = abs(float(np.mean(first))) / (target / math.sqrt(first.size))
    corr = abs(float(np.corrcoef(first, second)[0, 1]))
    return [
        Check("noise_std", std_err <= 0.01, std_err, 0.01,
              f"|std / (sigma C / B) - 1|, target {target:.4g}, n={first.size}"),
        Check("noise_mean", mean_z <= 5.0, mean_z, 5.0, "|mean| in standard errors"),
        Check("noise_reproducible", bool(np.array_equal(first, again)), 0.0, 0.0,
              "same (seed, step), same noise"),
        Check("noise_fresh_each_step", corr <= 0.01, corr, 0.01, "|correlation| of steps 0 and 1")
    ]


def bench_sampling(item: SampleItem, params, repeats: int) -> dict:
    """DDIM throughput of the item's UNet (class-conditional labels, no guidance)."""
    config = dp_step.model_config(item.preset, item.image_size, item.dtype)
    apply_fn = unet.make_apply_fn(config, train=False)
    schedule = diffusion.make_schedule("linear", 1000)
    sample_fn = sampling.make_sample_fn(
        lambda p, x, t, y: apply_fn(p, x, t, y, None), params, schedule,
        image_shape=(config.image_size, config.image_size, config.in_channels), method="ddim",
        num_steps=item.steps)
    labels = np.arange(item.batch, dtype=np.int32) % (config.num_classes or 1)
    start = time.perf_counter()
    images = jax.block_until_ready(sample_fn(jax.random.key(0), labels))
    first_s = time.perf_counter() - start
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(sample_fn(jax.random.key(i + 1), labels))
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {
        **dataclasses.asdict(item), "first_call_s": first_s, "median_s": median, "times": times,
        "images_per_s": item.batch / median, "finite": bool(np.all(np.isfinite(np.asarray(images))))
    }


def check_accounting(plan: Plan) -> dict:
    if plan.accounting is None:
        return {"skipped": "not in this plan"}
    """Epsilon of an illustrative run with both accountants (CPU), if dp_accounting imports."""
    if not ACCOUNTING_AVAILABLE:
        return {"skipped": "dp_accounting is not installed (no .whl/ wheels carried)"}
    from jaxdpdm.dp import accounting
    num_examples, expected, sigma, steps = plan.accounting
    q = expected / num_examples
    result = {
        "num_examples": num_examples, "sampling_rate": q, "noise_multiplier": sigma, "steps": steps,
        "delta": 1e-5
    }
    for name in ("pld", "rdp"):
        start = time.perf_counter()
        result[f"epsilon_{name}"] = accounting.epsilon(noise_multiplier=sigma, sampling_rate=q,
                                                       steps=steps, delta=1e-5, accountant=name)
        result[f"{name}_s"] = time.perf_counter() - start
    result["pld_le_rdp"] = result["epsilon_pld"] <= result["epsilon_rdp"] * (1 + 1e-6)
    return result


def format_report(results: dict) -> str:
    lines = [
        f"jaxdpdm gpu_check ({results['mode']}): {results['environment']}", "",
        f"{'invariant':<32}{'ok':<6}{'value':>12}{'limit':>10}  detail"
    ]
    for c in results["invariants"]:
        lines.append(f"{c['name']:<32}{'PASS' if c['passed'] else 'FAIL':<6}{c['value']:>12.3g}"
                     f"{c['limit']:>10.3g}  {c['detail']}")
    for step in results["steps"]:
        lines += [
            "", f"{step['preset']} {step['image_size']}x{step['image_size']} "
            f"({step['num_params']:,} params), conv_impl {step['conv_impl']}, "
            "ratio = DP / non-private",
            dp_step.format_table(step)
        ]
    if results["sampling"]:
        lines += [
            "", f"{'sampling':<14}{'dtype':<10}{'batch':>6}{'steps':>6}{'first_s':>9}"
            f"{'median_s':>10}{'img/s':>9}"
        ]
        for s in results["sampling"]:
            lines.append(f"{s['preset']:<14}{s['dtype']:<10}{s['batch']:>6}{s['steps']:>6}"
                         f"{s['first_call_s']:>9.2f}{s['median_s']:>10.3f}"
                         f"{s['images_per_s']:>9.1f}")
    lines += ["", f"accounting: {results['accounting']}"]
    for note in results["skipped"] + results["errors"]:
        lines.append(f"note: {note}")
    verdict = ("not run" if not results["invariants"] else
               "all passed" if results["invariants_passed"] else "FAILED")
    lines.append(f"elapsed {results['elapsed_s']:.1f} s; invariants {verdict}")
    return "\n".join(lines)


def _write_json(path: str | None, results: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1, sort_keys=True, default=str)
    os.replace(path + ".tmp", path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny preset on CPU (< 60 s)")
    parser.add_argument("--conv", action="store_true",
                        help="only compare the UNet's conv implementations (see above)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no benchmark item after this many seconds (plan default)")
    default_out = os.path.join(os.environ["OUT"], "gpu_check.json") if os.environ.get("OUT") \
        else None
    parser.add_argument("--out", default=default_out, help="JSON result path")
    parser.add_argument("--simulate-missing-dp-accounting", action="store_true",
                        help="behave as on a machine without dp_accounting (tests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = {(False, False): FULL, (True, False): SMOKE, (False, True): CONV,
            (True, True): CONV_SMOKE}[(args.smoke, args.conv)]
    budget = plan.budget_s if args.budget_s is None else args.budget_s
    start = time.perf_counter()
    env = harness.environment()
    env.update(accounting_available=ACCOUNTING_AVAILABLE, xla_flags=os.environ.get("XLA_FLAGS", ""))
    mode = ("conv_" if args.conv else "") + ("smoke" if args.smoke else "full")
    results = {
        "mode": mode, "environment": env, "invariants": [], "steps": [], "sampling": [],
        "accounting": {}, "skipped": [], "errors": [], "section_end_s": {}
    }
    benches: dict[tuple, dp_step.Bench] = {}

    def bench_for(preset, image_size, dtype, chunk, augmult=None, conv_impl="xla"):
        augmult = augmult or plan.augmult
        k = (preset, image_size, dtype, chunk, augmult, conv_impl)
        if k not in benches:
            config = dataclasses.replace(dp_step.model_config(preset, image_size, dtype),
                                         conv_impl=conv_impl)
            benches[k] = dp_step.Bench(config, augmult=augmult, chunk_rows=chunk)
        return benches[k]

    def params_for(preset, image_size):
        """Parameters of an existing Bench of this architecture (the same init), else fresh."""
        for (p, s, *_), bench in benches.items():
            if (p, s) == (preset, image_size):
                return bench.params
        return unet.init_params(dp_step.model_config(preset, image_size, "float32"),
                                jax.random.key(0))

    def finish_section(name):
        results["elapsed_s"] = time.perf_counter() - start
        results["section_end_s"][name] = round(results["elapsed_s"], 2)
        print(f"[{results['elapsed_s']:6.1f} s] done: {name}", flush=True)
        results["invariants_passed"] = (plan.invariants is None or bool(
            results["invariants"])) and all(c["passed"] for c in results["invariants"])
        _write_json(args.out, results)

    if plan.invariants is not None:
        preset, size, rows, micro = plan.invariants
        # Invariants run at full float32 precision: on GPUs, default-precision float32 matmuls use
        # TF32, whose rounding would swamp the 1e-5 tolerances (on CPU this changes nothing).
        precise = (contextlib.nullcontext()
                   if jax.default_backend() == "cpu" else jax.default_matmul_precision("highest"))
        try:
            with precise:
                checks = check_invariants(bench_for(preset, size, "float32", rows), micro)
        except Exception as err:  # noqa: BLE001  (a failed check; the benchmarks still run)
            checks = [
                Check("invariants_ran", False, 1.0, 0.0, f"{type(err).__name__}: {err}"[:400])
            ]
        results["invariants"] = [dataclasses.asdict(c) for c in checks]
        finish_section("invariants")

    for item in plan.items:
        if time.perf_counter() - start > budget:
            results["skipped"].append(f"{item} (time budget {budget:.0f} s spent)")
            continue
        try:
            if isinstance(item, StepItem):
                bench = bench_for(item.preset, item.image_size, item.dtype, item.chunk,
                                  item.augmult, item.conv_impl)
                step = dp_step.compare(bench, list(item.microbatches),
                                       nonprivate_microbatch=item.nonprivate_microbatch,
                                       repeats=plan.repeats, chunks=item.chunks)
                results["steps"].append({
                    "preset": item.preset, "image_size": item.image_size,
                    "num_params": bench.num_params, "conv_impl": item.conv_impl, **step
                })
            else:
                results["sampling"].append(
                    bench_sampling(item, params_for(item.preset, item.image_size), plan.repeats))
        except Exception as err:  # noqa: BLE001  (an OOM must not lose the other results)
            results["errors"].append(f"{item}: {type(err).__name__}: {str(err)[:400]}")
        finish_section(str(item))

    results["accounting"] = check_accounting(plan)
    finish_section("accounting")
    print(format_report(results))
    print(json.dumps(results, sort_keys=True, default=str))
    return 0 if results["invariants_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
