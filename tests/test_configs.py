"""Every experiment config in configs/: loads, validates, builds its UNet, and says what it claims.

No data is loaded and no parameter is allocated (parameter counts come from `jax.eval_shape`).
"""

import dataclasses
import functools
import pathlib
import runpy

import pytest
from absl import flags
from ml_collections import config_flags

from jaxdpdm import recipes
from jaxdpdm.config import get_config, validate_config
from jaxdpdm.experiment import data_spec, timestep_distribution, unet_config
from jaxdpdm.models import unet
from jaxdpdm.models.unet import count_parameters
from jaxdpdm.recipes import parse_arg

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"

# Classes and training-set size of each dataset, known without loading it. N is the number of
# examples the DP phase trains on (after the public/private split where there is one).
DATASETS = {
    "digits": (10, 1437),
    ("digits", "private"): (10, 1154),
    ("digits", "public"): (10, 288),
    "tfds:imagenet_resized/32x32": (1000, 1_281_167),
    "tfds:cifar10": (10, 50_000),
    "tfds:patch_camelyon": (2, 262_144),
    ("fashion_mnist", "public"): (10, 6_000),
    ("fashion_mnist", "private"): (10, 54_000),
}

# Every config file and its documented variants ("" is `--config=path` without a variant).
VARIANTS = {
    "default.py": ("",),
    "quickstart.py": ("", "tiny"),
    "imagenet32_pretrain.py": ("",),
    "cifar10.py": ("", "eps=1", "eps=5"),
    "camelyon17.py": ("",),
    "fashion_mnist_pretrain.py": ("", "smoke"),
    "fashion_mnist.py": ("", "eps=1", "smoke", "eps=1,smoke"),
    "fashion_mnist_gpu.py": ("", "smoke"),
}
CASES = [(name, variant) for name, variants in VARIANTS.items() for variant in variants]
FINETUNE_CONFIGS = (("cifar10.py", ""), ("cifar10.py", "eps=1"), ("cifar10.py", "eps=5"),
                    ("camelyon17.py", ""))
PAPER_CONFIGS = (("imagenet32_pretrain.py", ""),) + FINETUNE_CONFIGS
# Files that take no variant, and those that take variants (which must refuse unknown keys).
NO_VARIANTS = ("imagenet32_pretrain.py",)
WITH_VARIANTS = ("quickstart.py", "cifar10.py", "camelyon17.py", "fashion_mnist_pretrain.py",
                 "fashion_mnist.py", "fashion_mnist_gpu.py")


def load(name: str, variant: str = ""):
    """`get_config` of configs/<name>, called the way `--config=configs/<name>[:variant]` does."""
    module = runpy.run_path(str(CONFIG_DIR / name))
    return module["get_config"](variant) if variant else module["get_config"]()


def dataset_key(config):
    name = config.data.name
    return (name, config.data.subset) if config.data.subset != "all" else name


@functools.lru_cache(maxsize=None)
def parameters(unet) -> int:
    return count_parameters(unet)  # eval_shape: cheap even at 89M parameters; cached per shape


def flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_config_file_is_covered():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.py")) == sorted(VARIANTS)


@pytest.mark.parametrize("name, variant", CASES)
def test_config_validates_and_builds_its_unet(name, variant):
    config = load(name, variant)
    validate_config(config)
    data_spec(config)  # DataSpec checks (source options, subset/public_fraction) without loading
    dist = timestep_distribution(config)
    dist.check_num_timesteps(config.diffusion.num_timesteps)
    num_classes, _ = DATASETS[dataset_key(config)]
    unet = unet_config(config, num_classes)
    assert unet.num_classes == num_classes and unet.image_size == config.data.image_size


@pytest.mark.parametrize("name", NO_VARIANTS + WITH_VARIANTS)
def test_unknown_variant_is_refused(name):
    stem = name.removesuffix(".py")
    with pytest.raises(ValueError, match=f"unknown {stem} variant 'no_such_variant'"):
        load(name, "no_such_variant")


def test_parse_arg_reads_big_vision_style_variants():
    got = parse_arg("eps=1, smoke", name="x", eps=10.0, smoke=False, steps=3, tag="a")
    assert got.to_dict() == {"eps": 1.0, "smoke": True, "steps": 3, "tag": "a"}
    assert isinstance(got.eps, float) and isinstance(got.steps, int)
    assert parse_arg(None, name="x", eps=10.0).eps == 10.0 == parse_arg("", name="x", eps=10.0).eps
    assert parse_arg("smoke=false", name="x", smoke=True).smoke is False
    for bad, message in (("eps=ten", "x variant eps=ten: expected float"),
                         ("eps", "x variant eps needs a value"),
                         ("smoke=maybe", "x variant smoke=maybe: expected true or false"),
                         ("epsilon=1", "unknown x variant 'epsilon'; known: eps, smoke")):
        with pytest.raises(ValueError, match=message):
            parse_arg(bad, name="x", eps=10.0, smoke=False)


@pytest.mark.parametrize("name, variant", PAPER_CONFIGS)
def test_paper_configs_have_more_than_80m_parameters(name, variant):
    config = load(name, variant)
    num_classes, _ = DATASETS[dataset_key(config)]
    assert parameters(unet_config(config, num_classes)) >= 80_000_000


@pytest.mark.parametrize("pretrain, finetune",
                         [("imagenet32_pretrain.py", ":".join(case)) for case in FINETUNE_CONFIGS] +
                         [("fashion_mnist_pretrain.py", "fashion_mnist.py"),
                          ("fashion_mnist_pretrain.py", "fashion_mnist.py:eps=1"),
                          ("fashion_mnist_pretrain.py:smoke", "fashion_mnist.py:smoke"),
                          ("fashion_mnist_pretrain.py:smoke", "fashion_mnist.py:eps=1,smoke")])
