"""ADM/DDPM-style diffusion UNet (epsilon prediction) as a pure Flax linen module.

The decomposition follows DDPM (Ho et al., 2020) and improved DDPM / ADM (Nichol & Dhariwal,
2021; Dhariwal & Nichol, 2021): a sinusoidal timestep embedding and MLP; a class embedding
(with one extra "null" row for classifier-free guidance) added to it; residual blocks with
GroupNorm and scale-shift conditioning; self-attention at chosen resolutions; a down path, a
middle (ResBlock, attention, ResBlock) and an up path with skip connections.

One module covers a ~50k-parameter test model up to the >80M-parameter CIFAR-10 model of
Ghalebikesabi et al. (2023); see `unet_preset`. There is no BatchNorm or any other operation
across examples, so the model is safe to call per example inside `jax.vmap` for DP-SGD.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdpdm.models import count_params
from jaxdpdm.models.layers import (
    CONV_IMPLS,
    AttentionBlock,
    Downsample,
    GroupNorm,
    ResBlock,
    Upsample,
    conv3x3,
    timestep_embedding,
)

_COMPUTE_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of the UNet. Frozen and hashable, so it can be a static jit argument.

    Lists are turned into tuples and `dtype` strings ("bfloat16") into numpy dtypes, so a config
    built from ml_collections fields works as is. The config is validated on construction
    (`validate`), so an invalid architecture fails before any tracing.

    Attributes:
        image_size: height = width of the input; divisible by `2**(len(channel_mult) - 1)`
            (e.g. 28 with channel_mult (1, 2, 2) gives levels 28, 14, 7).
        in_channels: image channels (also the output channels: the model predicts the noise).
        base_channels: width of the first level; level `i` has `base_channels * channel_mult[i]`.
        channel_mult: one width multiplier per resolution level; its length is the number of
            levels (the image is halved between consecutive levels).
        num_res_blocks: ResBlocks per level on the down path (the up path has one more, which
            consumes the skip of the resampling step, as in DDPM/ADM).
        attention_resolutions: feature-map sizes in pixels (not downsampling factors) at which a
            self-attention block follows each ResBlock, e.g. (16, 8) at 32x32. Each must be one of
            the level resolutions: an attention size that matches no level is an error (not a
            warning), because silently training a model without the requested attention is worse.
            The middle of the UNet always has one attention block.
        num_heads: attention heads; must divide the width of every level with attention and of
            the middle.
        dropout: dropout rate in [0, 1) inside every ResBlock (active only with `train=True`).
        num_classes: None for an unconditional model; otherwise labels are in [0, num_classes]
            where label `num_classes` is the "null" label used for classifier-free guidance (the
            label embedding has num_classes + 1 rows). Out-of-range labels are clamped by the
            embedding lookup, not checked (the check would need a host callback under jit).
        resblock_updown: resample with ResBlocks (BigGAN/ADM style) instead of plain layers.
        conv_resample: when not `resblock_updown`, use a stride-2 conv to downsample and a conv
            after nearest upsampling; otherwise parameter-free average pooling / nearest repeat.
        dtype: compute dtype: float32, bfloat16 (or float16). Parameters are always float32 and
            the output is always float32.
        conv_impl: how the convolutions compute their kernel gradient, `layers.CONV_IMPLS`
            (same values and mathematics; only speed and memory differ; see `layers.Conv`).
    """

    image_size: int
    in_channels: int = 3
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = ()
    num_heads: int = 4
    dropout: float = 0.1
    num_classes: int | None = None
    resblock_updown: bool = False
    conv_resample: bool = True
    dtype: Any = jnp.float32
    conv_impl: str = "xla"

    def __post_init__(self):
        # Normalise container/dtype types first so that equal configs hash equally.
        set_field = functools.partial(object.__setattr__, self)
        set_field("channel_mult", tuple(self.channel_mult))
        set_field("attention_resolutions", tuple(self.attention_resolutions))
        try:
            set_field("dtype", np.dtype(jnp.dtype(self.dtype)))
        except TypeError as err:
            raise ValueError(f"dtype {self.dtype!r} is not a dtype") from err
        self.validate()

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        """Feature-map size of each level, e.g. (28, 14, 7)."""
        return tuple(self.image_size // 2**level for level in range(self.num_levels))

    @property
    def embed_dim(self) -> int:
        """Width of the time (+ class) embedding: 4x the base width, as in DDPM/ADM."""
        return 4 * self.base_channels

    @property
    def null_label(self) -> int | None:
        """The label meaning "no class" (classifier-free guidance), None if unconditional."""
        return self.num_classes

    def validate(self) -> None:
        """Raises ValueError, with the reason, if this is not a buildable architecture."""

        def positive_int(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("image_size", "in_channels", "base_channels", "num_res_blocks", "num_heads"):
            positive_int(name)
        if not self.channel_mult:
            raise ValueError("channel_mult must not be empty (one entry per resolution level)")
        if any(
                isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1
                for m in self.channel_mult):
            raise ValueError(f"channel_mult entries must be positive ints, got {self.channel_mult}")
        factor = 2**(self.num_levels - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by 2**(len(channel_mult)-1)={factor}"
                f" (channel_mult={self.channel_mult}); use fewer levels or another image size")
        missing = [r for r in self.attention_resolutions if r not in self.level_resolutions]
        if missing:
            raise ValueError(
                f"attention_resolutions {missing} match no level; the levels of this UNet have "
                f"resolutions {self.level_resolutions}")
        widths = {self.base_channels * self.channel_mult[-1]}  # the middle block always attends
        widths |= {
            self.base_channels * m
            for m, r in zip(self.channel_mult, self.level_resolutions)
            if r in self.attention_resolutions
        }
        bad = sorted(w for w in widths if w % self.num_heads)
        if bad:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide the attention widths {bad}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None:
            positive_int("num_classes")
        for name in ("resblock_updown", "conv_resample"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.conv_impl not in CONV_IMPLS:
            raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {self.conv_impl!r}")
        if self.dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")


class UNet(nn.Module):
    """Epsilon-prediction UNet: `(x_t, t, y) -> eps`.

    Attributes:
        config: the architecture (`UNetConfig`).
    """

    config: UNetConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
                 train: bool) -> jax.Array:
        """Predicts the noise in `x`.

        Args:
            x: noisy images, `[B, H, W, C]` with H = W = image_size and C = in_channels.
            t: timesteps `[B]`, int or float.
            y: labels int `[B]` in [0, num_classes] (num_classes = null label), required for a
                class-conditional model; must be None for an unconditional one.
            train: enables dropout; then the "dropout" rng collection must be given to `apply`.

        Returns:
            float32 `[B, H, W, C]`.
        """
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.in_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"x must have shape [B, {', '.join(map(str, expected))}], got {x.shape}")
        if jnp.shape(t) != x.shape[:1]:
            raise ValueError(f"t must have shape [B]={x.shape[:1]}, got {jnp.shape(t)}")
        if cfg.num_classes is None and y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None) but labels were given")
        if cfg.num_classes is not None and (y is None or jnp.shape(y) != x.shape[:1]):
            raise ValueError(f"a class-conditional UNet needs labels y of shape {x.shape[:1]}, "
                             f"got {None if y is None else jnp.shape(y)}")
        dtype = cfg.dtype
        dense = functools.partial(nn.Dense, dtype=dtype, param_dtype=jnp.float32)
        resblock = functools.partial(ResBlock, dropout=cfg.dropout, dtype=dtype,
                                     conv_impl=cfg.conv_impl)
        attention = functools.partial(AttentionBlock, num_heads=cfg.num_heads, dtype=dtype)

        emb = timestep_embedding(t, cfg.base_channels).astype(dtype)
        emb = dense(cfg.embed_dim, name="time_embed_0")(emb)
        emb = dense(cfg.embed_dim, name="time_embed_1")(nn.silu(emb))
        if cfg.num_classes is not None:
            emb = emb + nn.Embed(
                cfg.num_classes + 1,
                cfg.embed_dim,
                dtype=dtype,
                param_dtype=jnp.float32,
                name="label_embed",
            )(y)

        h = conv3x3(cfg.base_channels * cfg.channel_mult[0], dtype, impl=cfg.conv_impl,
                    name="in_conv")(x.astype(dtype))
        skips = [h]
        for level, (mult, res) in enumerate(zip(cfg.channel_mult, cfg.level_resolutions)):
            for i in range(cfg.num_res_blocks):
                h = resblock(cfg.base_channels * mult, name=f"down_{level}_block_{i}")(h, emb,
                                                                                       train=train)
                if res in cfg.attention_resolutions:
                    h = attention(name=f"down_{level}_attn_{i}")(h)
                skips.append(h)
            if level < cfg.num_levels - 1:
                name = f"down_{level}_resample"
                if cfg.resblock_updown:
                    h = resblock(h.shape[-1], down=True, name=name)(h, emb, train=train)
                else:
                    h = Downsample(cfg.conv_resample, dtype, cfg.conv_impl, name=name)(h)
                skips.append(h)

        h = resblock(h.shape[-1], name="middle_block_0")(h, emb, train=train)
        h = attention(name="middle_attn")(h)
        h = resblock(h.shape[-1], name="middle_block_1")(h, emb, train=train)

        for level in reversed(range(cfg.num_levels)):
            mult, res = cfg.channel_mult[level], cfg.level_resolutions[level]
            # One more block than on the way down: it consumes the skip saved after resampling.
            for i in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = resblock(cfg.base_channels * mult, name=f"up_{level}_block_{i}")(h, emb,
                                                                                     train=train)
                if res in cfg.attention_resolutions:
                    h = attention(name=f"up_{level}_attn_{i}")(h)
            if level > 0:
                name = f"up_{level}_resample"
                if cfg.resblock_updown:
                    h = resblock(h.shape[-1], up=True, name=name)(h, emb, train=train)
                else:
                    h = Upsample(cfg.conv_resample, dtype, cfg.conv_impl, name=name)(h)

        h = nn.silu(GroupNorm(dtype, name="out_norm")(h))
        out = conv3x3(cfg.in_channels, dtype, zero=True, impl=cfg.conv_impl, name="out_conv")(h)
        return out.astype(jnp.float32)


