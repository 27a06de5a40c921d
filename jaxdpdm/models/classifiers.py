"""Downstream image classifiers used to judge synthetic data (Flax linen).

Two architectures, both taking float32 images in [-1, 1] of shape [B, H, W, C] and
returning logits [B, num_classes]:

* `DPDMCNN`: the small CNN that DPDM (Dockhorn et al., 2023) trains on synthetic MNIST /
    Fashion-MNIST: three 3x3 conv layers (32, 64, 128 channels), each followed by ReLU and
    2x2 max-pooling, then dropout 0.5, a dense layer of 128 units with ReLU, and the
    classification layer.
* `WideResNet`: the pre-activation wide residual network of Zagoruyko & Komodakis (2016);
    `classifier_for("wrn16_4", ...)` gives WRN-16-4 (depth 16, width 4, ~2.75M parameters
    for 10 classes), the downstream classifier of Ghalebikesabi et al. (2023) on CIFAR-10.

Normalisation choice: the standard WRN uses BatchNorm. These classifiers are trained
non-privately, so BatchNorm would be allowed, but we use GroupNorm (16 groups): it keeps
the model a pure function of (params, images) with no mutable `batch_stats` collection to
thread through training and evaluation, makes evaluation independent of batch
composition and padding, and lets every classifier share one train/eval step.
GroupNorm has the same learnable scale/bias per channel as BatchNorm, so the parameter
count equals that of the BatchNorm WRN.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdpdm.models import count_params

CLASSIFIER_NAMES = ("cnn", "wrn16_4")


class DPDMCNN(nn.Module):
    """DPDM's downstream CNN for MNIST-like images.

    Attributes:
        num_classes: number of output logits.
        conv_channels: output channels of the three 3x3 conv layers.
        dense_features: width of the hidden dense layer.
        dropout_rate: dropout applied to the flattened conv features (uses the "dropout"
            rng collection when `train=True`).
    """

    num_classes: int
    conv_channels: Sequence[int] = (32, 64, 128)
    dense_features: int = 128
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """images f32[B, H, W, C] in [-1, 1] -> logits f32[B, num_classes].

        Each of the len(conv_channels) stages halves H and W (floor, as PyTorch's
        MaxPool2d), so H and W must be at least 2**len(conv_channels) (8 for the default).
        """
        min_size = 2**len(self.conv_channels)
        if images.ndim != 4 or min(images.shape[1:3]) < min_size:
            raise ValueError(
                f"DPDMCNN needs images [B, H, W, C] with H, W >= {min_size} "
                f"(it pools {len(self.conv_channels)} times); got shape {images.shape}")
        x = images
        for channels in self.conv_channels:
            # SAME padding keeps the conv from shrinking the map, so only pooling
            # reduces resolution and 8x8 inputs still reach a 1x1 map.
            x = nn.Conv(channels, (3, 3), padding="SAME")(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.relu(nn.Dense(self.dense_features)(x))
        return nn.Dense(self.num_classes)(x)


class WideResidualBlock(nn.Module):
    """Pre-activation residual block: norm-relu-conv3x3-norm-relu-dropout-conv3x3.

    Attributes:
        out_channels: channels of the block's output.
        stride: stride of the first conv (2 halves H and W).
        num_groups: GroupNorm groups (must divide the input and output channels).
        dropout_rate: dropout between the two convs (0 in the standard WRN-16-4).
    """

    out_channels: int
    stride: int
    num_groups: int
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """x f32[B, H, W, C_in] -> f32[B, H/stride, W/stride, out_channels]."""
        preactivated = nn.relu(nn.GroupNorm(num_groups=self.num_groups)(x))
        needs_projection = self.stride != 1 or x.shape[-1] != self.out_channels
        # As in the reference WRN, the projection shortcut reads the pre-activated
        # input; the identity shortcut carries the raw input.
        shortcut = (nn.Conv(self.out_channels, (1, 1), strides=self.stride,
                            use_bias=False)(preactivated) if needs_projection else x)
        y = nn.Conv(self.out_channels, (3, 3), strides=self.stride, padding=1,
                    use_bias=False)(preactivated)
        y = nn.relu(nn.GroupNorm(num_groups=self.num_groups)(y))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = nn.Conv(self.out_channels, (3, 3), padding=1, use_bias=False)(y)
        return shortcut + y


class WideResNet(nn.Module):
    """Wide ResNet WRN-`depth`-`width` for CIFAR-like images.

    Three groups of (depth - 4) / 6 residual blocks with 16*width, 32*width, 64*width
    channels; the second and third groups start with stride 2.

    Attributes:
        num_classes: number of output logits.
        depth: total depth; (depth - 4) must be divisible by 6.
        width: channel multiplier.
        num_groups: GroupNorm groups (must divide 16 and 16*width).
        dropout_rate: dropout inside residual blocks.
    """

    num_classes: int
    depth: int = 16
    width: int = 4
    num_groups: int = 16
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """images f32[B, H, W, C] in [-1, 1] -> logits f32[B, num_classes]."""
        if (self.depth - 4) % 6 != 0 or self.depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1; got {self.depth}")
        blocks_per_group = (self.depth - 4) // 6
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False)(images)
        for group, channels in enumerate((16 * self.width, 32 * self.width, 64 * self.width)):
            for block in range(blocks_per_group):
                stride = 2 if group > 0 and block == 0 else 1
                x = WideResidualBlock(channels, stride, self.num_groups,
                                      self.dropout_rate)(x, train=train)
        x = nn.relu(nn.GroupNorm(num_groups=self.num_groups)(x))
        x = jnp.mean(x, axis=(1, 2))  # global average pooling: any input size works
        return nn.Dense(self.num_classes)(x)


def classifier_for(name: str, num_classes: int) -> nn.Module:
    """The downstream classifier called `name` ("cnn" | "wrn16_4") with `num_classes` logits."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    if name == "cnn":
        return DPDMCNN(num_classes=num_classes)
    if name == "wrn16_4":
        return WideResNet(num_classes=num_classes, depth=16, width=4)
    raise ValueError(f"unknown classifier {name!r}; expected one of {CLASSIFIER_NAMES}")


def init_classifier(module: nn.Module, key: jax.Array, image_shape: tuple[int, int, int]):
    """Initial params of `module` for images [H, W, C] (a batch of one traces the shapes)."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    return module.init({"params": key}, dummy, train=False)["params"]


def count_parameters(module: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Number of scalar parameters of `module` for images [H, W, C], via jax.eval_shape.

    Nothing is allocated: only the shapes of the initial params are traced.
    """
    return count_params(
        jax.eval_shape(lambda key: init_classifier(module, key, image_shape), jax.random.key(0)))
