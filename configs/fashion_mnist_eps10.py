"""CPU-scale phase 2: DP fine-tuning on the private 54,000 Fashion-MNIST images at epsilon 10.

    python -m jaxdpdm.main --config=configs/fashion_mnist_pretrain.py \\
        --workdir=runs/fashion_mnist_pretrain                       # phase 1, once
    python -m jaxdpdm.main --config=configs/fashion_mnist_eps10.py --workdir=runs/fmnist_eps10
    python -m jaxdpdm.main --config=configs/fashion_mnist_eps10.py --workdir=runs/fmnist_eps10 \\
        --mode=sample
    python -m jaxdpdm.main --config=configs/fashion_mnist_eps10.py --workdir=runs/fmnist_eps10 \\
        --mode=evaluate

`init_from` defaults to `runs/fashion_mnist_pretrain` (relative to the working directory), the
workdir of the command above; point it elsewhere with `--config.init_from=DIR`. The pretraining
run must use the same public/private split (`fashion_mnist_base` gives both phases the same
`public_fraction` and `split_seed`): a model pretrained on another split has seen private images,
and the guarantee below would not hold for them.

Privacy: (10, 1e-5)-DP for each of the 54,000 private images (delta = 1e-5 < 1/N = 1.9e-5), by
Poisson sampling with q = 256 / 54,000, clipping to C = 0.2 and Gaussian noise with sigma
calibrated (PLD) to spend exactly epsilon = 10 in 250 steps (sigma = 0.41; 0.80 at epsilon 1).
The 6,000 public images used in phase 1 are not protected (see configs/fashion_mnist_pretrain.py).

The clipping norm comes from public data only: per-example gradient norms of the pretrained
model under this fine-tuning loss, on 256 public images, were 0.10 / 0.21 / 0.36 (10th / 50th /
90th percentile). C = 0.2 clips about half of them and makes the noise (sigma * C) five times
smaller than the common default C = 1, under which almost nothing is clipped and the noise is
pure loss. Choosing C by looking at private gradients would itself leak information that the
accountant does not count (benchmarks/RESULTS.md section 6 tells how this value was reached).

The paper's fine-tuning techniques, at CPU scale (all numbers are our choices): augmentation
multiplicity K = 2 and the fine-tuning timestep mixture of configs/cifar10_eps10.py
(U[0, 200) w.p. 0.1, U[200, 800) w.p. 0.7, U[800, 1000) w.p. 0.2). Expected batch 256 (the
paper's 4096 would leave a dozen steps), 250 steps (1.2 epochs), Adam 3e-4 after 20 warm-up
steps, EMA 0.99 (the EMA starts from the pretrained model; 0.99^250 = 8% of it remains).

Cost, measured on the 2-core development machine (load average about 1.5, 2026-11-28;
benchmarks/RESULTS.md section 6): 0.15 steps/s, i.e. about 25 ms per example with K = 2, so the
250 steps took 29 minutes including compilation. A step processes the Poisson draw (about 256
examples) in chunks of `microbatch_size` = 32 rows, one compiled call each, only the last one
padded; peak memory is set by the 32-row microbatch (about 1 GB). Sampling 6,000 images with 50
DDIM steps took 10 minutes, and `--mode=evaluate` (the downstream CNN on them) 2 minutes; the
real-data reference classifier (`--config.eval.train_real_reference=True`) trains on 48,600 of
the private images (5,400 pick its epoch) and took 17 minutes more (91.21% test accuracy).

Variant `:smoke` (with configs/fashion_mnist_pretrain.py:smoke in
`runs/fashion_mnist_pretrain_smoke`): the whole chain in seconds, for tests.
"""

import pathlib
import runpy

# configs/ is not a package: load the sibling file by path (works from any working directory).
_PRETRAIN = runpy.run_path(str(pathlib.Path(__file__).with_name("fashion_mnist_pretrain.py")))
_CIFAR = runpy.run_path(str(pathlib.Path(__file__).with_name("cifar10_eps10.py")))


def fashion_mnist_dp_config(target_epsilon: float, arg=None):
    """DP fine-tuning of the phase-1 model on the private part at `target_epsilon`.

    Args:
      target_epsilon: the privacy target (delta is 1e-5).
      arg: "" / None, or "smoke" for the seconds-long test version.
    """
    config = _PRETRAIN["fashion_mnist_base"]("private")
    config.phase = "dp"
    config.init_from = _PRETRAIN["PRETRAIN_WORKDIR"]

    d = config.diffusion
    d.augmult = 2
    d.timestep_ranges = _CIFAR["FINETUNE_TIMESTEP_RANGES"]
    d.timestep_weights = _CIFAR["FINETUNE_TIMESTEP_WEIGHTS"]

    t = config.train
    t.num_steps = 250
    t.batch_size = 256
    t.microbatch_size = 32  # rows per compiled call (sets peak memory); see the docstring
    t.learning_rate = 3e-4
    t.warmup_steps = 20
    t.ema_decay = 0.99
    t.log_every = 5
    t.checkpoint_every = 25  # about 10 minutes of CPU time between checkpoints
    t.sample_every = 125
    t.grid_per_class = 6

    p = config.dp
    p.target_epsilon = float(target_epsilon)
    p.delta = 1e-5
    # About the median per-example gradient norm of the pretrained model under this loss on
    # the *public* images (p10/p50/p90 = 0.10/0.21/0.36; see the docstring). Not tuned on
    # private data, which would leak beyond the accounted epsilon.
    p.clip_norm = 0.2
    p.noise_multiplier = None  # calibrated
    p.accountant = "pld"

    if arg == "smoke":
        _PRETRAIN["shrink_for_smoke"](config)
        config.init_from = _PRETRAIN["SMOKE_PRETRAIN_WORKDIR"]
    elif arg not in (None, ""):
        raise ValueError(f"unknown Fashion-MNIST DP variant {arg!r}; use '' or 'smoke'")
    return config


def get_config(arg=None):
    return fashion_mnist_dp_config(10.0, arg)
