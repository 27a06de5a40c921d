"""The embedded default: DP training (epsilon = 10) on scikit-learn's digits at 16x16.

Needs no download and takes about 5 minutes on a 2-core CPU (measured: benchmarks/RESULTS.md),
leaving behind a sample grid (`grid_final.png`, one row per digit) and the privacy report. It
trains from scratch on 1,442 images for 100 steps, which is not enough for clean digits: the
paper's recipe gets its quality from pretraining on public data first (see the README's
two-phase recipe and configs/fashion_mnist_*.py).

Variants: `--config=configs/quickstart.py` (the default) and `--config=configs/quickstart.py:tiny`,
a version for tests that takes about a minute (8x8 images, a 49k-parameter UNet, 3 steps, a
fixed seed).
"""

from jaxdpdm.config import get_config as base_config


def get_config(arg=None):
    config = base_config()
    config.phase = "dp"
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.channels = 1

    config.model.base_channels = 16
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (8,)

    config.diffusion.augmult = 4
    config.diffusion.label_dropout = 0.1

    config.train.num_steps = 100
    config.train.batch_size = 128
    config.train.microbatch_size = 32
    config.train.learning_rate = 2e-3
    config.train.warmup_steps = 10
    config.train.ema_decay = 0.98
    config.train.log_every = 10
    config.train.checkpoint_every = 25

    config.dp.target_epsilon = 10.0
    config.dp.delta = 1e-5
    config.dp.clip_norm = 1.0

    config.sample.sampler = "ddim"
    config.sample.ddim_steps = 50

    if arg == "tiny":
        config.seed = 0  # tests compare runs; a real run draws a secret seed
        config.data.image_size = 8
        config.model.base_channels = 8
        config.model.channel_mult = (1, 2)
        config.model.attention_resolutions = (4,)
        config.diffusion.augmult = 2
        config.train.num_steps = 3
        config.train.batch_size = 16
        config.train.microbatch_size = 8
        config.train.log_every = 1
        config.train.checkpoint_every = 2
        config.train.grid_per_class = 2
        config.sample.ddim_steps = 5
        config.sample.num_samples = 40
        config.sample.batch_size = 20
        config.eval.classifier_epochs = 2
    elif arg not in (None, ""):
        raise ValueError(f"unknown quickstart variant {arg!r}; use '' or 'tiny'")
    return config
