"""Discrete-time DDPM: noise schedules, forward process, posterior, and the per-example loss.

The forward process is `q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)` for t in
[0, T) (0-based: t = 0 is the first noising step), with `abar_t = prod_{s<=t} (1 - beta_s)`.
The model predicts the noise (epsilon parameterisation, Ho et al. 2020) and is trained with
the "simple" MSE loss.

`per_example_loss` is the loss of ONE example, written for DP-SGD: the caller vmaps and
differentiates it per example, and clips each example's gradient. Inside it, the example's
loss is averaged over K draws of (timestep, noise, flip): augmentation multiplicity
(Ghalebikesabi et al., 2023; "noise multiplicity" in Dockhorn et al., 2022), which lowers the
variance of the per-example gradient at no privacy cost, since it is still one gradient per
example. All randomness comes from the `rng` argument, and nothing mixes examples.
"""

import dataclasses
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

# Linear schedule endpoints of DDPM (Ho et al., 2020) for T = 1000.
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
# Cosine schedule (Nichol & Dhariwal, 2021): offset s and the cap on beta that avoids the
# singularity at t = T.
COSINE_OFFSET = 0.008
COSINE_MAX_BETA = 0.999


@struct.dataclass
class Schedule:
    """A discrete noise schedule; every array is float32 `[T]`, indexed by timestep t in [0, T).

    A pytree (arrays are leaves; `num_timesteps` and `kind` are static), so it can be passed
    through jit. Computed in float64, stored in float32.
    """

    num_timesteps: int = struct.field(pytree_node=False)
    kind: str = struct.field(pytree_node=False)
    betas: jax.Array
    alphas_cumprod: jax.Array  # abar_t
    alphas_cumprod_prev: jax.Array  # abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array  # 1 / sqrt(abar_t)
    sqrt_recipm1_alphas_cumprod: jax.Array  # sqrt(1 / abar_t - 1)
    posterior_variance: jax.Array  # Var q(x_{t-1} | x_t, x_0); 0 at t = 0
    posterior_log_variance_clipped: jax.Array  # log of it, with t = 0 replaced by t = 1
    posterior_mean_coef1: jax.Array  # coefficient of x_0 in the posterior mean
    posterior_mean_coef2: jax.Array  # coefficient of x_t in the posterior mean


def _betas(kind: str, num_timesteps: int) -> np.ndarray:
    if kind == "linear":
        # Scaled so that other T give the same overall amount of noise as T = 1000 (as in
        # improved DDPM); exactly DDPM's 1e-4..0.02 at T = 1000.
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * LINEAR_BETA_START, scale * LINEAR_BETA_END, num_timesteps,
                           dtype=np.float64)
    if kind == "cosine":

        def alpha_bar(u):  # u in [0, 1]
            return math.cos((u + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2)**2

        return np.array(
            [
                min(
                    1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps),
                    COSINE_MAX_BETA,
                ) for i in range(num_timesteps)
            ],
            dtype=np.float64,
        )
    raise ValueError(f"unknown schedule kind {kind!r}; use 'linear' or 'cosine'")


def make_schedule(kind: str = "linear", num_timesteps: int = 1000) -> Schedule:
    """The linear (DDPM, beta 1e-4..0.02 at T=1000) or cosine (Nichol & Dhariwal) schedule.

    Raises:
        ValueError: unknown kind, or num_timesteps < 2 (or too large for a linear schedule,
            whose betas would reach 1).
    """
    if (isinstance(num_timesteps, bool) or not isinstance(num_timesteps, (int, np.integer)) or
            num_timesteps < 2):
        raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
    betas = _betas(kind, int(num_timesteps))
    if not (np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(f"a {kind} schedule with {num_timesteps} steps has betas outside (0, 1)")
    alphas = 1.0 - betas
    acp = np.cumprod(alphas)
    acp_prev = np.append(1.0, acp[:-1])
    posterior_variance = betas * (1.0 - acp_prev) / (1.0 - acp)
    arrays = dict(
        betas=betas,
        alphas_cumprod=acp,
        alphas_cumprod_prev=acp_prev,
        sqrt_alphas_cumprod=np.sqrt(acp),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / acp),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / acp - 1.0),
        posterior_variance=posterior_variance,
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value so the
        # log stays finite (the t = 0 step of the sampler adds no noise anyway).
        posterior_log_variance_clipped=np.log(
            np.append(posterior_variance[1], posterior_variance[1:])),
        posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
        posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
    )
    return Schedule(
        num_timesteps=int(num_timesteps),
        kind=kind,
        **{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()},
    )


