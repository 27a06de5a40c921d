"""The embedded default: public pretraining, then DP fine-tuning (epsilon = 10), on 8x8 digits.

    python -m jaxdpdm.main --config=configs/quickstart.py --workdir=runs/quickstart

One command runs the paper's two phases on scikit-learn's digits (no download), at their
native 8x8 resolution:

1. **Public pretraining, not private**: 600 steps of 64 images on the *public* part of the
   digits training split, a stratified fifth (288 of 1,442 images, `split_seed` 0), in
   `runs/quickstart/pretrain`. These 288 images get no protection: treating them as public
   is an assumption of this example.
2. **DP fine-tuning**: 40 DP-SGD steps on the *private* part (the other 1,154 images),
   Poisson-sampled with expected batch 128, K = 4, clip norm C = 1, sigma calibrated (PLD) to
   (10, 1e-5)-DP, starting from the pretrained EMA model, in `runs/quickstart`.

It leaves `grid_final.png` (one row per digit, classifier-free guidance scale 2), the privacy
report (which says which images are protected and which are not), and
`label_consistency.json`: the fraction of 300 class-conditional samples (30 per digit) that a
logistic regression fit on the real digits training split (96.6% accurate on the real test
split) labels as the digit they were generated for. That classifier reads the real training
split, private part included, so its number is not covered by the DP guarantee.

Measured on the 2-core development machine: benchmarks/RESULTS.md section 8 (label
consistency, wall and CPU time, the ablations behind these choices). Running the command again
resumes the phase it was in.

Variant `:tiny` (big_vision style, `jaxdpdm.recipes.parse_arg`): the single-phase DP run the
tests use (3 DP steps of a 49k-parameter UNet on all 1,442 training digits, a fixed seed, no
guidance, no label consistency), about a minute.
"""

from jaxdpdm.config import get_config as base_config
from jaxdpdm.recipes import parse_arg


def get_config(arg=None):
    variant = parse_arg(arg, name="quickstart", tiny=False)
    config = base_config()
    config.phase = "dp"
    data = config.data
    data.name = "digits"
    data.image_size = 8  # native: the digits are 8x8
    data.channels = 1
    data.public_fraction = 0.2
    data.subset = "private"
    data.split_seed = 0

    config.model.base_channels = 32
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (4,)

    config.diffusion.augmult = 4
    config.diffusion.label_dropout = 0.1  # trains the null label that guidance needs

    p = config.pretrain
    p.num_steps = 600
    p.batch_size = 64
    p.learning_rate = 2e-3
    p.warmup_steps = 50
    p.ema_decay = 0.99
    p.augmult = 1

    t = config.train
    t.num_steps = 40
    t.batch_size = 128
    t.microbatch_size = 32
    t.learning_rate = 5e-4
    t.warmup_steps = 5
    t.ema_decay = 0.9
    t.log_every = 10
    t.checkpoint_every = 200
    t.grid_per_class = 10

    config.dp.target_epsilon = 10.0
    config.dp.delta = 1e-5
    config.dp.clip_norm = 1.0
    # Per-example kernel gradients as batched matmuls: this DP step 1.06x faster than with XLA's
    # grouped convolutions on the 2-core CPU, and 3 s less to compile (benchmarks/conv_impl.py,
    # benchmarks/RESULTS.md section 21); same values.
    config.dp.conv_impl = "patch_matmul"

    config.sample.sampler = "ddim"
    config.sample.ddim_steps = 50
    config.sample.guidance_scale = 2.0
    config.sample.batch_size = 300
    config.eval.label_consistency_samples = 300

    if variant.tiny:
        config.seed = 0  # tests compare runs; a real run draws a secret seed
        data.public_fraction, data.subset = 0.0, "all"
        p.num_steps = 0
        config.model.base_channels = 8
        config.model.attention_resolutions = (4,)
        config.diffusion.augmult = 2
        t.num_steps = 3
        t.batch_size = 16
        t.microbatch_size = 8
        t.learning_rate = 2e-3
        t.warmup_steps = 10
        t.ema_decay = 0.98
        t.log_every = 1
        t.checkpoint_every = 2
        t.grid_per_class = 2
        config.sample.guidance_scale = 0.0
        config.sample.ddim_steps = 5
        config.sample.num_samples = 40
        config.sample.batch_size = 20
        config.eval.label_consistency_samples = 0
        config.eval.classifier_epochs = 2
    return config
