"""The base configuration: every field jaxdpdm reads, documented in one place.

`configs/default.py` exposes it to `--config=`; experiment files (`configs/quickstart.py`,
`configs/cifar10.py`, ...) call `jaxdpdm.config.get_config()` and override a few fields.
Every field can also be overridden on the command line, e.g.
`--config.train.num_steps=3 --config.dp.target_epsilon=1`.

`validate_config` checks every field that can be checked without loading data, so a bad
value fails before any work starts.

Optional fields are typed placeholders (`None` until set), never string sentinels.
"""

import math

import ml_collections
from ml_collections import config_dict

from jaxdpdm.evaluation.label_consistency import LABEL_CLASSIFIERS
from jaxdpdm.models.layers import CONV_IMPLS

PHASES = ("dp", "pretrain")
SAMPLERS = ("ddim", "ddpm")
SCHEDULES = ("linear", "cosine")
ACCOUNTANTS = ("pld", "rdp")
CLASSIFIERS = ("cnn", "wrn16_4")
AUGMENTATIONS = ("mnist", "cifar", "none")
AUDIT_KINDS = ("gradient", "input", "both")


def get_config(arg=None):
    """Returns the base config (a DP run on the embedded digits data at 16x16).

    Args:
        arg: unused here; experiment files use it to select variants such as "tiny".
    """
    del arg
    config = ml_collections.ConfigDict()

    # Everything random in training derives from this seed and the step number: Poisson batches,
    # per-example timesteps/noise/flips/label dropout and the DP noise. The DP guarantee assumes
    # the seed is SECRET (whoever knows it can recompute the noise), so by default a fresh seed
    # is drawn from the OS and kept only in the (private) checkpoint, where a resumed run reads
    # it. Set it only for tests and reproducibility studies on public data.
    config.seed = config_dict.placeholder(int)
    # "dp": DP-SGD fine-tuning (Poisson batches, clipping, noise, accountant).
    # "pretrain": ordinary non-private training on public data (shuffled fixed-size batches).
    config.phase = "dp"
    # A workdir (or a checkpoint folder inside one) of an earlier run whose parameters and EMA
    # initialise this run. The optimizer state and the step counter start fresh.
    config.init_from = config_dict.placeholder(str)
    # Parameters whose path matches this regular expression are re-initialised instead of being
    # loaded from `init_from` when their shape differs (e.g. "label_embed" when the number of
    # classes changes between the public and the private dataset). Any other mismatch is an error.
    config.init_reinit = config_dict.placeholder(str)

    # --- data (fields of jaxdpdm.data.DataSpec) ---
    config.data = ml_collections.ConfigDict()
    # "digits" (embedded), "fashion_mnist", "mnist", "image_folder", "npz", or "tfds:<name>".
    config.data.name = "digits"
    config.data.image_size = 16
    config.data.channels = 1
    config.data.split = "train"
    config.data.data_dir = config_dict.placeholder(str)  # folder of the files / TFDS data_dir
    config.data.manual_dir = config_dict.placeholder(str)  # TFDS manual_dir
    config.data.download = False  # allow downloading (needs internet); never on by default
    config.data.cache_dir = config_dict.placeholder(str)
    config.data.classes = config_dict.placeholder(tuple)  # keep only these classes (relabelled)
    config.data.skip_corrupt = False  # skip unreadable images (counted) instead of failing
    config.data.max_examples = config_dict.placeholder(int)
    # Public/private split of one dataset (deterministic, stratified, disjoint): with
    # public_fraction > 0, subset="public" trains on the public part (pretraining) and
    # subset="private" on the rest (DP fine-tuning); split_seed fixes which is which.
    config.data.public_fraction = 0.0
    config.data.subset = "all"
    config.data.split_seed = 0
    # The real test set of --mode=evaluate: another split of the same source (digits, IDX,
    # TFDS), or, for sources without splits (image_folder, npz), a separate folder or file laid
    # out like data_dir. It must not be the training data.
    config.data.test_split = "test"
    config.data.test_dir = config_dict.placeholder(str)

    # --- model (fields of jaxdpdm.models.unet.UNetConfig; image size, channels and number of
    # classes come from the data) ---
    config.model = ml_collections.ConfigDict()
    config.model.base_channels = 32
    config.model.channel_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (8,)
    config.model.num_heads = 1
    config.model.dropout = 0.0
    config.model.resblock_updown = False
    config.model.class_conditional = True
    config.model.dtype = "float32"  # compute dtype: "float32" or "bfloat16"

    # --- diffusion ---
    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.num_timesteps = 1000
    config.diffusion.schedule = "linear"  # "linear" or "cosine"
    # Augmentation multiplicity K: each example's loss averages K draws of (t, noise, flip)
    # before its single gradient is clipped.
    config.diffusion.augmult = 4
    config.diffusion.random_flip = False  # horizontal flips (off for digits: they are not symmetric)
    config.diffusion.label_dropout = 0.1  # probability of the null label (classifier-free guidance)
    # Timestep distribution: a mixture of uniform ranges [lo, hi) with weights. The paper shifts
    # mass during DP fine-tuning; the default is uniform over [0, T).
    config.diffusion.timestep_ranges = ((0, 1000),)
    config.diffusion.timestep_weights = (1.0,)

    # --- an optional public pretraining phase, run by the same command before DP training ---
    # With num_steps > 0 (needs phase "dp" and data.subset "private"), `--mode=train` first
    # trains the model without privacy on the *public* part of the same split (data.subset
    # "public") in WORKDIR/pretrain, then DP-trains it on the private part in WORKDIR, starting
    # from the pretrained EMA parameters. The public images are not protected; the privacy
    # report names both parts. Model, data and diffusion settings are shared; these differ:
    config.pretrain = ml_collections.ConfigDict()
    config.pretrain.num_steps = 0  # 0: no pretraining phase
    config.pretrain.batch_size = 64  # fixed-size shuffled batches of public images
    config.pretrain.learning_rate = 1e-3
    config.pretrain.warmup_steps = 50
    config.pretrain.ema_decay = 0.995
    config.pretrain.augmult = 1  # K; the timesteps are uniform over [0, T) when pretraining

    # --- optimisation ---
    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 200
    # Expected (DP, = q*N) or fixed (pretrain) logical batch size.
    config.train.batch_size = 128
    # Examples per device per vmap call; peak memory is set by this times K (each example runs K
    # forward/backward passes), not by the batch size.
    config.train.microbatch_size = 32
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 10
    config.train.adam_b1 = 0.9
    config.train.adam_b2 = 0.999
    config.train.adam_eps = 1e-8
    config.train.weight_decay = 0.0
    config.train.ema_decay = 0.99
    config.train.log_every = 10
    config.train.checkpoint_every = 50
    config.train.keep_checkpoints = 3
    config.train.sample_every = 0  # 0: sample grid only at the end
    config.train.grid_per_class = 6  # images per class (one row per class) in the PNG grid

    # --- differential privacy (used when phase == "dp") ---
    config.dp = ml_collections.ConfigDict()
    config.dp.target_epsilon = 10.0
    config.dp.delta = 1e-5
    config.dp.clip_norm = 1.0
    # None: calibrated so that `train.num_steps` steps spend exactly `target_epsilon`.
    config.dp.noise_multiplier = config_dict.placeholder(float)
    config.dp.accountant = "pld"  # "pld" (tighter) or "rdp"
    # Regular expression over parameter paths ("Block_0/Conv_0/kernel"): only matching parameters
    # are trained (and noised). None trains all parameters.
    config.dp.trainable = config_dict.placeholder(str)
    # How the UNet's convolutions compute per-example kernel gradients in DP steps (same values
    # and mathematics; speed and memory only): "xla" (XLA's own: a grouped convolution under
    # vmap) or "patch_matmul" (one batched matmul per kernel tap,
    # `models.layers.conv_patch_matmul_grad`). Which is faster depends on the shapes and the
    # machine (benchmarks/RESULTS.md section 21); CPU recipes choose by measurement. Non-private
    # training always uses "xla", the faster one for a batched gradient.
    config.dp.conv_impl = "xla"

    # --- sampling (--mode=sample, and the grids during training) ---
    config.sample = ml_collections.ConfigDict()
    config.sample.sampler = "ddim"  # "ddim" or "ddpm"
    config.sample.ddim_steps = 50
    config.sample.eta = 0.0
    config.sample.guidance_scale = 0.0
    config.sample.num_samples = 1000
    config.sample.batch_size = 250
    # Sampling is post-processing of the DP model, so its seed may be public.
    config.sample.seed = 0
    # Also write the samples as PNGs into this folder, one sub-folder per class (the layout the
    # "image_folder" dataset and most training pipelines read). None: only samples/chunk_*.npz.
    config.sample.image_folder = config_dict.placeholder(str)
    # Also write all samples to this one compressed .npz (images, labels and a provenance JSON
    # naming the checkpoint step and the privacy guarantee), e.g. to publish them.
    config.sample.npz_file = config_dict.placeholder(str)
    # Also write all samples into this folder as parts part-00000.npz, ... of at most
    # npz_part_size samples each (same content as npz_file; for publishing under a file size
    # limit). The "npz" dataset source reads the folder back as one dataset.
    config.sample.npz_folder = config_dict.placeholder(str)
    config.sample.npz_part_size = 10000

    # --- evaluation (--mode=evaluate) ---
    config.eval = ml_collections.ConfigDict()
    # Local file with the standard FID Inception weights (.pth or converted .npz); None: no FID
    # unless download_inception_weights is set.
    config.eval.inception_weights = config_dict.placeholder(str)
    # Without inception_weights: fetch pytorch-fid's weights once into ~/.cache/jaxdpdm (needs
    # internet, verified by SHA-256, converted once; see jaxdpdm/evaluation/inception_weights.py).
    config.eval.download_inception_weights = False
    config.eval.fid_batch_size = 50
    # The downstream classifier and its training recipe (evaluation.classifier_training.RECIPES):
    # "cnn": DPDM's (Fashion-)MNIST CNN, Adam 3e-4, constant rate, batch 64, 20 epochs, random
    # shifts ("mnist" augmentation, 2-pixel padding); "wrn16_4": WRN-16-4 with the usual CIFAR
    # recipe, SGD (Nesterov 0.9) 0.1 with cosine decay, weight decay 5e-4, batch 128, 50 epochs,
    # 4-pixel random crops and flips ("cifar"). The five fields below override the recipe when
    # set; None keeps the recipe's value (the crop padding always stays the recipe's). The last,
    # `classifier_seed`, seeds the classifier's initialisation, shuffling, augmentation and
    # validation hold-out (the recipe's 0): rerun the evaluation with other seeds to see how much
    # of a difference between two synthetic sets is the classifier's own spread.
    config.eval.classifier = "cnn"
    config.eval.classifier_epochs = config_dict.placeholder(int)
    config.eval.classifier_batch_size = config_dict.placeholder(int)
    config.eval.classifier_learning_rate = config_dict.placeholder(float)
    config.eval.augment = config_dict.placeholder(str)  # "mnist", "cifar" or "none"
    config.eval.classifier_seed = config_dict.placeholder(int)
    config.eval.train_real_reference = True
    # With data.public_fraction > 0, the real public images also train two more downstream
    # classifiers, tested like the synthetic one: public images only (the baseline) and public
    # images + synthetic set. None: on whenever the data has a public part; False: off (the
    # synthetic-only classifier is still scored on the public images, a selection metric that
    # costs no training). True needs data.public_fraction > 0.
    config.eval.public_mix = config_dict.placeholder(bool)
    # Label consistency (jaxdpdm.evaluation.label_consistency): a classifier of the real training
    # split labels the synthetic images. "logistic" (scikit-learn) or "cnn".
    config.eval.label_classifier = "logistic"
    # Class-balanced samples drawn and scored at the end of training (0: not at all); written to
    # WORKDIR/label_consistency.json. --mode=evaluate scores all the samples of --mode=sample.
    config.eval.label_consistency_samples = 0
    # Evaluate this .npz file or folder of .npz parts (written by sample.npz_file / npz_folder,
    # e.g. a set published in benchmarks/results/) instead of WORKDIR/samples; the privacy
    # guarantee reported is the one its provenance records. None: WORKDIR/samples.
    config.eval.samples_npz = config_dict.placeholder(str)

    # --- privacy audit (--mode=audit; see jaxdpdm.audit) ---
    config.audit = ml_collections.ConfigDict()
    # "gradient": white-box Dirac canaries in gradient space; "input": black-box out-of-
    # distribution images with random labels; "both": num_canaries of each kind in one run.
    config.audit.kind = "both"
    config.audit.num_canaries = 1000  # per kind, each included with probability 1/2
    config.audit.confidence = 0.95  # of the epsilon lower bounds
    config.audit.score_timesteps = 10  # input canaries: loss averaged over this many fixed t

    return config


