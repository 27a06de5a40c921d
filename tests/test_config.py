"""The base config: it validates, every check of `validate_config` fires, overrides are typed."""

import math
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from jaxdpdm import config as config_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value


def test_base_config_validates():
    config_lib.validate_config(config_lib.get_config())


def test_tiny_quickstart_config_validates(tiny_config):
    config_lib.validate_config(tiny_config())


def test_get_config_returns_a_fresh_config_each_call():
    first = config_lib.get_config()
    first.train.num_steps = 7
    assert config_lib.get_config().train.num_steps != 7


@pytest.mark.parametrize("field", [
    "seed", "init_from", "init_reinit", "dp.noise_multiplier", "dp.trainable", "data.classes",
    "data.max_examples", "data.data_dir", "eval.inception_weights", "eval.classifier_seed"
])
def test_placeholders_are_none_by_default(field):
    node = config_lib.get_config()
    for name in field.split("."):
        node = node[name]
    assert node is None


@pytest.mark.parametrize("field, value", [
    ("seed", 5),
    ("init_from", "/some/workdir"),
    ("dp.noise_multiplier", 1.25),
    ("train.num_steps", 3),
    ("dp.target_epsilon", 1.0),
    ("data.classes", (0, 3)),
    ("eval.classifier_seed", 2**32 - 1),
])
def test_typed_overrides_are_kept(field, value):
    config = config_lib.get_config()
    _set(config, field, value)
    node = config
    for name in field.split("."):
        node = node[name]
    assert node == value
    config_lib.validate_config(config)


@pytest.mark.parametrize("field, value", [
    ("seed", "secret"),
    ("train.num_steps", "3"),
    ("dp.noise_multiplier", "1.0"),
    ("phase", 1),
])
def test_overrides_of_the_wrong_type_are_refused(field, value):
    config = config_lib.get_config()
    with pytest.raises(TypeError):
        _set(config, field, value)


def test_placeholder_can_be_reset_to_none():
    config = config_lib.get_config()
    config.dp.noise_multiplier = 2.0
    config.dp.noise_multiplier = None
    assert config.dp.noise_multiplier is None
    config_lib.validate_config(config)


# ml_collections loads config files with the deprecated `load_module`; not ours to fix.
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_command_line_overrides_through_config_flags():
    """What `--config=configs/default.py --config.x=...` does in `jaxdpdm.main`."""
    argv = [
        "prog", f"--config={REPO_ROOT / 'configs' / 'default.py'}", "--config.train.num_steps=3",
        "--config.seed=11", "--config.dp.noise_multiplier=0.75", "--config.dp.target_epsilon=2"
    ]
    flag_values = flags.FlagValues()
    # The override flags are declared from the argv the config flag sees (sys.argv by default).
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.train.num_steps == 3
    assert config.seed == 11
    assert config.dp.noise_multiplier == 0.75
    assert config.dp.target_epsilon == 2.0
    assert config.init_from is None
    config_lib.validate_config(config)


