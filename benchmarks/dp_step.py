"""What privacy costs per training step: the DP-SGD step against the non-private step.

    python benchmarks/dp_step.py --preset=cpu_small --image-size=16 --batch=64 \\
        --microbatch=16,64 --augmult=4 --dtype=float32 --repeats=3

Both steps run the same UNet, the same per-example diffusion loss (K = --augmult draws of
timestep and noise per example), the same batch and the same Adam update, and both process the
batch the way the trainer does: one compiled call per microbatch, looped on the host, the sums
added on the device, then one update. So the ratio isolates what DP adds:

* DP step: `jaxdpdm.parallel.make_dp_step`, run by `DPStep.__call__` exactly as in training
  (per-example gradients via `vmap(grad)`, clipped and summed in float32, one call per
  microbatch; then one Gaussian noise draw and the division by the expected batch size).
* Non-private step: the gradient of the summed loss of each microbatch (one batched backward
  pass, no per-example gradients), one call per microbatch and added the same way, divided by
  the batch size. (With the microbatch equal to the batch this is one call, as in pretraining.)

The non-private step runs at one microbatch size (`--nonprivate-microbatch`, default the largest
DP microbatch, so the ratio at that size compares equal microbatches); the DP step runs at every
`--microbatch` size, which shows how the microbatch trades time for memory: `--batch` /
microbatch calls per step. (`clipped_grad_sum` can also scan over microbatches inside one call;
the trainer never does, so this benchmark does not either. Figures in RESULTS.md sections 1 and
3 were taken with that scan; see there.)

Each program is compiled once (ahead of time, so compile time is reported apart), called once to
warm up, then timed `--repeats` times; the median is reported. A logical batch of
`--chunks` x `--batch` rows reuses the same compiled programs (as a large Poisson draw does in
training). The microbatches live on the device before timing, so host-to-device copies are not
timed. Everything runs on ONE device (`jax.devices()[0]`): numbers are per chip.

Memory: `xla_mib` is the footprint of the gradient program of one microbatch (arguments +
outputs + temporaries, from XLA's memory analysis; every backend): compare programs with it.
`peak_mib` is the device allocator's peak (`memory_stats()`, GPU/TPU only) after the
measurement; JAX cannot reset it, so it is the process peak so far (DP programs run by increasing
microbatch, so it grows with them).

Output: a compact table, then one JSON line (also written to --json-out if given).
Used by benchmarks/gpu_check.py, which imports the `Bench` class.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":  # run as a script: use the jaxdpdm of this checkout
    sys.path.insert(0, os.path.dirname(_HERE))
if _HERE not in sys.path:  # harness sits next to this file (not an installed package)
    sys.path.insert(0, _HERE)
import harness  # noqa: E402
from jaxdpdm import diffusion, parallel  # noqa: E402
from jaxdpdm.dp import dp_aggregate, per_example_keys  # noqa: E402
from jaxdpdm.models import count_params, unet  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MIB = 2**20
# Fixed DP hyperparameters: timing does not depend on their values, only on the code path.
CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0


def model_config(preset: str, image_size: int | None, dtype: str) -> unet.UNetConfig:
    """The preset UNet at `image_size` (preset default if None) in compute dtype `dtype`."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    overrides: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if image_size is not None:
        overrides["image_size"] = image_size
    return unet.unet_preset(preset, **overrides)


def make_loss_fn(config: unet.UNetConfig, augmult: int):
    """`loss_fn(params, example, rng) -> f32[]`: the training loss of ONE example.

    The paper's fine-tuning loss: eps-MSE averaged over K draws, label dropout 0.1, dropout as
    configured in the preset. `example` = {"image": f32[H, W, C], "label": i32[], "index": i32[]}.
    """
    apply_fn = unet.make_apply_fn(config, train=True)
    schedule = diffusion.make_schedule("linear", 1000)
    timesteps = diffusion.TimestepDistribution.uniform(schedule.num_timesteps)
    conditional = config.num_classes is not None

    def loss_fn(params, example, rng):
        return diffusion.per_example_loss(apply_fn, params, example, rng, schedule=schedule,
                                          timestep_dist=timesteps, augmult=augmult,
                                          label_dropout=0.1 if conditional else 0.0,
                                          null_label=config.num_classes)

    return loss_fn


