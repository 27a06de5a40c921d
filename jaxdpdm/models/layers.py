"""Building blocks of the diffusion UNet (`jaxdpdm.models.unet`).

Every block works on channels-last images `[B, H, W, C]` and is per-example: the only
normalisation is GroupNorm, whose statistics are taken over (H, W, channels of one group) of a
single example. Nothing mixes examples of a batch, which is what DP-SGD needs: the model is
called inside `jax.vmap` over examples and each example's gradient must depend on that example
alone.

Mixed precision: every layer takes a compute `dtype` (float32 or bfloat16) and keeps its
parameters in float32 (`param_dtype`). Statistics (GroupNorm moments, attention softmax) are
computed in float32 whatever the compute dtype, because bfloat16 has too few mantissa bits for
sums over thousands of elements.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Kernel initialiser of the last layer of every residual branch: zero, so each residual block
# (and the whole network) starts as the identity / zero map. This is the standard DDPM/ADM
# choice; it makes deep UNets trainable from the first step.
zero_init = nn.initializers.zeros


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups used for `channels` channels.

    Rule: the largest divisor of `channels` that is at most `min(max_groups, channels)`. Wide
    layers (multiples of 32 channels) get the standard 32 groups; narrow CPU-sized layers get
    fewer, e.g. 8 channels -> 8 groups, 48 -> 24, 20 -> 20, 40 -> 20. GroupNorm needs the
    group count to divide the channel count, so a plain `min(32, channels)` would fail for 40.

    Raises:
        ValueError: `channels` or `max_groups` is not positive.
    """
    if channels < 1 or max_groups < 1:
        raise ValueError(f"channels and max_groups must be positive, got {channels}, {max_groups}")
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding of (integer or real) timesteps, as in the Transformer/DDPM.

    Frequencies are geometric from 1 down to 1/max_period, so timesteps 0..999 get both slowly
    and quickly varying features.

    Args:
        t: timesteps `[B]` (int or float; fractional timesteps are allowed).
        dim: embedding width (odd widths get one trailing zero feature).
        max_period: the slowest period.

    Returns:
        float32 `[B, dim]`: `[cos(t * f_i), sin(t * f_i)]`.
    """
    if dim < 1:
        raise ValueError(f"embedding dim must be positive, got {dim}")
    t = jnp.asarray(t, jnp.float32)
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {t.shape}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half, 1))
    args = t[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int,
               epsilon: float = 1e-5, dtype: Dtype = None) -> jax.Array:
    """GroupNorm of each example: `[B, ..., C]` -> same shape, in `dtype` (default x's).

    Per example, the moments are taken over every axis between the first and the last and over
    the C / `groups` channels of each group, in float32 (variance E[x^2] - E[x]^2 clipped at
    zero), then each channel is scaled by `scale` `[C]` and shifted by `bias` `[C]`. These are
    the values of flax's `nn.GroupNorm` (tested equal); the moments are reduced over a
    `[B, spatial, groups, C / groups]` view, a form XLA:CPU fuses with the normalisation into
    one pass over the activations, where flax's form gave two (the sampler's UNet forward pass
    1.05-1.1x faster on CPU; benchmarks/RESULTS.md section 27).
    """
    batch, channels = x.shape[0], x.shape[-1]
    if channels % groups:
        raise ValueError(f"{groups} groups do not divide {channels} channels")
    x32 = x.astype(jnp.float32)
    grouped = x32.reshape(batch, -1, groups, channels // groups)
    mean = grouped.mean(axis=(1, 3))  # [B, groups]
    var = jnp.maximum(0.0, jnp.square(grouped).mean(axis=(1, 3)) - jnp.square(mean))
    broadcast_shape = (batch,) + (1,) * (x.ndim - 2) + (channels,)

    def per_channel(stat):  # [B, groups] -> broadcastable against x
        return jnp.repeat(stat, channels // groups, axis=-1).reshape(broadcast_shape)

    y = (x32 - per_channel(mean)) * (per_channel(jax.lax.rsqrt(var + epsilon)) * scale) + bias
    return y.astype(dtype if dtype is not None else x.dtype)


class _ScaleBias(nn.Module):
    """The per-channel `scale` (ones) and `bias` (zeros) of a GroupNorm, float32 `[features]`;
    a submodule named "norm" so parameter paths are those of flax's `nn.GroupNorm` there."""

    features: int

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        shape = (self.features,)
        return (self.param("scale", nn.initializers.ones, shape, jnp.float32),
                self.param("bias", nn.initializers.zeros, shape, jnp.float32))


