"""Canaries for auditing a DP-SGD run: their design, secret inclusion bits, and injection.

A canary is an extra example of the private dataset. Each of the m canaries of a kind is included
independently with probability 1/2; the bits come from a secret seed of the audit alone (never
from the training seed or the data) and are read back only after training, to split the scores.

Two kinds, both going through the real mechanism (the same Poisson sampler, clipping bound, noise
draw and accountant as every other example):

* "input" canaries (black box): out-of-distribution images (uniform random pixels) with random
  labels, appended to the image dataset. An included canary sampled by the Poisson sampler is
  clipped and summed like any example; an excluded one is removed from the draw (exactly what
  "not in the dataset" means under add/remove adjacency).
* "gradient" canaries (white box, "Dirac" canaries): when an included one is sampled, it adds
  the gradient `C * e_j` (norm exactly C, the clip norm) on its own coordinate j of the trainable
  parameters to the clipped sum, before the noise. The gradient needs no backward pass, so
  thousands of them cost almost nothing. In the dataset they are placeholder rows that the model
  never sees; they exist so that the sampler draws them like every other example.

Index layout of the extended dataset of N real examples: real rows [0, N), input canaries
[N, N + m_in), gradient canaries [N + m_in, N + m_in + m_grad).
"""

from __future__ import annotations

import dataclasses
import io
import secrets
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from jaxdpdm import storage
from jaxdpdm.config import AUDIT_KINDS as KINDS
from jaxdpdm.dp.clipping import trainable_mask
from jaxdpdm.models import count_params

PyTree = Any
CANARY_FILE = "canaries.npz"

# Separate streams of the audit's secret seed: the design (images, labels, coordinates) and the
# inclusion bits never share random numbers.
_DESIGN_STREAM = 0xCA7A_0001
_BITS_STREAM = 0xCA7A_0002


@dataclasses.dataclass(frozen=True)
class CanarySet:
    """The canaries of one audit run (the inclusion bits are secret until training ends).

    Attributes:
      input_images: uint8 `[m_in, H, W, C]` input canaries (m_in may be 0).
      input_labels: int32 `[m_in]`.
      input_bits: bool `[m_in]`, True: included in the training set.
      coordinates: int64 `[m_grad]` distinct flat positions among the TRAINABLE coordinates
        (in `jax.tree.leaves` order of the trainable leaves) of the gradient canaries.
      gradient_bits: bool `[m_grad]`.
    """
    input_images: np.ndarray
    input_labels: np.ndarray
    input_bits: np.ndarray
    coordinates: np.ndarray
    gradient_bits: np.ndarray

    @property
    def num_input(self) -> int:
        return int(self.input_labels.shape[0])

    @property
    def num_gradient(self) -> int:
        return int(self.coordinates.shape[0])

    def save(self, path: str) -> None:
        buffer = io.BytesIO()
        np.savez(buffer, **dataclasses.asdict(self))
        storage.write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str) -> "CanarySet":
        with np.load(io.BytesIO(epath.Path(path).read_bytes())) as f:
            return cls(**{field.name: f[field.name] for field in dataclasses.fields(cls)})


def draw_canaries(kind: str, num_canaries: int, *, image_shape: tuple[int, int,
                                                                      int], num_classes: int,
                  num_trainable: int, secret_seed: int | None = None) -> CanarySet:
    """Draws the canaries and their inclusion bits from the audit's own secret seed.

    The function sees no data and no training seed: the bits are independent of both by
    construction. `secret_seed=None` (every real audit) draws 128 bits from the OS.

    Args:
      kind: "gradient", "input" or "both" (m canaries of each kind).
      num_canaries: m >= 2 per kind.
      image_shape: (H, W, C) of the dataset's images.
      num_classes: labels of input canaries are uniform in [0, num_classes).
      num_trainable: number of trainable coordinates; gradient canaries need m <= it.
    """
    if kind not in KINDS:
        raise ValueError(f"audit.kind must be one of {KINDS}, got {kind!r}")
    if num_canaries < 2:
        raise ValueError(f"audit.num_canaries must be >= 2, got {num_canaries}")
    m_in = num_canaries if kind in ("input", "both") else 0
    m_grad = num_canaries if kind in ("gradient", "both") else 0
    if m_grad > num_trainable:
        raise ValueError(f"audit.num_canaries={m_grad} gradient canaries need as many distinct "
                         f"coordinates, but the model has {num_trainable} trainable ones")
    if secret_seed is None:
        secret_seed = secrets.randbits(128)
    design = np.random.default_rng([secret_seed, _DESIGN_STREAM])
    bits = np.random.default_rng([secret_seed, _BITS_STREAM])
    images = design.integers(0, 256, size=(m_in,) + tuple(image_shape), dtype=np.uint8)
    labels = design.integers(0, num_classes, size=m_in).astype(np.int32)
    coordinates = np.sort(design.choice(num_trainable, size=m_grad, replace=False)).astype(np.int64)
    return CanarySet(input_images=images, input_labels=labels, input_bits=bits.random(m_in) < 0.5,
                     coordinates=coordinates, gradient_bits=bits.random(m_grad) < 0.5)