def synthetic_batch(config: unet.UNetConfig, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random images in [-1, 1]: {"image": f32[rows,H,W,C], "label": i32[rows], "index": i32[rows]}.

    The timing of a step does not depend on the pixel values, so no dataset is needed.
    """
    rng = np.random.default_rng(seed)
    shape = (rows, config.image_size, config.image_size, config.in_channels)
    return {
        "image": rng.uniform(-1.0, 1.0, shape).astype(np.float32),
        "label": rng.integers(0, config.num_classes or 1,
                              rows).astype(np.int32), "index": np.arange(rows, dtype=np.int32)
    }


def make_nonprivate_accumulate(loss_fn):
    """`(params, batch, step_key) -> grad_sum`: the float32 gradient of the SUMMED loss of a batch.

    One batched backward pass (no per-example gradients); the benchmark calls it once per
    microbatch and adds the results as the DP step does. Per-example keys are the DP step's (by
    "index").
    """

    def accumulate(params, batch, step_key):
        keys = per_example_keys(step_key, batch, batch["index"].shape[0])

        def summed(p):
            return jnp.sum(jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, batch, keys))

        return jax.tree.map(lambda g: g.astype(jnp.float32), jax.grad(summed)(params))

    return jax.jit(accumulate)


def memory_stats() -> dict[str, int] | None:
    """The first device's allocator statistics (None on CPU, where JAX does not report them)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    return dict(stats) if stats else None


def compiled_footprint(compiled) -> int | None:
    """Bytes of arguments + outputs + temporaries of one compiled program (minus aliasing)."""
    try:
        m = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
               m.alias_size_in_bytes)


# Adds two gradient sums on the device, as `DPStep` adds its chunks' sums.
_tree_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))


class Program(NamedTuple):
    """One compiled gradient program of one microbatch and what it took to build."""
    accumulate: Any
    compile_s: float
    xla_bytes: int | None


# Compiled optimizer updates, shared by every Bench: they see only float32 parameters and sums,
# so one update serves every compute dtype and microbatch (the noise draw alone is a sizeable
# compile). Keyed by (kind, clip norm, expected batch, parameter shapes).
_UPDATE_PROGRAMS: dict[tuple, tuple[Any, Any, float]] = {}


@dataclasses.dataclass
class Measurement:
    """Timing and memory of one step. Times in seconds; `times` are the timed repeats."""
    kind: str  # "nonprivate" | "dp"
    dtype: str
    batch: int  # rows of the logical batch (chunks x chunk rows)
    chunks: int
    microbatch: int
    augmult: int
    compile_s: float  # trace + compile of what this measurement had to build (else 0)
    warmup_s: float  # first call after compiling (allocations, GPU autotuning)
    median_s: float
    times: list[float]
    xla_mib: float | None
    peak_mib: float | None

    @property
    def ms_per_example(self) -> float:
        return 1e3 * self.median_s / self.batch