def _at(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """`values[t]` reshaped to broadcast against an array of rank `ndim` whose leading axes
    are t's axes: t `[B]`, ndim 4 -> `[B, 1, 1, 1]`."""
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.integer):
        raise ValueError(f"timesteps of a discrete schedule must be integers, got {t.dtype}")
    if t.ndim > ndim:
        raise ValueError(f"timesteps of rank {t.ndim} do not fit images of rank {ndim}")
    return values[t].reshape(t.shape + (1,) * (ndim - t.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Samples `x_t ~ q(x_t | x_0)`: `sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`.

    Args:
        schedule: the noise schedule.
        x0: clean images `[B, H, W, C]` (or one image `[H, W, C]` with a scalar t).
        t: integer timesteps `[B]` (or scalar) in [0, T).
        noise: standard normal, same shape as x0.

    Returns:
        `x_t`, same shape as x0.
    """
    return (_at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0 +
            _at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def predict_x0_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                        eps: jax.Array) -> jax.Array:
    """The x_0 implied by a noise prediction: `(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`.

    Shapes as in `q_sample` (x_t, eps `[B, H, W, C]`, t `[B]`).
    """
    return (_at(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t -
            _at(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array,
                        x0: jax.Array) -> jax.Array:
    """The noise implied by an x_0 estimate (inverse of `predict_x0_from_eps`); samplers use it
    after clipping x_0 to [-1, 1]. Shapes as in `q_sample`."""
    return (_at(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / _at(
        schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim)


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array,
                t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean, variance and clipped log-variance of `q(x_{t-1} | x_t, x_0)`.

    Args:
        x0, x_t: `[B, H, W, C]`.
        t: integer timesteps `[B]` in [0, T).

    Returns:
        mean `[B, H, W, C]`; variance and log-variance `[B, 1, 1, 1]` (broadcastable). At t = 0
        the variance is 0 and the mean is x0.
    """
    mean = (_at(schedule.posterior_mean_coef1, t, x_t.ndim) * x0 +
            _at(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
    return (
        mean,
        _at(schedule.posterior_variance, t, x_t.ndim),
        _at(schedule.posterior_log_variance_clipped, t, x_t.ndim),
    )


@dataclasses.dataclass(frozen=True)
class TimestepDistribution:
    """A mixture of uniform distributions over integer ranges `[lo, hi)` of timesteps.

    Range i is picked with probability `weights[i]`, then t is uniform in it. The paper shifts
    mass between ranges during DP fine-tuning, e.g.
    `TimestepDistribution(((0, 200), (200, 800), (800, 1000)), (0.1, 0.7, 0.2))`.

    Frozen and made of tuples, so it is hashable and can be a static jit argument. On
    construction: ranges must be non-empty (lo < hi), start at >= 0 and not overlap; weights
    must be finite and >= 0, not all zero, one per range; they are normalised to sum to 1.
    A zero-weight range is allowed and never sampled. The upper bound (hi <= T) is checked
    against a schedule by `check_num_timesteps` (done by `probabilities` and the loss).
    """

    ranges: tuple[tuple[int, int], ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        try:
            # operator.index accepts Python/numpy ints and refuses floats such as 0.5.
            ranges = tuple((operator.index(lo), operator.index(hi)) for lo, hi in self.ranges)
            weights = tuple(float(w) for w in self.weights)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"ranges must be (lo, hi) int pairs and weights numbers: {err}") from err
        if not ranges:
            raise ValueError("a timestep distribution needs at least one range")
        if len(weights) != len(ranges):
            raise ValueError(f"{len(ranges)} ranges but {len(weights)} weights")
        for lo, hi in ranges:
            if lo < 0 or hi <= lo:
                raise ValueError(f"range [{lo}, {hi}) must satisfy 0 <= lo < hi")
        ordered = sorted(ranges)
        for (_, hi_a), (lo_b, hi_b) in zip(ordered, ordered[1:]):
            if lo_b < hi_a:
                raise ValueError(f"ranges overlap: [.., {hi_a}) and [{lo_b}, {hi_b})")
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"weights must be finite and >= 0, got {weights}")
        total = math.fsum(weights)
        if total <= 0:
            raise ValueError("weights must not all be zero")
        object.__setattr__(self, "ranges", ranges)
        object.__setattr__(self, "weights", tuple(w / total for w in weights))

    @classmethod
    def uniform(cls, num_timesteps: int) -> "TimestepDistribution":
        """Uniform over [0, num_timesteps): the standard DDPM training distribution."""
        return cls(((0, num_timesteps),), (1.0,))

    def check_num_timesteps(self, num_timesteps: int) -> None:
        """Raises ValueError unless every range lies within [0, num_timesteps)."""
        top = max(hi for _, hi in self.ranges)
        if top > num_timesteps:
            raise ValueError(
                f"timestep range up to {top} exceeds the schedule's {num_timesteps} timesteps")

    def probabilities(self, num_timesteps: int) -> np.ndarray:
        """The probability of each timestep, float64 `[num_timesteps]` (sums to 1)."""
        self.check_num_timesteps(num_timesteps)
        probs = np.zeros(num_timesteps, np.float64)
        for (lo, hi), weight in zip(self.ranges, self.weights):
            probs[lo:hi] = weight / (hi - lo)
        return probs

    def sample(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Draws int32 timesteps of the given shape from the mixture (typed PRNG key)."""
        lows = jnp.asarray([lo for lo, _ in self.ranges], jnp.int32)
        highs = jnp.asarray([hi for _, hi in self.ranges], jnp.int32)
        component_key, uniform_key = jax.random.split(key)
        # log(0) = -inf: a zero-weight range can never win the Gumbel-max draw.
        component = jax.random.categorical(component_key,
                                           jnp.log(jnp.asarray(self.weights, jnp.float32)),
                                           shape=shape)
        return jax.random.randint(uniform_key, shape, lows[component], highs[component],
                                  dtype=jnp.int32)


class TrainingDraws(NamedTuple):
    """The K random training inputs of one example (see `draw_training_inputs`).

    Attributes:
        x0: `[K, H, W, C]` the clean image, horizontally flipped where `flipped`.
        t: int32 `[K]` timesteps.
        noise: `[K, H, W, C]` standard normal noise.
        x_t: `[K, H, W, C]` the noised images the model sees.
        label: int32 `[K]` (the same label K times; the null label if dropped) or None.
        flipped: bool `[K]`.
        label_dropped: bool `[]` whether label dropout replaced the label.
    """

    x0: jax.Array
    t: jax.Array
    noise: jax.Array
    x_t: jax.Array
    label: jax.Array | None
    flipped: jax.Array
    label_dropped: jax.Array


def _check_loss_options(augmult, label_dropout, null_label, has_label) -> None:
    if isinstance(augmult, bool) or not isinstance(augmult, (int, np.integer)) or augmult < 1:
        raise ValueError(f"augmult must be an int >= 1, got {augmult!r}")
    if not 0.0 <= label_dropout <= 1.0:
        raise ValueError(f"label_dropout must be in [0, 1], got {label_dropout}")
    if label_dropout > 0 and (null_label is None or not has_label):
        raise ValueError(
            "label_dropout > 0 needs a labelled example and null_label (the model's num_classes)")


def draw_training_inputs(
    schedule: Schedule,
    example: Mapping[str, Any],
    rng: jax.Array,
    *,
    timestep_dist: TimestepDistribution,
    augmult: int = 1,
    random_flip: bool = False,
    label_dropout: float = 0.0,
    null_label: int | None = None,
) -> TrainingDraws:
    """Draws the K (timestep, noise, flip) inputs of one example, and its label dropout.

    Per example only: `example["image"]` is one image `[H, W, C]` in [-1, 1]; `rng` is this
    example's typed key, split into independent timestep / noise / flip / label streams.
    Flips are drawn per draw (each of the K copies is flipped with probability 1/2); label
    dropout is drawn once per example (all K draws share the label).
    """
    image = jnp.asarray(example["image"], jnp.float32)
    if image.ndim != 3:
        raise ValueError(f"example['image'] must be one image [H, W, C], got {image.shape}")
    label = example.get("label")
    _check_loss_options(augmult, label_dropout, null_label, label is not None)
    timestep_dist.check_num_timesteps(schedule.num_timesteps)
    t_key, noise_key, flip_key, label_key = jax.random.split(rng, 4)

    x0 = jnp.broadcast_to(image, (augmult,) + image.shape)
    if random_flip:
        flipped = jax.random.bernoulli(flip_key, 0.5, (augmult,))
        x0 = jnp.where(flipped[:, None, None, None], x0[:, :, ::-1, :], x0)  # axis 2 = width
    else:
        flipped = jnp.zeros((augmult,), bool)
    t = timestep_dist.sample(t_key, (augmult,))
    noise = jax.random.normal(noise_key, x0.shape, jnp.float32)

    if label is not None:
        label = jnp.asarray(label, jnp.int32)
        if label.ndim != 0:
            raise ValueError(f"example['label'] must be a scalar, got shape {label.shape}")
        if label_dropout > 0:
            label_dropped = jax.random.bernoulli(label_key, label_dropout)
            label = jnp.where(label_dropped, jnp.int32(null_label), label)
        else:
            label_dropped = jnp.zeros((), bool)
        label = jnp.broadcast_to(label, (augmult,))
    else:
        label_dropped = jnp.zeros((), bool)
    return TrainingDraws(
        x0=x0,
        t=t,
        noise=noise,
        x_t=q_sample(schedule, x0, t, noise),
        label=label,
        flipped=flipped,
        label_dropped=label_dropped,
    )


ModelApply = Callable[[Any, jax.Array, jax.Array, jax.Array | None, jax.Array], jax.Array]


def per_example_loss(
    model_apply: ModelApply,
    params: Any,
    example: Mapping[str, Any],
    rng: jax.Array,
    *,
    schedule: Schedule,
    timestep_dist: TimestepDistribution,
    augmult: int = 1,
    random_flip: bool = False,
    label_dropout: float = 0.0,
    null_label: int | None = None,
) -> jax.Array:
    """Epsilon-prediction MSE of ONE example, averaged over K = `augmult` draws.

    Args:
        model_apply: `fn(params, x [K,H,W,C], t i32[K], y i32[K] | None, rng) -> eps [K,H,W,C]`
            (e.g. `jaxdpdm.models.unet.make_apply_fn(config, train=True)`); `rng` drives dropout.
        params: model parameters.
        example: `{"image": f32[H, W, C] in [-1, 1], "label": i32[] (optional), ...}`.
        rng: this example's typed key (e.g. `fold_in(step_key, example["index"])`); split into the
            draw streams (timesteps, noise, flips, label dropout) and the dropout stream.
        schedule: the noise schedule.
        timestep_dist: distribution of training timesteps (checked against the schedule's T).
        augmult: K, the number of (t, noise, flip) draws averaged before the single gradient.
        random_flip: flip each draw horizontally with probability 1/2.
        label_dropout: probability of replacing the label by `null_label` (once per example).
        null_label: the model's null label (its `num_classes`); needed if label_dropout > 0.

    Returns:
        float32 scalar: mean over the K draws and all pixels of `(eps_pred - noise)^2`.
    """
    draw_key, dropout_key = jax.random.split(rng)
    draws = draw_training_inputs(
        schedule,
        example,
        draw_key,
        timestep_dist=timestep_dist,
        augmult=augmult,
        random_flip=random_flip,
        label_dropout=label_dropout,
        null_label=null_label,
    )
    eps = model_apply(params, draws.x_t, draws.t, draws.label, dropout_key)
    if eps.shape != draws.noise.shape:
        raise ValueError(f"model_apply returned shape {eps.shape}, expected {draws.noise.shape}")
    return jnp.mean(jnp.square(eps.astype(jnp.float32) - draws.noise))
