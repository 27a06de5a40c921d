"""Flax port of the Inception-v3 used by standard FID implementations.

This is the network of pytorch-fid's `fid_inception_v3()` (`FIDInceptionV3`), itself a port of
the 2015 TensorFlow graph that defined FID (`inception-2015-12-05`). It differs from
torchvision's ImageNet Inception-v3 in three places, all reproduced here:

* Mixed_5b/5c/5d (A), Mixed_6b..6e (C) and Mixed_7b (E_1) average-pool their pool branch
  without counting the zero padding (`count_include_pad=False`, TensorFlow's behaviour);
* Mixed_7c (E_2) max-pools its pool branch (a quirk of that graph);
* the weights (1008-way classifier, TF batch-norm statistics).

Features are the 2048-d "pool3" activations: global average pool after Mixed_7c. Inputs are
resized to 299x299 by bilinear interpolation with half-pixel centres (torch's
`F.interpolate(..., mode="bilinear", align_corners=False)`, implemented exactly below) and
scaled to [-1, 1], as pytorch-fid does with `resize_input=True, normalize_input=True`.
Batch norm always uses the stored running statistics (eps = 1e-3): this is a frozen feature
extractor, so a feature never depends on the other images in its batch.

Weights: this module reads no files and never imports torch; it turns a flat torch-layout
state dict into Flax variables (`variables_from_flat`). `inception_weights` finds and loads
the file: `resolve` fetches the standard file once into a cache when asked
(`eval.download_inception_weights`), verifies its SHA-256 and converts it, and
`load_inception_params` reads a local `.npz` (or a `.pth`, with torch). By hand: get
`pt_inception-2015-12-05-6726825d.pth` from pytorch-fid's GitHub release assets
(https://github.com/mseitzer/pytorch-fid/releases, tag `fid_weights`) on a machine with
internet, then convert it once, so that evaluation needs no torch:

    python -m jaxdpdm.evaluation.convert_inception_weights pt_inception-2015-12-05-6726825d.pth \
        fid_inception.npz

The `.npz` keeps pytorch-fid's state-dict names and torch layouts (`reference_param_shapes()`);
a file that deviates raises a `ValueError` naming the first missing/unexpected/mis-shaped one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

INPUT_SIZE = 299
FEATURE_DIM = 2048
BATCH_NORM_EPS = 1e-3
# The 2015 graph classifies into 1008 classes; a file with another fc shape is not the FID net.
FID_FC_SHAPES = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}

# ----------------------------------------------------------------------------------------------
# Flax modules. Submodule names are pytorch-fid's state-dict names, so converting weights is a
# pure re-layout.


class BasicConv2d(nn.Module):
    """Bias-free conv, batch norm (running statistics), ReLU: `[B,H,W,I] -> [B,H',W',O]`."""
    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    precision: lax.Precision | None = lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = [(self.padding[0], self.padding[0]), (self.padding[1], self.padding[1])]
        x = nn.Conv(self.features, self.kernel_size, self.strides, padding=pad, use_bias=False,
                    precision=self.precision, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TensorFlow's SAME average pool divides by the number of real (unpadded) inputs.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """FIDInceptionA (Mixed_5b/c/d): `[B,35,35,I] -> [B,35,35,224+pool_features]`."""
    pool_features: int
    precision: lax.Precision | None = lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """InceptionB (Mixed_6a, grid reduction): `[B,35,35,I] -> [B,17,17,480+I]`."""
    precision: lax.Precision | None = lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC (Mixed_6b..6e), factorised 7x7 convs: `[B,17,17,768] -> [B,17,17,768]`."""
    channels_7x7: int
    precision: lax.Precision | None = lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """InceptionD (Mixed_7a, grid reduction): `[B,17,17,768] -> [B,8,8,1280]`."""
    precision: lax.Precision | None = lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (Mixed_7b) or, with `max_pool_branch`, _2 (Mixed_7c): `-> [B,8,8,2048]`."""
    max_pool_branch: bool
    precision: lax.Precision | None = lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = [
            conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)
        ]
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = [
            conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)
        ]
        if self.max_pool_branch:  # the 2015 graph's quirk in its last block
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3_same(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """FID Inception-v3 trunk up to pool3.

    `__call__(x)`: x f32 `[B, H, W, 3]` already scaled to [-1, 1] (299x299 for standard FID;
    see `preprocess_images`), H, W >= 75. Returns pool3 features f32 `[B, 2048]`.
    `precision`: convolution precision; HIGHEST by default so that statistics do not depend on
    the accelerator's reduced-precision matmul modes (TF32 / bf16 passes).
    """
    precision: lax.Precision | None = lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        p = self.precision
        x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        x = InceptionA(32, p, name="Mixed_5b")(x)
        x = InceptionA(64, p, name="Mixed_5c")(x)
        x = InceptionA(64, p, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        x = InceptionC(128, p, name="Mixed_6b")(x)
        x = InceptionC(160, p, name="Mixed_6c")(x)
        x = InceptionC(160, p, name="Mixed_6d")(x)
        x = InceptionC(192, p, name="Mixed_6e")(x)
        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE(max_pool_branch=False, precision=p, name="Mixed_7b")(x)
        x = InceptionE(max_pool_branch=True, precision=p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------------------------
# Weights: the reference layout, and flat torch-layout dict <-> Flax variables.


@functools.lru_cache(maxsize=1)
def _reference_layout() -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Read off the Flax module without allocating (eval_shape). The tests pin it to the
    # independent sources: torchvision's documented parameter count and pytorch-fid's strict
    # `load_state_dict`.
    variables = jax.eval_shape(lambda: InceptionV3().init(
        jax.random.key(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)))
    layout = []

    def walk(node, path):
        if "conv" in node and "bn" in node:  # a BasicConv2d
            kh, kw, cin, cout = node["conv"]["kernel"].shape
            layout.append((f"{path}.conv.weight", (cout, cin, kh, kw)))
            layout.extend((f"{path}.bn.{f}", (cout,))
                          for f in ("weight", "bias", "running_mean", "running_var"))
            return
        for name, child in node.items():
            walk(child, f"{path}.{name}" if path else name)

    walk(variables["params"], "")
    return tuple(layout)


def reference_param_shapes() -> dict[str, tuple[int, ...]]:
    """The FID Inception's parameters up to pool3, as pytorch-fid's state dict names them.

    Returns:
      A dict name -> torch shape (blocks in network order, branches by name), e.g.
      `'Conv2d_1a_3x3.conv.weight': (32, 3, 3, 3)`, `'Mixed_5b.branch1x1.bn.running_var': (64,)`.
      The classifier `fc.*` (unused for FID) and the `num_batches_tracked` counters are not
      included.
    """
    return dict(_reference_layout())


_FLAX_FIELD = {
    "conv.weight": ("params", "conv", "kernel"), "bn.weight": ("params", "bn", "scale"),
    "bn.bias": ("params", "bn", "bias"), "bn.running_mean": ("batch_stats", "bn", "mean"),
    "bn.running_var": ("batch_stats", "bn", "var")
}


def _split_name(name: str) -> tuple[list[str], str]:
    parts = name.split(".")
    return parts[:-2], ".".join(parts[-2:])  # (module path, "conv.weight" / "bn.running_mean" ...)


def variables_from_flat(flat: Mapping[str, np.ndarray]) -> dict:
    """Validates a flat pytorch-fid state dict and re-lays it out as Flax variables.

    Args:
      flat: name -> array in torch layout (conv weights `[O, I, kh, kw]`). `fc.*` (if shaped as
        the 1008-class FID classifier) and `*.num_batches_tracked` entries are ignored.
    Returns:
      `{"params": ..., "batch_stats": ...}` for `InceptionV3().apply`, float32 numpy leaves.
    Raises:
      ValueError naming the first missing, mis-shaped or unexpected parameter.
    """
    reference = reference_param_shapes()
    for name, shape in {**reference, **FID_FC_SHAPES}.items():  # reports the first bad one
        if name not in flat:
            if name in FID_FC_SHAPES:
                continue  # the classifier is optional: FID does not use it
            raise ValueError(f"Inception weights: missing parameter {name!r} (expected shape "
                             f"{shape}); not the FID Inception (pt_inception-2015-12-05)?")
        got = tuple(np.shape(flat[name]))
        if got != shape:
            hint = (" (1000 classes would be torchvision's ImageNet Inception, whose FIDs are "
                    "not comparable)" if name in FID_FC_SHAPES else "")
            raise ValueError(f"Inception weights: parameter {name!r} has shape {got}, "
                             f"expected {shape}{hint}")
    for name in flat:
        if name not in reference and name not in FID_FC_SHAPES \
                and not name.endswith(".num_batches_tracked"):
            raise ValueError(f"Inception weights: unexpected parameter {name!r}; "
                             "not the FID Inception")
    variables: dict = {"params": {}, "batch_stats": {}}
    for name in reference:
        path, field = _split_name(name)
        collection, leaf_module, leaf = _FLAX_FIELD[field]
        value = np.asarray(flat[name], dtype=np.float32)
        if not np.all(np.isfinite(value)):
            raise ValueError(f"Inception weights: parameter {name!r} has non-finite values")
        if field == "conv.weight":
            value = value.transpose(2, 3, 1, 0)  # torch [O, I, kh, kw] -> Flax [kh, kw, I, O]
        node = variables[collection]
        for part in path + [leaf_module]:
            node = node.setdefault(part, {})
        node[leaf] = value
    return variables


def flat_from_variables(variables: Mapping) -> dict[str, np.ndarray]:
    """Inverse of `variables_from_flat`: Flax variables -> flat torch-layout dict (float32)."""
    flat = {}
    for name in reference_param_shapes():
        path, field = _split_name(name)
        collection, leaf_module, leaf = _FLAX_FIELD[field]
        node = variables[collection]
        for part in path + [leaf_module]:
            node = node[part]
        value = np.asarray(node[leaf], dtype=np.float32)
        flat[name] = value.transpose(3, 2, 0, 1) if field == "conv.weight" else value
    return flat


# ----------------------------------------------------------------------------------------------
# Input pipeline and the feature function.


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Interpolation matrix `[out_size, in_size]` of torch's bilinear `align_corners=False`.

    Source coordinate of output pixel o is `(o + 0.5) * in/out - 0.5`, clamped below at 0; the
    two neighbours are clamped to the last pixel. No antialiasing when shrinking (unlike
    `jax.image.resize`), because torch's `F.interpolate` has none by default and FID
    statistics must match pytorch-fid's.
    """
    # The rounding of torch's CPU kernel, so the weights agree bitwise: a float32 scale, the
    # source coordinate evaluated in double (its `dst + 0.5` literal is a double), then float32.
    # (torch's CUDA kernel stays in float32 and differs from its CPU kernel by ~1e-6.)
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(f32)
    src = np.maximum(src, f32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (src - lo.astype(f32)).astype(f32)
    matrix = np.zeros((out_size, in_size), f32)
    np.add.at(matrix, (np.arange(out_size), lo), f32(1.0) - frac)
    np.add.at(matrix, (np.arange(out_size), hi), frac)
    return matrix


def preprocess_images(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """uint8 `[B,H,W,C]` (or float in [0, 1]), C in {1, 3} -> f32 `[B,size,size,3]` in [-1, 1].

    Grayscale is replicated to 3 channels; resizing happens in [0, 1], then `2x - 1`, the order
    pytorch-fid uses.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected images [B, H, W, C] with C in (1, 3), got shape {images.shape}")
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 255.0
    elif jnp.issubdtype(images.dtype, jnp.floating):
        x = images.astype(jnp.float32)
    else:
        raise ValueError(f"expected uint8 or float images, got dtype {images.dtype}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    h, w = x.shape[1:3]
    hp = lax.Precision.HIGHEST  # keep the resize exact in float32 on TPU/GPU too
    if h != size:
        x = jnp.einsum("oh,bhwc->bowc", bilinear_resize_matrix(h, size), x, precision=hp)
    if w != size:
        x = jnp.einsum("pw,bowc->bopc", bilinear_resize_matrix(w, size), x, precision=hp)
    return 2.0 * x - 1.0


def make_feature_fn(params: Mapping, batch_size: int, *,
                    precision: lax.Precision | None = lax.Precision.HIGHEST,
                    mesh: Mesh | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """Returns `features(images) -> np.float32[N, 2048]` computing pool3 features.

    `images`: uint8 `[N, H, W, C]` (or float in [0, 1]), C in {1, 3}, any N. They are processed
    in batches of exactly `batch_size` (the last one zero-padded, padding discarded) so the
    jitted network compiles once per image shape.

    Args:
      params: Flax variables from `inception_weights.load_inception_params` (`params` and
        `batch_stats`).
      batch_size: images per device call; with `mesh`, a multiple of its device count.
      precision: convolution precision (see `InceptionV3`).
      mesh: optional 1-D mesh with axis "data": the batch is sharded over it, weights replicated.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = InceptionV3(precision=precision)

    def forward(variables, images):
        return model.apply(variables, preprocess_images(images))

    if mesh is None:
        jitted = jax.jit(forward)
        variables = jax.device_put(params)
    else:
        if mesh.axis_names != ("data",):
            raise ValueError(f"mesh must have the single axis 'data', got {mesh.axis_names}")
        if batch_size % mesh.size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the {mesh.size} devices")
        replicated = NamedSharding(mesh, PartitionSpec())
        batch_sharded = NamedSharding(mesh, PartitionSpec("data"))
        jitted = jax.jit(forward, in_shardings=(replicated, batch_sharded),
                         out_shardings=batch_sharded)
        variables = jax.device_put(params, replicated)

    def features(images) -> np.ndarray:
        images = np.asarray(images)
        n = images.shape[0]
        out = np.empty((n, FEATURE_DIM), np.float32)
        for start in range(0, n, batch_size):
            batch = images[start:start + batch_size]
            m = batch.shape[0]
            if m < batch_size:
                pad = np.zeros((batch_size - m, *batch.shape[1:]), batch.dtype)
                batch = np.concatenate([batch, pad])
            out[start:start + m] = np.asarray(jitted(variables, batch))[:m]
        return out

    return features