def _dummy_inputs(config: UNetConfig):
    """Shape-only inputs `[1, H, W, C]`, `[1]`, `[1]`/None used to create the parameters."""
    x = jnp.zeros((1, config.image_size, config.image_size, config.in_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = None if config.num_classes is None else jnp.zeros((1,), jnp.int32)
    return x, t, y


def _init(config: UNetConfig, key: jax.Array) -> dict:
    x, t, y = _dummy_inputs(config)
    return UNet(config).init({"params": key}, x, t, y, train=False)["params"]


# The initialisation program runs once (milliseconds: mostly threefry bits), so its compile time
# is all that counts. XLA:CPU compiles it with LLVM's cheap pipeline: 14.4 -> 3.6 s for the tiny
# quickstart UNet, 18.2 -> 6.0 s for the Fashion-MNIST one (2-core AVX2 CPU, 2026-12-02); the
# values agree with the optimised program's to 2e-7 relative (float32 rounding in the normal
# draws). Training steps are not compiled this way: they run 1.5-1.7x slower with it.
_CHEAP_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_init_jit = jax.jit(_init, static_argnums=0)
_init_jit_cheap_cpu = jax.jit(_init, static_argnums=0, compiler_options=_CHEAP_CPU_COMPILE)


def init_params(config: UNetConfig, key: jax.Array) -> dict:
    """Initial parameters (the "params" collection; all float32) of `UNet(config)`.

    Jitted, so initialising a large model is one compiled program rather than hundreds of
    dispatched ops. `key` is a typed PRNG key (`jax.random.key(seed)`).
    """
    # Compiler options apply to top-level programs only: under a trace (`jax.eval_shape`, an
    # enclosing jit) the initialisation is part of the caller's program.
    cheap = not isinstance(key, jax.core.Tracer) and jax.default_backend() == "cpu"
    return (_init_jit_cheap_cpu if cheap else _init_jit)(config, key)


def param_shapes(config: UNetConfig) -> dict:
    """`jax.ShapeDtypeStruct`s of `init_params(config, key)`: nothing is compiled or allocated."""
    return jax.eval_shape(_init_jit, config, jax.random.key(0))


def count_parameters(config: UNetConfig) -> int:
    """Number of parameters of `UNet(config)`, from shapes only (`param_shapes`): cheap even
    for the 80M-parameter model."""
    return count_params(param_shapes(config))


def make_apply_fn(config: UNetConfig, *, train: bool) -> Callable[..., jax.Array]:
    """`fn(params, x [K,H,W,C], t [K], y [K] | None, rng) -> eps f32[K,H,W,C]`.

    The signature `jaxdpdm.diffusion.per_example_loss` expects. `rng` (typed key) drives
    dropout when `train`; it is ignored (may be None) otherwise.
    """
    model = UNet(config)

    def apply_fn(params, x, t, y, rng):
        rngs = {"dropout": rng} if train and config.dropout > 0 else {}
        return model.apply({"params": params}, x, t, y, train=train, rngs=rngs)

    return apply_fn


# Preset architectures. Attention is given per *level* (0 = full resolution) so a preset keeps
# its meaning when `image_size` is overridden (e.g. cpu_small at 16x16 or 28x28).
_PRESETS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "tiny": (
        dict(
            image_size=8,
            in_channels=3,
            base_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            num_heads=2,
            dropout=0.1,
            num_classes=10,
        ),
        (1,),
    ),
    "cpu_small": (
        dict(
            image_size=28,
            in_channels=1,
            base_channels=16,
            channel_mult=(1, 2, 2),
            num_res_blocks=2,
            num_heads=2,
            dropout=0.1,
            num_classes=10,
        ),
        (2,),
    ),
    # The paper's architecture (Ghalebikesabi et al., 2023). `# paper (appendix)`: from the
    # tracker's summary of the paper's appendix; `# ours`: our choice.
    "paper_cifar": (
        dict(
            image_size=32,
            in_channels=3,
            base_channels=192,  # paper (appendix)
            channel_mult=(1, 2, 2, 2),  # paper (appendix)
            num_res_blocks=2,  # ours
            num_heads=4,  # ours
            dropout=0.1,  # ours
            num_classes=10,
            resblock_updown=False,  # ours
            conv_resample=True,  # ours
        ),
        (1, 2),  # attention at 16x16 and 8x8: paper (appendix)
    ),
}
PRESET_NAMES = tuple(_PRESETS)


def unet_preset(name: str, **overrides: Any) -> UNetConfig:
    """A named architecture, optionally with some fields overridden.

    Presets (parameter counts are asserted in tests/models/test_unet.py; they do not depend on
    the image size, only the activations do):
        "tiny": 8x8x3, 10 classes, base 8, channel_mult (1, 2), 1 block/level, attention at 4x4:
            49,043 parameters. For unit tests.
        "cpu_small": 28x28x1, 10 classes, base 16, channel_mult (1, 2, 2), 2 blocks/level,
            attention at the coarsest level (7x7; 4x4 at image_size=16): 439,505 parameters.
            For CPU experiments on Fashion-MNIST / digits.
        "paper_cifar": 32x32x3, 10 classes, 89,110,083 parameters.
            From the paper (Ghalebikesabi et al., 2023): a class-conditional improved-DDPM/ADM-style
            UNet with more than 80M parameters, pretrained on ImageNet 32x32 then DP fine-tuned on
            CIFAR-10. From the tracker's summary of the paper's appendix (not re-checked against the
            appendix text, which was not available here): base width 192, channel_mult (1, 2, 2, 2),
            attention at 16x16 and 8x8. Our choices: 2 ResBlocks per level (with 192 channels this
            gives 89M, closest to "80M+"; 3 blocks would give 118M, 3 blocks with ResBlock
            resampling 128M), 4 heads, dropout 0.1, conv resampling, scale-shift norm.

    Unless `attention_resolutions` is overridden, the preset's attention levels are converted
    to pixel sizes for the (possibly overridden) `image_size` and `channel_mult`.

    Raises:
        ValueError: unknown preset name, unknown field, or an invalid resulting config.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; known presets: {PRESET_NAMES}")
    fields, attention_levels = _PRESETS[name]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(UNetConfig)}
    if unknown:
        raise ValueError(f"unknown UNetConfig fields: {sorted(unknown)}")
    merged = {**fields, **overrides}
    if "attention_resolutions" not in overrides:
        merged["attention_resolutions"] = tuple(merged["image_size"] // 2**level
                                                for level in attention_levels
                                                if level < len(merged["channel_mult"]))
    return UNetConfig(**merged)