def test_fine_tuning_fits_its_pretrained_model(pretrain, finetune):
    """`init_from` needs the same architecture and noise schedule (the label embedding may differ
    in size only where `init_reinit` re-initialises it)."""
    source, target = load(*pretrain.split(":", 1)), load(*finetune.split(":", 1))
    assert source.phase == "pretrain" and target.phase == "dp"
    assert source.model.to_dict() == target.model.to_dict()
    assert (source.data.image_size, source.data.channels) == (target.data.image_size,
                                                              target.data.channels)
    for field in ("num_timesteps", "schedule"):
        assert source.diffusion[field] == target.diffusion[field]
    if DATASETS[dataset_key(source)][0] != DATASETS[dataset_key(target)][0]:
        assert target.init_reinit == "label_embed"


@pytest.mark.parametrize("variant", ["", "smoke"])
def test_fashion_mnist_phases_use_one_split_and_disjoint_parts(variant):
    pretrain = load("fashion_mnist_pretrain.py", variant)
    for eps in ("eps=10", "eps=1"):
        dp = load("fashion_mnist.py", ",".join(filter(None, (eps, variant))))
        for field in ("name", "split", "public_fraction", "split_seed"):
            assert pretrain.data[field] == dp.data[field], field
        assert (pretrain.data.subset, dp.data.subset) == ("public", "private")
        assert dp.init_from is not None


@pytest.mark.parametrize("name, variant", [c for c in CASES if load(*c).pretrain.num_steps])
def test_two_phase_configs_pretrain_on_the_public_part_of_the_same_split(name, variant):
    from jaxdpdm.phases import pretraining_config

    config = load(name, variant)
    pretrain = pretraining_config(config)
    validate_config(pretrain)
    assert (pretrain.phase, pretrain.data.subset, config.data.subset) == ("pretrain", "public",
                                                                          "private")
    for field in ("name", "split", "public_fraction", "split_seed", "image_size"):
        assert pretrain.data[field] == config.data[field], field
    assert pretrain.model.to_dict() == config.model.to_dict()
    assert pretrain.train.batch_size <= DATASETS[dataset_key(pretrain)][1]


@pytest.mark.parametrize("name, default", [("cifar10.py", 10.0), ("camelyon17.py", 10.0),
                                           ("fashion_mnist.py", 10.0)])
def test_epsilon_variants_differ_only_in_the_privacy_target(name, default):
    base = flatten(load(name).to_dict())
    assert base["dp.target_epsilon"] == default
    for eps in (1.0, 5.0, 10.0):
        other = flatten(load(name, f"eps={eps:g}").to_dict())
        differing = {key for key in base if base[key] != other[key]}
        assert differing == ({"dp.target_epsilon"} if eps != default else set())
        assert other["dp.target_epsilon"] == eps


@pytest.mark.parametrize("name, variant", [c for c in CASES if load(*c).phase == "dp"])
def test_dp_configs_keep_the_seed_secret_and_delta_below_one_over_n(name, variant):
    config = load(name, variant)
    # A seed fixed in a config file would let anyone recompute the DP noise. quickstart:tiny
    # fixes it on purpose: it exists for reproducible tests on public data.
    assert config.seed is None or (name, variant) == ("quickstart.py", "tiny")
    _, num_examples = DATASETS[dataset_key(config)]
    if config.data.max_examples is not None:
        num_examples = min(num_examples, config.data.max_examples)
    assert config.dp.delta < 1.0 / num_examples
    assert config.train.batch_size <= num_examples


def test_paper_fine_tuning_uses_the_modified_timestep_distribution():
    for case in FINETUNE_CONFIGS:
        d = load(*case).diffusion
        assert len(d.timestep_ranges) > 1 and d.augmult > 1
        assert load(*case).train.batch_size == 4096


# ml_collections loads config files with the deprecated `load_module`; not ours to fix.
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
@pytest.mark.parametrize("name, variant", CASES)
def test_config_flags_loads_the_file_with_overrides(name, variant):
    """What `python -m jaxdpdm.main --config=configs/<name>[:variant] --config.x=...` does."""
    path = str(CONFIG_DIR / name) + (f":{variant}" if variant else "")
    two_phase = load(name, variant).pretrain.num_steps > 0
    # A two-phase config initialises its DP phase itself; overriding init_from means one phase.
    argv = [
        "prog", f"--config={path}", "--config.train.num_steps=3",
        "--config.init_from=/tmp/pretrained"
    ] + (["--config.pretrain.num_steps=0"] if two_phase else [])
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv,
                                    lock_config=True)
    flag_values(argv)
    config = flag_values.config
    assert config.train.num_steps == 3 and config.init_from == "/tmp/pretrained"
    expected = load(name, variant)
    expected.train.num_steps, expected.init_from = 3, "/tmp/pretrained"
    if two_phase:
        expected.pretrain.num_steps = 0
    assert config.to_dict() == expected.to_dict()
    validate_config(config)


def test_paper_unet_is_the_paper_cifar_preset():
    """One definition of the paper's architecture: the configs take the preset that the
    benchmarks measure."""
    config = recipes.paper_unet(get_config())
    config.data.image_size, config.data.channels = 32, 3
    built = unet_config(config, num_classes=10)
    assert built == dataclasses.replace(unet.unet_preset("paper_cifar"), dtype="bfloat16")