class _Placement(NamedTuple):
    """Where each gradient canary's coordinate lives: per used leaf, (leaf id, canary ids, pos)."""
    leaf_ids: tuple[int, ...]
    canary_ids: tuple[np.ndarray, ...]
    positions: tuple[np.ndarray, ...]


def _place(coordinates: np.ndarray, params_shape: PyTree, mask: PyTree) -> _Placement:
    """Maps flat trainable coordinates to (leaf, position in the flattened leaf)."""
    leaves = jax.tree.leaves(params_shape)
    flags = jax.tree.structure(params_shape).flatten_up_to(mask)
    trainable_ids = [i for i, f in enumerate(flags) if f]
    sizes = np.array([int(np.prod(leaves[i].shape)) for i in trainable_ids], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    which = np.searchsorted(starts, coordinates, side="right") - 1
    leaf_ids, canary_ids, positions = [], [], []
    for k in np.unique(which):
        ids = np.flatnonzero(which == k)
        leaf_ids.append(trainable_ids[int(k)])
        canary_ids.append(ids)
        positions.append(coordinates[ids] - starts[k])
    return _Placement(tuple(leaf_ids), tuple(canary_ids), tuple(positions))


def num_trainable_coordinates(params_shape: PyTree, trainable: PyTree | str | None) -> int:
    return count_params(params_shape, trainable_mask(params_shape, trainable))


class ReleaseTapState(NamedTuple):
    """The white-box adversary's view of each gradient canary's coordinate, summed over steps.

    Attributes:
      released: f32[m_grad], the sum of the released updates.
      log_likelihood_ratio: f32[m_grad], the sum over steps of the log-likelihood ratio of
        "the canary was included" for that step's release (see `CanaryInjector.release_tap`).
    """
    released: jax.Array
    log_likelihood_ratio: jax.Array


class CanaryInjector:
    """Puts a `CanarySet` into a training run (see `jaxdpdm.train.Trainer(canaries=...)`).

    Args:
      canaries: the canary set.
      experiment: the run's Experiment; `experiment` (the attribute) is a copy whose dataset
        holds the N real rows, then the input canaries, then the gradient placeholders.
      clip_norm: C; a gradient canary adds C on its coordinate.
      trainable: the run's trainable spec (None, regex or bool pytree).
    """

    def __init__(self, canaries: CanarySet, experiment, *, clip_norm: float,
                 trainable: PyTree | str | None = None):
        self.canaries = canaries
        dataset = experiment.dataset
        self.num_real = len(dataset)
        m_in, m_grad = canaries.num_input, canaries.num_gradient
        placeholder = np.zeros((m_grad,) + dataset.image_shape, np.uint8)
        images = np.concatenate([dataset.images, canaries.input_images, placeholder])
        labels = np.concatenate([dataset.labels, canaries.input_labels, np.zeros(m_grad, np.int32)])
        self.experiment = dataclasses.replace(
            experiment, dataset=dataclasses.replace(dataset, images=images, labels=labels))
        self._input_start, self._gradient_start = self.num_real, self.num_real + m_in
        params_shape = jax.eval_shape(experiment.init_params)
        self._treedef = jax.tree.structure(params_shape)
        self._shapes = [leaf.shape for leaf in jax.tree.leaves(params_shape)]
        self._placement = _place(canaries.coordinates, params_shape,
                                 trainable_mask(params_shape, trainable))
        self._clip_norm = float(clip_norm)
        self._dirac_sum = jax.jit(self._dirac_sum_fn)

    def route(self, selected: np.ndarray) -> tuple[np.ndarray, PyTree | None]:
        """Splits a Poisson draw over the extended dataset.

        Args:
          selected: int64[n] sorted indices drawn by `batching.poisson_sample`.

        Returns:
          (indices int64[n'] of the rows that go through the model: the real ones and the
          INCLUDED input canaries; the float32 params-shaped sum of the included, sampled
          gradient canaries' gradients, or None without gradient canaries).
        """
        c = self.canaries
        real = selected[selected < self._input_start]
        inputs = selected[(selected >= self._input_start) & (selected < self._gradient_start)]
        inputs = inputs[c.input_bits[inputs - self._input_start]]
        if not c.num_gradient:
            return np.concatenate([real, inputs]), None
        drawn = np.zeros(c.num_gradient, np.float32)
        drawn[selected[selected >= self._gradient_start] - self._gradient_start] = 1.0
        return np.concatenate([real, inputs]), self._dirac_sum(drawn * c.gradient_bits)

    def _dirac_sum_fn(self, counts: jax.Array) -> PyTree:
        """counts f32[m_grad] -> params-shaped f32 tree with C * counts[i] at coordinate i."""
        leaves = [jnp.zeros(shape, jnp.float32) for shape in self._shapes]
        for leaf, ids, pos in zip(*self._placement):
            flat = leaves[leaf].reshape(-1).at[pos].add(self._clip_norm * counts[ids])
            leaves[leaf] = flat.reshape(self._shapes[leaf])
        return self._treedef.unflatten(leaves)

    def release_tap(self, *, noise_multiplier: float, sampling_rate: float,
                    expected_batch_size: float) -> optax.GradientTransformation:
        """An identity transformation that records the releases at the canary coordinates.

        Chained right after `dp_aggregate`, it sees `u = (clipped sum + noise) / B` (B the
        expected batch size): the noisy gradient that DP-SGD releases each step and that its
        guarantee covers. At a canary's coordinate, `x = u B / C` is N(d, sigma^2) if the canary
        was not drawn and N(d + 1, sigma^2) if it was (d: the data's part, small), so the
        log-likelihood ratio of "included" for one step is
        `log(1 - q + q exp((x - 1/2) / sigma^2))` (taking d = 0). Its sum over steps is the
        white-box score (the optimal test for the CLAIMED sigma and q, all public); it beats the
        plain sum of releases, which dilutes a step that drew the canary with every other step's
        noise. sigma = 0 (a non-private run) scores with the plain sum.
        """
        placement, m = self._placement, self.canaries.num_gradient
        sigma, q = float(noise_multiplier), float(sampling_rate)
        to_units = float(expected_batch_size) / self._clip_norm

        def init_fn(params):
            del params
            zeros = jnp.zeros((m,), jnp.float32)
            return ReleaseTapState(released=zeros, log_likelihood_ratio=zeros)

        def update_fn(updates, state, params=None):
            del params
            leaves = jax.tree.leaves(updates)
            step = jnp.zeros((m,), jnp.float32)
            for leaf, ids, pos in zip(*placement):
                step = step.at[ids].set(jnp.asarray(leaves[leaf], jnp.float32).reshape(-1)[pos])
            x = step * to_units
            if sigma > 0:
                llr = jnp.logaddexp(jnp.log1p(-q), jnp.log(q) + (x - 0.5) / sigma**2)
            else:
                llr = x
            return updates, ReleaseTapState(released=state.released + step,
                                            log_likelihood_ratio=state.log_likelihood_ratio + llr)

        return optax.GradientTransformation(init_fn, update_fn)


def released_scores(opt_state: PyTree) -> ReleaseTapState:
    """The gradient canaries' scores (numpy f32[m_grad] each) from a run's optimizer state."""
    found = [
        s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, ReleaseTapState))
        if isinstance(s, ReleaseTapState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one canary release tap in the optimizer state, found "
                         f"{len(found)}")
    return ReleaseTapState(*(np.asarray(x) for x in jax.device_get(found[0])))
