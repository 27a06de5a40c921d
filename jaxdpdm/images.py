"""Small host-side image utilities shared by sampling, evaluation and the training loop.

Conventions (see the package spec): images on the host are uint8 `[N, H, W, C]`; models see
float32 in [-1, 1], and `to_model_range` / `from_model_range` are the one pair of conversions
between the two. These helpers use numpy only, on purpose: they run after a device transfer and
must not trigger compilation (`to_model_range` also accepts a jax array, traced or not, and then
stays in jax). Pillow is imported only when a PNG is written.
"""

from __future__ import annotations

import io
import os

import numpy as np

from jaxdpdm import storage


def to_model_range(pixels):
    """Maps uint8 pixels {0..255} to float32 in [-1, 1], the range the models see.

    Works on numpy arrays and on jax arrays (also traced, inside `jit`: the conversion then runs
    on the device, after a uint8 transfer a quarter the size of float32). On the host
    `x / 127.5 - 1` is exact at 0 and 255; compiled, XLA multiplies by the reciprocal, so a value
    can differ by one float32 ulp (255 -> 1.0000001). Either way `from_model_range` gives back
    the pixels exactly.

    Args:
      pixels: uint8 array `[...]` (numpy or jax), e.g. images `[N, H, W, C]`.
    Returns:
      float32 array of the same shape and kind (numpy in, numpy out; jax in, jax out).
    """
    if not hasattr(pixels, "dtype"):
        pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8:
        raise ValueError(f"to_model_range expects uint8 pixels, got dtype {pixels.dtype}")
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def from_model_range(values) -> np.ndarray:
    """Maps float images in [-1, 1] to uint8 pixels in [0, 255], on the host.

    Rounds to the nearest level (improved-diffusion truncates, which biases every pixel down by
    half a level); values outside [-1, 1] are clipped, NaN becomes 0.

    Args:
      values: float array `[...]` (numpy or jax) in [-1, 1].
    Returns:
      np.uint8 array of the same shape.
    """
    x = np.asarray(values, dtype=np.float32)
    x = np.nan_to_num(x, nan=-1.0)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images, rows: int, *, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tiles images into one image with `rows` rows, filled row by row.

    Args:
      images: uint8 `[N, H, W, C]` with C in {1, 3}.
      rows: number of rows (>= 1); columns = ceil(N / rows). Missing cells stay `pad_value`.
      padding: pixels between (and around) the cells.
      pad_value: uint8 level of the background.
    Returns:
      uint8 `[rows*(H+p)+p, cols*(W+p)+p, C]`.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"make_grid expects uint8 [N, H, W, C] with C in (1, 3), "
                         f"got {images.dtype} {images.shape}")
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, h, w, c = images.shape
    cols = max(1, -(-n // rows))
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value,
                   np.uint8)
    for i in range(min(n, rows * cols)):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = images[i]
    return grid


def display_scale(image_size: int, min_cell: int = 32) -> int:
    """The integer zoom that shows `image_size`-pixel images at least `min_cell` pixels wide
    (4 for the 8x8 digits, 1 from 32x32 up): tiny samples are unreadable at their native size."""
    return max(1, min_cell // max(int(image_size), 1))


def encode_grid_png(images, rows: int, *, padding: int = 2, scale: int = 1) -> bytes:
    """`make_grid(images, rows)` encoded as PNG bytes (for writers that are not local files).

    `scale` > 1 enlarges the grid by pixel repetition (nearest neighbour: no new detail, only
    a readable size).
    """
    from PIL import Image  # imported here: the samplers that import this module need no Pillow

    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    grid = make_grid(images, rows, padding=padding)
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    return buffer.getvalue()


def save_grid_png(images, path: str | os.PathLike, rows: int, *, padding: int = 2,
                  scale: int = 1) -> str:
    """Writes `make_grid(images, rows)` as a PNG, atomically (local or `gs://` path).

    Args:
      images: uint8 `[N, H, W, C]` with C in {1, 3}.
      path: destination file; its directory is created if missing.
      rows: number of grid rows (e.g. one per class).
      padding: pixels between cells.
      scale: integer enlargement (see `encode_grid_png`).
    Returns:
      The path written, as a string.
    """
    path = os.fspath(path)
    storage.write_bytes(path, encode_grid_png(images, rows, padding=padding, scale=scale))
    return path
