"""Pieces shared by the experiment files in `configs/`, importable from any working directory.

`python -m jaxdpdm.main --config=configs/X.py` loads one file by path; that file builds its config
from `jaxdpdm.config.get_config()` and the pieces below, and sets only what differs. Config files
never load each other, so editing one experiment cannot silently change another, and the pieces
that must agree between phases (the paper UNet, the Fashion-MNIST split) exist once.

Variants (`--config=configs/X.py:VARIANT`) follow big_vision's `parse_arg` convention:
comma-separated `key=value` pairs or bare `key`s (booleans, True), e.g.
`configs/cifar10.py:eps=1` or `configs/fashion_mnist.py:eps=1,smoke`; see `parse_arg`.

Provenance tags next to values: `# paper` from Ghalebikesabi et al., 2023 (arXiv 2302.13861),
abstract; `# paper (appendix)` from the project tracker's summary of the paper's appendix (the
appendix could not be re-checked from this environment); `# ours` our choice.
"""

from __future__ import annotations

import ml_collections

from jaxdpdm.config import get_config as base_config
from jaxdpdm.models import unet

_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _convert(name: str, key: str, text: str, default):
    """`text` as the type of `default` (bool, int, float or str)."""
    if isinstance(default, bool):
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError(f"{name} variant {key}={text}: expected true or false")
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                raise ValueError(f"{name} variant {key}={text}: expected {kind.__name__}") from None
    return text


def parse_arg(arg: str | None, *, name: str, **defaults) -> ml_collections.ConfigDict:
    """The values of a config file's variant string, big_vision style.

    Args:
      arg: what follows `:` in `--config=FILE:ARG` (None or "" without one): comma-separated
        `key=value` or bare `key` (sets a boolean to True), e.g. "eps=1,smoke".
      name: the config file's name, for error messages.
      **defaults: every key the file accepts and its default value; a value given in `arg` is
        converted to the type of its default.

    Returns:
      A ConfigDict with one field per key of `defaults`.

    Raises:
      ValueError: an unknown key or a value of the wrong type (main prints it as one line).
    """
    values = dict(defaults)
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, text = item.partition("=")
        key = key.strip()
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ValueError(f"unknown {name} variant {key!r}; known: {known}")
        if not sep:
            if not isinstance(defaults[key], bool):
                raise ValueError(f"{name} variant {key} needs a value ({key}=...)")
            values[key] = True
        else:
            values[key] = _convert(name, key, text.strip(), defaults[key])
    return ml_collections.ConfigDict(values)


# --- the paper's model and DP fine-tuning -------------------------------------------------------


