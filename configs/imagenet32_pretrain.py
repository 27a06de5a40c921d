"""Phase 1 of the paper's recipe: non-private pretraining on ImageNet 32x32 (1000 classes).

    python -m jaxdpdm.main --config=configs/imagenet32_pretrain.py --workdir=runs/imagenet32

The workdir it leaves is what `configs/cifar10_eps*.py` and `configs/camelyon17_eps10.py` load
with `--config.init_from=runs/imagenet32` (EMA parameters of the newest checkpoint; the
1000-class label embedding is re-initialised for the fine-tuning dataset's classes).

Where the values come from (Ghalebikesabi et al., 2023, arXiv 2302.13861):

* From the paper (abstract): a class-conditional diffusion model with more than 80M parameters,
  pretrained on ImageNet at 32x32 before DP fine-tuning.
* From the project tracker's summary of the paper's appendix (the appendix text could not be
  re-checked from this environment): a UNet of base width 192 with channel multipliers
  (1, 2, 2, 2) and self-attention at 16x16 and 8x8.
* Our choices (not taken from the paper): 2 residual blocks per level, 4 attention heads,
  dropout 0.1 (together: 89.9M parameters with the 1000-class embedding, 89.1M with 10 classes;
  the `paper_cifar` preset of `jaxdpdm.models.unet`); the linear DDPM schedule with T = 1000;
  label dropout 0.1 (so classifier-free guidance can be tried when sampling); random horizontal
  flips; K = 1 draw per example (augmentation multiplicity is a DP-fine-tuning device); batch
  1024, Adam at 2e-4 after 1000 warm-up steps, EMA 0.9999, 250k steps (200 epochs of the
  1,281,167 training images); bfloat16 compute with float32 parameters.

Data: TFDS `imagenet_resized/32x32` (splits "train" and "validation"), loaded whole into host
memory as uint8 (1.28M x 32 x 32 x 3 = 3.9 GB). It must be prepared beforehand, e.g.
`tfds build imagenet_resized/32x32 --data_dir=DIR` (see the TFDS catalogue for where the
downsampled ImageNet files come from), then `--config.data.data_dir=DIR`.

Compute and memory (estimates, not measurements on an accelerator): the non-private step
averages the gradient over `train.batch_size / num_devices` examples per device without
microbatching (`microbatch_size` only applies to DP runs): 128 examples per device on 8
accelerators, i.e. roughly 13 GB of activations (XLA:CPU's buffer assignment for this UNet in
bfloat16 implies about 0.1 GB per image in flight; see configs/cifar10_eps10.py). One forward
pass of this UNet costs about 26 GFLOP per 32x32 image (XLA cost analysis), a training example
about three times that, so 250k steps x 1024 examples are about 2e19 FLOP. On one NVIDIA H200
a non-private training draw measured 0.24 ms in bfloat16 (benchmarks/RESULTS.md section 3), so
the run is about 17 H200-hours (an estimate from that per-draw cost). Shorten with
`--config.train.num_steps`.
"""

from jaxdpdm.config import get_config as base_config


def set_paper_unet(config):
    """Sets `config.model` to the paper-scale (>80M parameter) class-conditional UNet.

    The pretraining and every fine-tuning config call this one function, so their architectures
    cannot drift apart (`init_from` needs identical parameter shapes, bar the label embedding).
    """
    m = config.model
    m.base_channels = 192
    m.channel_mult = (1, 2, 2, 2)
    m.num_res_blocks = 2
    m.attention_resolutions = (16, 8)
    m.num_heads = 4
    m.dropout = 0.1
    m.resblock_updown = False
    m.class_conditional = True
    # bfloat16 activations with float32 parameters, gradient sums and noise: the usual mixed
    # precision on TPUs and recent GPUs; set "float32" for exact-arithmetic comparisons.
    m.dtype = "bfloat16"
    return config


def get_config(arg=None):
    if arg not in (None, ""):
        raise ValueError(f"imagenet32_pretrain has no variants (got {arg!r})")
    config = set_paper_unet(base_config())
    config.phase = "pretrain"

    config.data.name = "tfds:imagenet_resized/32x32"
    config.data.image_size = 32
    config.data.channels = 3
    config.data.split = "train"
    config.data.test_split = "validation"  # imagenet_resized has no "test" split

    config.diffusion.num_timesteps = 1000
    config.diffusion.schedule = "linear"
    config.diffusion.augmult = 1
    config.diffusion.random_flip = True
    config.diffusion.label_dropout = 0.1
    config.diffusion.timestep_ranges = ((0, 1000),)
    config.diffusion.timestep_weights = (1.0,)

    config.train.num_steps = 250_000
    config.train.batch_size = 1024
    config.train.microbatch_size = 64  # unused by non-private steps (see the module docstring)
    config.train.learning_rate = 2e-4
    config.train.warmup_steps = 1000
    config.train.weight_decay = 0.0
    config.train.ema_decay = 0.9999
    config.train.log_every = 100
    config.train.checkpoint_every = 5000
    config.train.keep_checkpoints = 3
    # The grid has one row per class: with 1000 classes it is drawn once, at the end, with one
    # image per class.
    config.train.sample_every = 0
    config.train.grid_per_class = 1

    config.sample.sampler = "ddim"
    config.sample.ddim_steps = 100
    config.sample.num_samples = 10_000
    config.sample.batch_size = 500

    config.eval.classifier = "wrn16_4"
    config.eval.augment = "cifar"
    return config