# JAX keys keep only the low 32 bits of an integer seed (with 64-bit mode off, the default), so
# seed 2**32 + k would silently reuse seed k's randomness.
MAX_SEED = 2**32 - 1
# Calibrating sigma with the PLD accountant costs a few accountant evaluations whose time grows
# with the number of steps. Measured on a loaded 2-core CPU (load average 11-14), q = 16/1442,
# epsilon 10: 10^5 steps 5.6 s, 10^6 steps 41 s, 3*10^6 steps 300 s (one evaluation 47 s), and
# 10^7 steps had not finished after 8 minutes; the budget checks during training evaluate it again.
# Longer DP runs use the RDP accountant (under a second at any step count).
MAX_PLD_STEPS = 10**6


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config: {message}")


def validate_config(config) -> None:
    """Raises ValueError naming the first field whose value is out of range."""
    _check(config.phase in PHASES, f"phase must be one of {PHASES}, got {config.phase!r}")
    _check(
        config.seed is None or (isinstance(config.seed, int) and 0 <= config.seed <= MAX_SEED),
        f"seed must be unset (drawn secretly) or an integer in [0, 2**32 - 1], got "
        f"{config.seed} (JAX keys keep only 32 bits of a seed)")

    data = config.data
    _check(data.image_size >= 4, f"data.image_size must be >= 4, got {data.image_size}")
    _check(data.channels in (1, 3), f"data.channels must be 1 or 3, got {data.channels}")

    d = config.diffusion
    _check(d.num_timesteps >= 2, "diffusion.num_timesteps must be >= 2")
    _check(d.schedule in SCHEDULES, f"diffusion.schedule must be one of {SCHEDULES}")
    _check(d.augmult >= 1, f"diffusion.augmult must be >= 1, got {d.augmult}")
    _check(0.0 <= d.label_dropout < 1.0, "diffusion.label_dropout must be in [0, 1)")
    _check(
        len(d.timestep_ranges) == len(d.timestep_weights) > 0,
        "diffusion.timestep_ranges and timestep_weights must have the same, non-zero length")
    _check(all(0 <= lo < hi <= d.num_timesteps for lo, hi in d.timestep_ranges),
           f"diffusion.timestep_ranges must be ranges [lo, hi) within [0, {d.num_timesteps})")

    t = config.train
    _check(t.num_steps >= 1, f"train.num_steps must be >= 1, got {t.num_steps}")
    _check(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _check(t.microbatch_size >= 1, f"train.microbatch_size must be >= 1, got {t.microbatch_size}")
    _check(t.learning_rate > 0, "train.learning_rate must be > 0")
    _check(t.warmup_steps >= 0, "train.warmup_steps must be >= 0")
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay must be in [0, 1)")
    _check(t.log_every >= 1 and t.checkpoint_every >= 1, "train.log_every and "
           "train.checkpoint_every must be >= 1")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
    _check(t.sample_every >= 0, "train.sample_every must be >= 0 (0: only at the end)")

    if config.phase == "dp":
        p = config.dp
        _check(p.target_epsilon > 0 and math.isfinite(p.target_epsilon),
               f"dp.target_epsilon must be a finite number > 0, got {p.target_epsilon}")
        _check(0.0 < p.delta < 1.0, f"dp.delta must be in (0, 1), got {p.delta}")
        _check(p.clip_norm > 0, f"dp.clip_norm must be > 0, got {p.clip_norm}")
        # sigma = 0 adds no noise: nothing would be private, and the accountant cannot price it.
        _check(
            p.noise_multiplier is None or p.noise_multiplier > 0,
            f"dp.noise_multiplier must be > 0 in a DP run (or unset, to calibrate it), got "
            f"{p.noise_multiplier}; use phase='pretrain' for non-private training")
        _check(p.accountant in ACCOUNTANTS, f"dp.accountant must be one of {ACCOUNTANTS}")
        _check(p.conv_impl in CONV_IMPLS,
               f"dp.conv_impl must be one of {CONV_IMPLS}, got {p.conv_impl!r}")
        _check(
            p.accountant != "pld" or t.num_steps <= MAX_PLD_STEPS,
            f"train.num_steps={t.num_steps:,} is more than {MAX_PLD_STEPS:,} DP steps: the PLD "
            f"accountant would take from many minutes to hours to calibrate and check the "
            f"budget at that length (3*10^6 steps: 5 minutes for the calibration alone); if "
            f"you mean it, set dp.accountant='rdp' (fast at any length, slightly looser)")

    pre = config.pretrain
    _check(pre.num_steps >= 0, f"pretrain.num_steps must be >= 0, got {pre.num_steps}")
    if pre.num_steps:
        _check(
            config.phase == "dp" and data.subset == "private",
            "pretrain.num_steps > 0 needs phase 'dp' and data.subset 'private' (the "
            "pretraining phase trains on the public part of the same split)")
        _check(
            config.init_from is None, "pretrain.num_steps > 0 initialises the DP phase from "
            "its own pretraining: leave init_from unset")
        _check(
            pre.batch_size >= 1 and pre.learning_rate > 0 and pre.warmup_steps >= 0 and
            0.0 <= pre.ema_decay < 1.0 and pre.augmult >= 1,
            "pretrain needs batch_size >= 1, learning_rate > 0, warmup_steps >= 0, "
            "ema_decay in [0, 1) and augmult >= 1")

    s = config.sample
    _check(s.sampler in SAMPLERS, f"sample.sampler must be one of {SAMPLERS}")
    _check(1 <= s.ddim_steps <= d.num_timesteps,
           "sample.ddim_steps must be in [1, diffusion.num_timesteps]")
    _check(s.eta >= 0, "sample.eta must be >= 0")
    _check(s.guidance_scale >= 0, "sample.guidance_scale must be >= 0")
    _check(
        isinstance(s.seed, int) and 0 <= s.seed <= MAX_SEED,
        f"sample.seed must be an integer in [0, 2**32 - 1], got {s.seed}")
    _check(s.num_samples >= 1 and s.batch_size >= 1,
           "sample.num_samples and sample.batch_size must be >= 1")
    _check(s.npz_part_size >= 1, "sample.npz_part_size must be >= 1")

    a = config.audit
    _check(a.kind in AUDIT_KINDS, f"audit.kind must be one of {AUDIT_KINDS}, got {a.kind!r}")
    _check(
        isinstance(a.num_canaries, int) and a.num_canaries >= 2,
        f"audit.num_canaries must be an integer >= 2, got {a.num_canaries!r}")
    _check(0.5 <= a.confidence < 1.0, f"audit.confidence must be in [0.5, 1), got {a.confidence}")
    _check(1 <= a.score_timesteps <= d.num_timesteps,
           "audit.score_timesteps must be in [1, diffusion.num_timesteps]")

    e = config.eval
    _check(e.classifier in CLASSIFIERS, f"eval.classifier must be one of {CLASSIFIERS}")
    _check(e.augment is None or e.augment in AUGMENTATIONS,
           f"eval.augment must be unset (the classifier's recipe) or one of {AUGMENTATIONS}")
    _check(e.label_classifier in LABEL_CLASSIFIERS,
           f"eval.label_classifier must be one of {LABEL_CLASSIFIERS}")
    _check(e.label_consistency_samples >= 0, "eval.label_consistency_samples must be >= 0")
    _check(e.classifier_epochs is None or e.classifier_epochs >= 1,
           "eval.classifier_epochs must be unset (the recipe's) or >= 1")
    _check(e.classifier_batch_size is None or e.classifier_batch_size >= 1,
           "eval.classifier_batch_size must be unset (the recipe's) or >= 1")
    _check(e.classifier_learning_rate is None or e.classifier_learning_rate > 0,
           "eval.classifier_learning_rate must be unset (the recipe's) or > 0")
    _check(e.classifier_seed is None or 0 <= e.classifier_seed <= MAX_SEED,
           "eval.classifier_seed must be unset (the recipe's, 0) or in [0, 2**32 - 1]")
    _check(
        e.public_mix is not True or data.public_fraction > 0,
        "eval.public_mix=True trains on the real public images, but data.public_fraction "
        "is 0 (no public part); set data.public_fraction and data.subset, or leave "
        "eval.public_mix unset")
    _check(e.fid_batch_size >= 1, "eval.fid_batch_size must be >= 1")
