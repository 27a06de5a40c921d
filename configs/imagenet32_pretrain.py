"""Phase 1 of the paper's recipe: non-private pretraining on ImageNet 32x32 (1000 classes).

    python -m jaxdpdm.main --config=configs/imagenet32_pretrain.py --workdir=runs/imagenet32

The workdir it leaves is what `configs/cifar10.py` and `configs/camelyon17.py` load with
`--config.init_from=runs/imagenet32` (EMA parameters of the newest checkpoint; the 1000-class
label embedding is re-initialised for the fine-tuning dataset's classes).

Where the values come from: the `# paper` / `# paper (appendix)` / `# ours` tags next to them
(legend in `jaxdpdm/recipes.py`). The model is `recipes.paper_unet`, shared with every fine-tuning
config: a class-conditional UNet of more than 80M parameters (paper), base width 192, channel
multipliers (1, 2, 2, 2), attention at 16x16 and 8x8 (paper, appendix); 89.9M parameters with the
1000-class embedding; bfloat16 compute with float32 parameters.

Data: TFDS `imagenet_resized/32x32` (splits "train" and "validation"), loaded whole into host
memory as uint8 (1.28M x 32 x 32 x 3 = 3.9 GB). It must be prepared beforehand, e.g.
`tfds build imagenet_resized/32x32 --data_dir=DIR` (see the TFDS catalogue for where the
downsampled ImageNet files come from), then `--config.data.data_dir=DIR`.

Compute and memory: the non-private step averages the gradient over `train.batch_size /
num_devices` examples per device without microbatching (`microbatch_size` only applies to DP
runs): 128 examples per device on 8 accelerators, i.e. roughly 13 GB of activations (XLA:CPU's
buffer assignment for this UNet in bfloat16 implies about 0.1 GB per image in flight). The
measured per-draw cost on one NVIDIA H200 and the device-hour estimate of this run are in
benchmarks/RESULTS.md section 3. Shorten with `--config.train.num_steps`.

No variants.
"""

from jaxdpdm.config import get_config as base_config
from jaxdpdm.recipes import paper_unet, parse_arg


def get_config(arg=None):
    parse_arg(arg, name="imagenet32_pretrain")  # no variants: refuses any
    config = paper_unet(base_config())
    config.phase = "pretrain"

    config.data.name = "tfds:imagenet_resized/32x32"  # paper: ImageNet at 32x32
    config.data.image_size = 32
    config.data.channels = 3
    config.data.split = "train"
    config.data.test_split = "validation"  # imagenet_resized has no "test" split

    config.diffusion.num_timesteps = 1000  # ours
    config.diffusion.schedule = "linear"  # ours
    config.diffusion.augmult = 1  # ours (augmentation multiplicity is a DP-fine-tuning device)
    config.diffusion.random_flip = True  # ours
    config.diffusion.label_dropout = 0.1  # ours (so classifier-free guidance can be tried)
    config.diffusion.timestep_ranges = ((0, 1000),)
    config.diffusion.timestep_weights = (1.0,)

    config.train.num_steps = 250_000  # ours: 200 epochs of the 1,281,167 training images
    config.train.batch_size = 1024  # ours
    config.train.microbatch_size = 64  # unused by non-private steps (see the module docstring)
    config.train.learning_rate = 2e-4  # ours (Adam)
    config.train.warmup_steps = 1000  # ours
    config.train.weight_decay = 0.0  # ours
    config.train.ema_decay = 0.9999  # ours
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