def paper_unet(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Sets `config.model` to the paper-scale (>80M parameter) class-conditional UNet.

    The architecture is the `paper_cifar` preset of `jaxdpdm.models.unet`, its one definition
    (with the provenance of each value), which the benchmarks measure too. The pretraining and
    every fine-tuning config call this one function, so their architectures cannot drift apart
    (`init_from` needs identical parameter shapes, bar the label embedding). 89.9M parameters
    with 1000 classes, 89.1M with 10.
    """
    architecture = unet.unet_preset("paper_cifar")  # attention at 16x16 and 8x8 of 32x32
    m = config.model
    for field in ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                  "num_heads", "dropout", "resblock_updown"):
        setattr(m, field, getattr(architecture, field))
    m.class_conditional = True  # paper
    # bfloat16 activations with float32 parameters, gradient sums and noise: the usual mixed
    # precision on TPUs and recent GPUs; set "float32" for exact-arithmetic comparisons.
    m.dtype = "bfloat16"  # ours
    return config


# The fine-tuning timestep mixture (ranges [lo, hi) of T = 1000 and their weights). The paper
# fine-tunes with a modified, non-uniform timestep distribution; these numbers are ours: the
# pretrained model already denoises the nearly clean and the nearly pure-noise ends generically,
# the dataset-specific content is decided in between, so most of the privacy budget goes there.
FINETUNE_TIMESTEP_RANGES = ((0, 200), (200, 800), (800, 1000))  # ours
FINETUNE_TIMESTEP_WEIGHTS = (0.1, 0.7, 0.2)  # ours


def finetune_timesteps(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Sets the fine-tuning timestep mixture (`FINETUNE_TIMESTEP_*`) in `config.diffusion`."""
    config.diffusion.timestep_ranges = FINETUNE_TIMESTEP_RANGES
    config.diffusion.timestep_weights = FINETUNE_TIMESTEP_WEIGHTS
    return config


def paper_dp_finetuning(target_epsilon: float) -> ml_collections.ConfigDict:
    """The paper-scale DP fine-tuning recipe without the dataset (`config.data` is the caller's).

    Model, diffusion, optimisation, privacy and sampling settings shared by every fine-tuning
    config of the paper (CIFAR-10 at several epsilons, Camelyon17). `init_from` is left unset:
    without the ImageNet32-pretrained model (configs/imagenet32_pretrain.py) it does not apply.
    Sigma is calibrated (PLD) to spend exactly the target in 1000 steps: at q = 4096 / 50000
    about 1.49 at epsilon 10, 2.45 at 5, 9.74 at 1.
    """
    config = paper_unet(base_config())
    config.phase = "dp"
    config.init_from = None  # set to the ImageNet32 pretraining workdir
    # The pretrained label embedding has 1000 + 1 rows; the fine-tuning data has fewer classes.
    config.init_reinit = "label_embed"

    d = config.diffusion
    d.num_timesteps = 1000  # must match the pretraining
    d.schedule = "linear"  # must match the pretraining
    d.augmult = 32  # paper: augmentation multiplicity; K = 32 is ours (DPDM's value)
    d.random_flip = True  # ours (part of each augmentation draw)
    d.label_dropout = 0.1  # ours
    finetune_timesteps(config)  # paper: a modified timestep distribution; the mixture is ours

    t = config.train
    t.num_steps = 1000  # ours: 82 epochs at q = 4096 / 50000
    t.batch_size = 4096  # paper (appendix): expected (Poisson) batch size q * N
    # ours: examples per device and compiled call; sets peak memory (m float32 per-example
    # gradients of 89M parameters, 0.36 GB each, plus the activations of m x K images).
    t.microbatch_size = 8
    t.learning_rate = 2e-4  # ours (Adam)
    t.warmup_steps = 50  # ours
    t.weight_decay = 0.0  # ours
    # ours: the EMA starts from the pretrained weights; after 1000 steps 0.995 keeps 0.7% of them
    # (0.999 would keep 37%).
    t.ema_decay = 0.995
    t.log_every = 10
    t.checkpoint_every = 50
    t.keep_checkpoints = 3
    t.sample_every = 250
    t.grid_per_class = 6

    p = config.dp
    p.target_epsilon = float(target_epsilon)  # paper: 1, 5 and 10
    p.delta = 1e-5  # paper (appendix)
    p.clip_norm = 1.0  # ours
    p.noise_multiplier = None  # calibrated to spend exactly target_epsilon in num_steps steps
    p.accountant = "pld"  # ours

    s = config.sample
    s.sampler = "ddpm"  # ours: ancestral sampling, 1000 steps
    s.num_samples = 50_000  # ours
    s.batch_size = 1000
    s.guidance_scale = 0.0  # ours

    config.eval.classifier = "wrn16_4"  # paper: the downstream WRN-16-4
    config.eval.augment = "cifar"
    return config


# --- Fashion-MNIST at CPU scale (no Fashion-MNIST experiment in the paper: all values ours) ----

# The public/private split of the Fashion-MNIST training set shared by both phases.
FASHION_MNIST_PUBLIC_FRACTION = 0.1
FASHION_MNIST_SPLIT_SEED = 0
# Where configs/fashion_mnist_pretrain.py[:smoke] is run in the README and the tests; the DP
# fine-tuning configs read their `init_from` default from here.
FASHION_MNIST_PRETRAIN_WORKDIR = "runs/fashion_mnist_pretrain"
FASHION_MNIST_SMOKE_PRETRAIN_WORKDIR = "runs/fashion_mnist_pretrain_smoke"


def fashion_mnist_base(subset: str) -> ml_collections.ConfigDict:
    """Data, UNet, diffusion, sampling and evaluation settings shared by every Fashion-MNIST config.

    Native 28x28 (levels 28, 14, 7), base width 16, channel_mult (1, 2, 2), one residual block
    per level, attention at 7x7: 300,641 parameters. Both phases take the public/private split
    from here (same `public_fraction` and `split_seed`), so they cannot disagree.

    Args:
      subset: "public" (pretraining) or "private" (DP fine-tuning) part of the training set.
    """
    config = base_config()
    data = config.data
    data.name = "fashion_mnist"
    data.image_size = 28
    data.channels = 1
    data.split = "train"
    data.test_split = "test"
    data.public_fraction = FASHION_MNIST_PUBLIC_FRACTION
    data.subset = subset
    data.split_seed = FASHION_MNIST_SPLIT_SEED

    m = config.model
    m.base_channels = 16
    m.channel_mult = (1, 2, 2)
    m.num_res_blocks = 1
    m.attention_resolutions = (7,)
    m.num_heads = 2
    m.dropout = 0.0
    m.resblock_updown = False
    m.class_conditional = True
    m.dtype = "float32"

    d = config.diffusion
    d.num_timesteps = 1000
    d.schedule = "linear"
    # No flips: Fashion-MNIST's shoes all point the same way; a flipped shoe keeps its label but
    # is an image the data never shows, which the model would then learn to generate.
    d.random_flip = False
    d.label_dropout = 0.1

    s = config.sample
    s.sampler = "ddim"
    s.ddim_steps = 25  # ours
    s.eta = 0.0
    # ours: chosen on the real *public* images with benchmarks/sampler_sweep.py (guidance 0, 1, 3:
    # guidance raised label consistency but lowered what a classifier learns from the samples;
    # benchmarks/RESULTS.md section 11). Guidance 0.3 at 50,000 samples lowered the selection
    # metric too (88.3% -> 87.9%, section 18c), at twice the sampling cost.
    s.guidance_scale = 0.0
    # ours: more samples raised the selection metric (synthetic-trained CNN scored on the real
    # public images): 4,000 -> 20,000 80.1% -> 84.6% (benchmarks/RESULTS.md section 12), and
    # 10,000 / 20,000 / 50,000 82.0% / 84.9% / 86.7% (section 16). 50,000 costs about 30 min of
    # sampling on a 2-core CPU.
    s.num_samples = 50000
    s.batch_size = 500

    e = config.eval
    e.classifier = "cnn"
    e.augment = "mnist"
    # ours (DPDM's CNN recipe trains 20): with 20 epochs the synthetic validation accuracy and the
    # selection metric were still rising; 40 raised the selection metric from 86.7% to 88.3% and
    # 87.8% on two 50,000-sample sets (benchmarks/RESULTS.md section 18). The public-only and
    # public + synthetic classifiers train 40 too. Evaluation then takes about 45 min on a 2-core
    # CPU (20 min with eval.public_mix=False; 70 / 33 min before jaxdpdm/host_malloc.py).
    e.classifier_epochs = 40
    # The real-data reference classifier costs 9x the synthetic one on a CPU (54,000 images);
    # turn it on with --config.eval.train_real_reference=True.
    e.train_real_reference = False
    return config


def shrink_for_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Seconds-long version of a Fashion-MNIST config (12x12 images, a tiny UNet, 256 examples,
    2 steps, 40 samples), for tests of the whole chain.

    The UNet keeps every kind of block but not their number (levels 12 and 6, one residual block
    each, attention at 6x6): a run of two steps is dominated by compiling its programs, whose size
    grows with the number of blocks."""
    config.data.image_size = 12
    config.data.max_examples = 256
    config.model.base_channels = 8
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (6,)
    config.diffusion.augmult = min(config.diffusion.augmult, 2)
    t = config.train
    t.num_steps = 2
    t.batch_size = 16
    t.microbatch_size = 8
    t.warmup_steps = 1
    t.log_every = 1
    t.checkpoint_every = 1
    t.grid_per_class = 1
    s = config.sample
    s.ddim_steps = 3
    s.num_samples = 40
    s.batch_size = 20
    config.eval.classifier_epochs = 1
    return config