class Bench:
    """A model, its parameters and a synthetic chunk of rows; compiles programs on demand.

    Gradient programs take ONE microbatch (what the trainer compiles) and are cached by (kind,
    microbatch); update programs are shared across Benches, so timing a logical batch of several
    chunks, or another dtype, reuses what was compiled. `clip_norm` may be changed before the
    first DP program is compiled (timing does not depend on it; gpu_check sets it from measured
    gradient norms so its clipping checks reuse the program).
    """

    def __init__(self, config: unet.UNetConfig, *, augmult: int, chunk_rows: int, seed: int = 0):
        if chunk_rows < 1 or augmult < 1:
            raise ValueError(f"chunk_rows and augmult must be >= 1; got {chunk_rows}, {augmult}")
        self.config, self.augmult, self.chunk_rows = config, augmult, chunk_rows
        self.dtype = np.dtype(config.dtype).name
        self.clip_norm = CLIP_NORM
        self.loss_fn = make_loss_fn(config, augmult)
        self.mesh = parallel.make_data_mesh(jax.devices()[:1])
        # Parameters are float32 whatever the compute dtype, so they are initialised from the
        # float32 config: one init program (cached by jit) serves both dtypes.
        self.params = unet.init_params(dataclasses.replace(config, dtype=jnp.float32),
                                       jax.random.key(seed))
        self.num_params = count_params(self.params)
        self.host_batch = synthetic_batch(config, chunk_rows, seed)
        self.key = jax.random.key(seed + 1)
        self._programs: dict[tuple[str, int], Program] = {}
        self._microbatches: dict[int, list] = {}

    def split(self, batch: dict[str, np.ndarray], mask: np.ndarray, microbatch: int) -> list:
        """Host rows -> `[(batch, mask), ...]` of `microbatch` rows each, sharded on the device
        (the chunks `DPStep` takes; the trainer builds them with `batching.split_into_chunks`)."""
        rows = len(mask)
        if rows % microbatch:
            raise ValueError(f"{rows} rows are not a multiple of microbatch {microbatch}")
        return [
            parallel.shard_batch(({k: v[i:i + microbatch]
                                   for k, v in batch.items()}, mask[i:i + microbatch]), self.mesh)
            for i in range(0, rows, microbatch)
        ]

    def microbatches(self, microbatch: int) -> list:
        """The synthetic chunk as device-resident microbatches (cached), all rows real."""
        if microbatch not in self._microbatches:
            self._microbatches[microbatch] = self.split(self.host_batch,
                                                        np.ones(self.chunk_rows, bool), microbatch)
        return self._microbatches[microbatch]

    def _optimizer(self, kind: str):
        adam = optax.adam(1e-4)
        if kind == "nonprivate":
            return adam
        # The normaliser is a constant of the update, not of its cost: one chunk's rows.
        return optax.chain(
            dp_aggregate(clip_norm=self.clip_norm, noise_multiplier=NOISE_MULTIPLIER,
                         expected_batch_size=self.chunk_rows, seed=0), adam)

    def has_program(self, kind: str, microbatch: int) -> bool:
        return (kind, microbatch) in self._programs

    def lowered(self, kind: str, microbatch: int) -> tuple[Any, tuple]:
        """`(lowered, args)`: the gradient program of one microbatch traced and lowered, not yet
        compiled, and the arguments to call its compiled form with (see `program`)."""
        if self.chunk_rows % microbatch:
            raise ValueError(f"chunk of {self.chunk_rows} rows is not a multiple of microbatch "
                             f"{microbatch}")
        batch, mask = self.microbatches(microbatch)[0]
        if kind == "dp":
            step = parallel.make_dp_step(self.loss_fn, self._optimizer(kind),
                                         clip_norm=self.clip_norm, microbatch_size=microbatch,
                                         mesh=self.mesh)
            args = (self.params, batch, mask, self.key)
            return step.accumulate.lower(*args), args
        if kind == "nonprivate":
            args = (self.params, batch, self.key)
            return make_nonprivate_accumulate(self.loss_fn).lower(*args), args
        raise ValueError(f"kind must be 'dp' or 'nonprivate'; got {kind!r}")

    def program(self, kind: str, microbatch: int) -> Program:
        """The compiled gradient program of one microbatch (cached), AOT so compile time is its own.

        "dp": `(params, batch, mask, step_key) -> (grad_sum, ClipStats)`, the library's
        `make_dp_step(...).accumulate` on `microbatch` rows (one microbatch per device, as in
        training); "nonprivate": `(params, batch, step_key) -> grad_sum`.
        """
        if (kind, microbatch) in self._programs:
            return self._programs[(kind, microbatch)]
        start = time.perf_counter()
        compiled = self.lowered(kind, microbatch)[0].compile()
        program = Program(compiled, time.perf_counter() - start, compiled_footprint(compiled))
        self._programs[(kind, microbatch)] = program
        return program

    def update_program(self, kind: str):
        """`(compiled update, initial optimizer state, compile seconds)`, shared across Benches.

        "dp": the library's `DPStep.apply` (noise + Adam); "nonprivate": Adam on
        `grad_sum / rows`, with `rows` a runtime scalar.
        """
        shapes = tuple(x.shape for x in jax.tree.leaves(self.params))
        key = (kind, self.clip_norm if kind == "dp" else None, self.chunk_rows,
               jax.tree.structure(self.params), shapes)
        if key in _UPDATE_PROGRAMS:
            return _UPDATE_PROGRAMS[key]
        optimizer = self._optimizer(kind)
        opt_state = optimizer.init(self.params)
        grad_sum = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), self.params)
        start = time.perf_counter()
        if kind == "dp":
            step = parallel.make_dp_step(self.loss_fn, optimizer, clip_norm=self.clip_norm,
                                         microbatch_size=self.chunk_rows, mesh=self.mesh)
            compiled = step.apply.lower(self.params, opt_state, grad_sum).compile()
        else:

            @jax.jit
            def apply(params, state, grads_summed, rows):
                grads = jax.tree.map(lambda g: g / rows, grads_summed)
                updates, state = optimizer.update(grads, state, params)
                return optax.apply_updates(params, updates), state

            compiled = apply.lower(self.params, opt_state, grad_sum, 1.0).compile()
        _UPDATE_PROGRAMS[key] = (compiled, opt_state, time.perf_counter() - start)
        return _UPDATE_PROGRAMS[key]

    def dp_step(self, microbatch: int, update=None) -> parallel.DPStep:
        """The library's `DPStep` around this Bench's compiled DP programs. `update` None: no
        update is compiled, and only `DPStep.grad_sum` may be called."""
        return parallel.DPStep(accumulate=self.program("dp", microbatch).accumulate, apply=update,
                               mesh=self.mesh)

    def grad_sum(self, kind: str, microbatch: int, params, chunks: list, step_key):
        """The gradient sum of `chunks` (from `split`) as a training step computes it, one
        compiled call per microbatch: "dp" -> (grad_sum, ClipStats) by `DPStep.grad_sum`;
        "nonprivate" -> grad_sum."""
        if kind == "dp":
            return self.dp_step(microbatch).grad_sum(params, chunks, step_key)
        accumulate = self.program(kind, microbatch).accumulate
        total = None
        for batch, _ in chunks:
            part = accumulate(params, batch, step_key)
            total = part if total is None else _tree_add(total, part)
        return total

    def stepper(self, kind: str, microbatch: int, *, chunks: int = 1):
        """`(step, compile_s)`: `step()` runs ONE logical step from the state it left and blocks
        until it is done, so callers can interleave the steps of several programs.

        A step is `chunks` x `chunk_rows / microbatch` calls of the microbatch program, then one
        update: for "dp", `DPStep.__call__` itself. `compile_s` is what building this stepper
        had to compile (0 when cached).
        """
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1; got {chunks}")
        built = self.has_program(kind, microbatch)
        self.program(kind, microbatch)
        had_update = len(_UPDATE_PROGRAMS)
        update, opt_state, update_s = self.update_program(kind)
        compile_s = (0.0 if built else self.program(
            kind, microbatch).compile_s) + (update_s if len(_UPDATE_PROGRAMS) > had_update else 0.0)
        parts = self.microbatches(microbatch) * chunks
        rows = float(chunks * self.chunk_rows)
        dp_step = self.dp_step(microbatch, update) if kind == "dp" else None
        state = {"params": self.params, "opt_state": opt_state, "step": 0}

        def step():
            key = jax.random.fold_in(self.key, state["step"])
            params, opt_state = state["params"], state["opt_state"]
            if dp_step is not None:
                params, opt_state, _stats = dp_step(params, opt_state, parts, key)
            else:
                grad_sum = self.grad_sum(kind, microbatch, params, parts, key)
                params, opt_state = update(params, opt_state, grad_sum, rows)
            state["params"], state["opt_state"] = params, opt_state
            state["step"] += 1
            jax.block_until_ready((state["params"], state["opt_state"]))

        return step, compile_s

    def measure(self, kind: str, microbatch: int, *, repeats: int, chunks: int = 1) -> Measurement:
        """Compiles what is missing, warms up once, then times `repeats` steps."""
        if repeats < 1 or chunks < 1:
            raise ValueError(f"repeats and chunks must be >= 1; got {repeats}, {chunks}")
        step, compile_s = self.stepper(kind, microbatch, chunks=chunks)
        program = self.program(kind, microbatch)
        start = time.perf_counter()
        step()
        warmup_s = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        stats = memory_stats()
        peak = stats.get("peak_bytes_in_use") if stats else None
        xla = program.xla_bytes
        return Measurement(kind=kind, dtype=self.dtype, batch=chunks * self.chunk_rows,
                           chunks=chunks, microbatch=microbatch, augmult=self.augmult,
                           compile_s=compile_s, warmup_s=warmup_s,
                           median_s=statistics.median(times), times=times,
                           xla_mib=None if xla is None else xla / MIB,
                           peak_mib=None if peak is None else peak / MIB)