class GroupNorm(nn.Module):
    """GroupNorm with the group-count rule of `group_norm_groups`; per example, no batch stats.

    Attributes:
        dtype: output dtype (moments are reduced in float32).
    """

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` (or `[B, L, C]`) -> same shape, normalised over spatial x group."""
        scale, bias = _ScaleBias(x.shape[-1], name="norm")()
        return group_norm(x, scale, bias, group_norm_groups(x.shape[-1]), 1e-5, self.dtype)


CONV_IMPLS = ("xla", "patch_matmul")


def conv_nhwc(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    """`[B, H, W, Cin]` * `[kh, kw, Cin, Cout]` -> `[B, H', W', Cout]` (XLA's convolution)."""
    return jax.lax.conv_general_dilated(x, kernel, (strides, strides),
                                        ((padding, padding), (padding, padding)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_patch_matmul_grad(x: jax.Array, kernel: jax.Array, strides: int,
                           padding: int) -> jax.Array:
    """XLA's convolution whose KERNEL gradient is a sum of matmuls, one per kernel tap; the
    value and the input gradient are XLA's own. Same mathematics as `conv_nhwc`.

    The kernel gradient of tap (i, j) is `(g^T @ x_shifted(i, j))^T`, the sum over (batch,
    positions) in one matmul, where `x_shifted(i, j)` `[B*H'*W', Cin]` is the padded input seen by
    that tap (a strided slice; no patch tensor is built) and `g^T` `[Cout, B*H'*W']`.

    Why: under `jax.vmap` (per-example gradients for DP-SGD) XLA turns the kernel gradient of a
    convolution into a grouped convolution with one group per example, which XLA:CPU feeds with
    large layout transposes; here each tap is a batched matmul over examples instead. Which is
    faster depends on the shapes and the machine (benchmarks/RESULTS.md sections 10b and 21; on
    CPU, `benchmarks/conv_impl.py` compares both for a config): on a 2-core AVX-512 CPU the
    Fashion-MNIST DP step was 1.32x faster with it and the cpu_small one at 16x16 2x, while
    cpu_small at 28x28 with 64-example calls was 2.3x slower; non-private steps were slower with
    it. DP configs choose it with `dp.conv_impl`; on GPU it is unmeasured
    (`benchmarks/gpu_check.sh --conv`). The tap slices are copied (kh*kw times the layer input)
    while the kernel gradient is computed.
    """
    return conv_nhwc(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
    return conv_nhwc(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x_: conv_nhwc(x_, kernel, strides, padding), x)
    (dx,) = input_vjp(g)
    kh, kw = kernel.shape[:2]
    out_h, out_w = g.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = g.shape[0] * out_h * out_w
    # The output gradient transposed ONCE, `[Cout, B*H'*W']`, is the left operand of every tap's
    # matmul; each tap's input slice is the right operand in its natural layout. (The other
    # order, `x_tap^T @ g`, makes XLA:CPU transpose each of the kh*kw input slices.)
    g_t = g.astype(x.dtype).reshape(rows, -1).T
    # Tap (i, j) sees xp[b, h*s + i, w*s + j, c] at output position (h, w).
    taps = [
        jnp.matmul(g_t,
                   xp[:, i:i + strides * (out_h - 1) + 1:strides,
                      j:j + strides * (out_w - 1) + 1:strides].reshape(rows, -1),
                   preferred_element_type=jnp.float32)
        for i in range(kh)
        for j in range(kw)
    ]  # each [Cout, Cin]
    dkernel = jnp.stack(taps).transpose(0, 2, 1).reshape(kernel.shape)
    return dx, dkernel.astype(kernel.dtype)


conv_patch_matmul_grad.defvjp(_conv_fwd, _conv_bwd)


class Conv(nn.Module):
    """Square convolution with bias, `[B, H, W, Cin]` -> `[B, H/strides, W/strides, features]`.

    Parameters are named like `flax.linen.Conv`'s ("kernel" `[k, k, Cin, features]`, "bias"), so
    checkpoints do not depend on `impl`.

    Attributes:
        features: output channels.
        kernel_size: k (odd); padding (k - 1) / 2 keeps the size at stride 1.
        strides: stride in both directions.
        zero: zero-initialise the kernel (last layer of a residual branch).
        dtype: compute dtype (parameters stay float32).
        impl: how the kernel gradient is computed; the values, and the mathematics, are the same:
            "xla": XLA's convolution and its own gradient;
            "patch_matmul": `conv_patch_matmul_grad` (kernel gradient as one matmul per kernel
                tap). See benchmarks/RESULTS.md section 10 for which is faster where.
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    zero: bool = False
    dtype: Dtype = jnp.float32
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.impl not in CONV_IMPLS:
            raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {self.impl!r}")
        shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
        init = zero_init if self.zero else nn.initializers.lecun_normal()
        kernel = self.param("kernel", init, shape, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        conv = conv_patch_matmul_grad if self.impl == "patch_matmul" else conv_nhwc
        return conv(x, kernel, self.strides, (self.kernel_size - 1) // 2) + bias


def conv3x3(features: int, dtype: Dtype, *, zero: bool = False, strides: int = 1, impl: str = "xla",
            name: str | None = None) -> Conv:
    """3x3 convolution with padding 1 (a stride-2 one halves even sizes exactly)."""
    return Conv(features, 3, strides=strides, zero=zero, dtype=dtype, impl=impl, name=name)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """`[B, H, W, C]` -> `[B, 2H, 2W, C]` by repeating pixels."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def downsample_avg(x: jax.Array) -> jax.Array:
    """`[B, H, W, C]` -> `[B, H/2, W/2, C]` by 2x2 average pooling (H, W even)."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
    """Halves the spatial size: stride-2 3x3 conv (`use_conv`) or 2x2 average pooling.

    Attributes:
        use_conv: learnable stride-2 conv instead of a parameter-free average pool.
        dtype: compute dtype.
        conv_impl: `Conv.impl` of its convolutions.
    """

    use_conv: bool = True
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H/2, W/2, C]`."""
        if self.use_conv:
            return conv3x3(x.shape[-1], self.dtype, strides=2, impl=self.conv_impl, name="conv")(x)
        return downsample_avg(x)


class Upsample(nn.Module):
    """Doubles the spatial size: nearest-neighbour repeat, then (`use_conv`) a 3x3 conv.

    Attributes:
        use_conv: follow the repeat with a 3x3 conv that smooths the blocky upsampling.
        dtype: compute dtype.
        conv_impl: `Conv.impl` of its convolutions.
    """

    use_conv: bool = True
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, 2H, 2W, C]`."""
        x = upsample_nearest(x)
        if self.use_conv:
            x = conv3x3(x.shape[-1], self.dtype, impl=self.conv_impl, name="conv")(x)
        return x