# (field, bad value, text the error must contain). Each row breaks exactly one check.
INVALID = [
    ("phase", "finetune", "phase"),
    ("seed", -1, "seed"),
    ("data.image_size", 2, "data.image_size"),
    ("data.channels", 2, "data.channels"),
    ("diffusion.num_timesteps", 1, "diffusion.num_timesteps"),
    ("diffusion.schedule", "quadratic", "diffusion.schedule"),
    ("diffusion.augmult", 0, "diffusion.augmult"),
    ("diffusion.label_dropout", 1.0, "diffusion.label_dropout"),
    ("diffusion.label_dropout", -0.1, "diffusion.label_dropout"),
    ("diffusion.timestep_weights", (0.5, 0.5), "diffusion.timestep_ranges"),
    ("diffusion.timestep_ranges", (), "diffusion.timestep_ranges"),
    ("train.num_steps", 0, "train.num_steps"),
    ("train.batch_size", 0, "train.batch_size"),
    ("train.microbatch_size", 0, "train.microbatch_size"),
    ("train.learning_rate", 0.0, "train.learning_rate"),
    ("train.learning_rate", math.nan, "train.learning_rate"),
    ("train.warmup_steps", -1, "train.warmup_steps"),
    ("train.ema_decay", 1.0, "train.ema_decay"),
    ("train.ema_decay", -0.5, "train.ema_decay"),
    ("train.log_every", 0, "train.log_every"),
    ("train.checkpoint_every", 0, "train.checkpoint_every"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints"),
    ("train.sample_every", -1, "train.sample_every"),
    ("dp.target_epsilon", 0.0, "dp.target_epsilon"),
    ("dp.target_epsilon", math.inf, "dp.target_epsilon"),
    ("dp.delta", 0.0, "dp.delta"),
    ("dp.delta", 1.0, "dp.delta"),
    ("dp.clip_norm", 0.0, "dp.clip_norm"),
    ("dp.noise_multiplier", -1.0, "dp.noise_multiplier"),
    ("dp.noise_multiplier", 0.0, "dp.noise_multiplier must be > 0"),
    ("dp.accountant", "moments", "dp.accountant"),
    ("sample.sampler", "euler", "sample.sampler"),
    ("sample.ddim_steps", 0, "sample.ddim_steps"),
    ("sample.ddim_steps", 1001, "sample.ddim_steps"),
    ("sample.eta", -0.1, "sample.eta"),
    ("sample.guidance_scale", -1.0, "sample.guidance_scale"),
    ("sample.num_samples", 0, "sample.num_samples"),
    ("sample.npz_part_size", 0, "sample.npz_part_size"),
    ("sample.batch_size", 0, "sample.batch_size"),
    ("dp.conv_impl", "im2col", "dp.conv_impl"),
    ("eval.classifier", "resnet", "eval.classifier"),
    ("eval.augment", "autoaugment", "eval.augment"),
    ("eval.classifier_epochs", 0, "eval.classifier_epochs"),
    ("eval.classifier_batch_size", 0, "eval.classifier_batch_size"),
    ("eval.classifier_learning_rate", 0.0, "eval.classifier_learning_rate"),
    ("eval.classifier_seed", -1, "eval.classifier_seed"),
    ("eval.classifier_seed", 2**32, "eval.classifier_seed"),
    ("eval.public_mix", True, "data.public_fraction is 0"),  # the base config has no public part
    # JAX keys keep 32 bits of a seed: 2**32 would silently reuse seed 0's randomness, and
    # 10**23 overflowed inside jax.random.key with a traceback.
    ("seed", 2**32, "seed"),
    ("seed", 10**23, "seed"),
    ("sample.seed", 2**32, "sample.seed"),
    # 10**8 DP steps used to calibrate sigma in silence for hours (PLD accountant).
    ("train.num_steps", 10**8, "dp.accountant='rdp'"),
]


@pytest.mark.parametrize("field, value, named", INVALID,
                         ids=[f"{field}={value!r}" for field, value, _ in INVALID])
def test_every_check_fires_and_names_the_field(field, value, named):
    config = config_lib.get_config()
    _set(config, field, value)
    with pytest.raises(ValueError, match="invalid config") as info:
        config_lib.validate_config(config)
    assert named in str(info.value)


@pytest.mark.parametrize("field, value", [
    ("dp.target_epsilon", 0.0),
    ("dp.delta", 2.0),
    ("dp.clip_norm", -1.0),
    ("dp.accountant", "moments"),
    ("dp.noise_multiplier", -1.0),
])
def test_dp_fields_are_not_checked_when_pretraining(field, value):
    config = config_lib.get_config()
    config.phase = "pretrain"
    _set(config, field, value)
    config_lib.validate_config(config)


@pytest.mark.parametrize("field, value", [
    ("seed", 0),
    ("dp.noise_multiplier", 1e-3),
    ("dp.clip_norm", math.inf),
    ("diffusion.label_dropout", 0.0),
    ("train.ema_decay", 0.0),
    ("train.warmup_steps", 0),
    ("sample.ddim_steps", 1000),
    ("sample.sampler", "ddpm"),
    ("diffusion.schedule", "cosine"),
    ("dp.accountant", "rdp"),
    ("data.channels", 3),
    ("seed", 2**32 - 1),
    ("train.num_steps", config_lib.MAX_PLD_STEPS),
])
def test_boundary_values_are_accepted(field, value):
    config = config_lib.get_config()
    _set(config, field, value)
    config_lib.validate_config(config)


def test_long_dp_runs_are_allowed_with_the_rdp_accountant_and_when_pretraining():
    for phase, accountant in (("dp", "rdp"), ("pretrain", "pld")):
        config = config_lib.get_config()
        config.phase, config.dp.accountant = phase, accountant
        config.train.num_steps = 10**8
        config_lib.validate_config(config)