def compare(bench: Bench, microbatches: list[int], *, nonprivate_microbatch: int, repeats: int,
            chunks: int = 1) -> dict[str, Any]:
    """The non-private step, then the DP step at each microbatch (smallest first).

    Returns a JSON-able dict: the measurements and, per DP microbatch, `ratio` = DP median /
    non-private median and the per-example costs.
    """
    baseline = bench.measure("nonprivate", nonprivate_microbatch, repeats=repeats, chunks=chunks)
    rows = []
    for m in sorted(microbatches):
        dp = bench.measure("dp", m, repeats=repeats, chunks=chunks)
        rows.append({
            **dataclasses.asdict(dp), "ratio": dp.median_s / baseline.median_s,
            "ms_per_example": dp.ms_per_example,
            "extra_ms_per_example": dp.ms_per_example - baseline.ms_per_example
        })
    return {
        "nonprivate": {**dataclasses.asdict(baseline), "ms_per_example": baseline.ms_per_example},
        "dp": rows
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """A compact fixed-width table of one `compare` result."""
    header = (f"{'step':<11}{'dtype':<9}{'batch':>6}{'mb':>5}{'K':>3}{'compile_s':>10}"
              f"{'median_s':>10}{'ms/ex':>9}{'ratio':>7}{'xla_MiB':>9}{'peak_MiB':>9}")
    lines = [header, "-" * len(header)]
    entries = [("nonprivate", result["nonprivate"], None)]
    entries += [("dp", row, row["ratio"]) for row in result["dp"]]
    for name, row, ratio in entries:
        lines.append(f"{name:<11}{row['dtype']:<9}{row['batch']:>6}{row['microbatch']:>5}"
                     f"{row['augmult']:>3}{row['compile_s']:>10.2f}{row['median_s']:>10.4f}"
                     f"{row['ms_per_example']:>9.2f}{_fmt(ratio, '.2f'):>7}"
                     f"{_fmt(row['xla_mib'], '.0f'):>9}{_fmt(row['peak_mib'], '.0f'):>9}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=unet.PRESET_NAMES, default="cpu_small")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image height = width (default: the preset's)")
    parser.add_argument("--batch", type=int, default=64, help="rows per chunk (per step if "
                        "--chunks=1)")
    parser.add_argument("--chunks", type=int, default=1,
                        help="chunks per logical batch (logical batch = chunks x batch)")
    parser.add_argument("--microbatch", type=harness.int_list, default=[16, 64],
                        help="DP microbatch sizes, comma-separated; each divides --batch")
    parser.add_argument("--nonprivate-microbatch", type=int, default=None,
                        help="microbatch of the non-private step (default: largest --microbatch)")
    parser.add_argument("--augmult", type=int, default=4, help="K draws per example")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)
    args.nonprivate_microbatch = args.nonprivate_microbatch or max(args.microbatch)
    for m in args.microbatch + [args.nonprivate_microbatch]:
        if args.batch % m:
            parser.error(f"--batch={args.batch} is not a multiple of microbatch {m}")
    if min(args.batch, args.chunks, args.augmult, args.repeats) < 1:
        parser.error("--batch, --chunks, --augmult and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = model_config(args.preset, args.image_size, args.dtype)
    bench = Bench(config, augmult=args.augmult, chunk_rows=args.batch)
    result = compare(bench, args.microbatch, nonprivate_microbatch=args.nonprivate_microbatch,
                     repeats=args.repeats, chunks=args.chunks)
    result = {
        "benchmark": "dp_step", "argv": sys.argv[1:] if argv is None else list(argv),
        "preset": args.preset, "image_size": config.image_size, "num_params": bench.num_params,
        "environment": harness.environment(), **result
    }
    print(f"{args.preset} {config.image_size}x{config.image_size}, {bench.num_params:,} params, "
          f"K={args.augmult}, {args.repeats} repeats, median; ratio = DP / non-private")
    print(format_table(result))
    harness.emit_json(result, args.json_out)
    return result


if __name__ == "__main__":
    main()