class ResBlock(nn.Module):
    """Residual block with scale-shift conditioning on the (time + class) embedding.

    `h = conv(GN(x) act); h = GN(h) * (1 + scale(emb)) + shift(emb); h = conv0(dropout(act h))`,
    output `skip(x) + h`. With `up`/`down` the block also resamples (BigGAN-style, as in ADM):
    both branches are resampled after the first norm+activation of the residual branch.

    Attributes:
        out_channels: channels of the output.
        dropout: dropout rate before the last conv (active only when `train`).
        up: double the spatial size inside the block.
        down: halve the spatial size inside the block.
        dtype: compute dtype.
        conv_impl: `Conv.impl` of its convolutions.
    """

    out_channels: int
    dropout: float = 0.0
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, *, train: bool) -> jax.Array:
        """Applies the block.

        Args:
            x: `[B, H, W, C_in]`.
            emb: `[B, E]` conditioning embedding (already passed through its MLP).
            train: enables dropout (needs the "dropout" rng collection).

        Returns:
            `[B, H', W', out_channels]` with H' = 2H (up), H/2 (down) or H.
        """
        if self.up and self.down:
            raise ValueError("a ResBlock cannot both upsample and downsample")
        h = nn.silu(GroupNorm(self.dtype, name="in_norm")(x))
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = downsample_avg(h), downsample_avg(x)
        h = conv3x3(self.out_channels, self.dtype, impl=self.conv_impl, name="in_conv")(h)

        # One Dense gives both scale and shift per channel; the "1 +" makes a zero scale the
        # identity, so the conditioning starts as a small perturbation of plain GroupNorm.
        scale_shift = nn.Dense(2 * self.out_channels, dtype=self.dtype, param_dtype=jnp.float32,
                               name="emb_proj")(nn.silu(emb))
        scale, shift = jnp.split(scale_shift[:, None, None, :], 2, axis=-1)
        h = GroupNorm(self.dtype, name="out_norm")(h) * (1 + scale) + shift
        h = nn.Dropout(rate=self.dropout, deterministic=not train)(nn.silu(h))
        h = conv3x3(self.out_channels, self.dtype, zero=True, impl=self.conv_impl,
                    name="out_conv")(h)

        if x.shape[-1] != self.out_channels:
            # 1x1 projection of the skip path when the width changes.
            x = Conv(self.out_channels, 1, dtype=self.dtype, impl=self.conv_impl,
                     name="skip_proj")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions of one example, with a residual.

    Attributes:
        num_heads: number of heads; must divide the channel count.
        dtype: compute dtype (the softmax runs in float32).
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """`[B, H, W, C]` -> `[B, H, W, C]`: `x + proj0(attention(GN(x)))`."""
        batch, height, width, channels = x.shape
        if channels % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide {channels} channels")
        head_dim = channels // self.num_heads
        h = GroupNorm(self.dtype, name="norm")(x).reshape(batch, height * width, channels)
        qkv = nn.Dense(3 * channels, dtype=self.dtype, param_dtype=jnp.float32, name="qkv")(h)
        qkv = qkv.reshape(batch, height * width, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, L, heads, head_dim]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits / math.sqrt(head_dim), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, height * width, channels)
        out = nn.Dense(
            channels,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=zero_init,
            name="proj_out",
        )(out)
        return x + out.reshape(batch, height, width, channels).astype(x.dtype)
