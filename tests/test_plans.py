"""The trainer's plans: freezing parameters, checked through the trainer's own update path.

`dp.trainable` is the one way to freeze (see `jaxdpdm.plans`): frozen leaves get neither gradient
nor noise and never move, and a trainable leaf's noise does not depend on which others are
frozen. Tiny quickstart configs (8x8 digits), so the compiled programs stay small.
"""

import re

import jax
import numpy as np

from jaxdpdm import parallel
from jaxdpdm.dp.clipping import param_path
from jaxdpdm.train import Trainer


def _trainer(tiny_config, workdir, trainable):
    config = tiny_config()
    config.dp.noise_multiplier = 1.0  # given, not calibrated: the same sigma in every trainer
    config.train.weight_decay = 0.1  # decoupled weight decay must not move a frozen leaf either
    config.dp.trainable = trainable
    return Trainer(config, str(workdir))


def _two_updates(trainer, grad_sums):
    """The parameters after two applications of the trainer's compiled DP update (optimizer with
    its noise, then the EMA) to the given clipped-gradient sums; the learning rate warms up from
    0, so the first update alone moves nothing."""
    s = trainer.state
    params, opt_state, ema = s["params"], s["opt_state"], s["ema_params"]
    for grad_sum in grad_sums:
        old_ema = ema
        params, opt_state, ema = trainer.plan.step_fn.apply(params, opt_state, grad_sum, ema)
        expected = parallel.ema_update(old_ema, params, trainer.config.train.ema_decay)
        for got, want in zip(jax.tree.leaves(ema), jax.tree.leaves(expected)):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    return jax.tree.leaves(params)


def test_freezing_leaves_leaves_the_other_leaves_noise_bit_identical(tmp_path, tiny_config):
    rng = np.random.default_rng(14)
    everything = _trainer(tiny_config, tmp_path / "all", None)
    initial = [np.asarray(x) for x in jax.tree.leaves(everything.state["params"])]
    paths = [
        param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(everything.state["params"])
    ]
    try:
        for trial in range(2):
            frozen = set(rng.choice(len(paths), size=rng.integers(1, 4), replace=False).tolist())
            pattern = "^(?!(?:" + "|".join(re.escape(paths[i]) for i in frozen) + ")$)"
            partial = _trainer(tiny_config, tmp_path / f"frozen{trial}", pattern)
            assert [i for i, m in enumerate(jax.tree.leaves(partial.plan.mask)) if not m] == \
                sorted(frozen)
            grad_sums = [
                jax.tree.map(lambda x: rng.normal(0, 3, x.shape).astype(np.float32),
                             everything.state["params"]) for _ in range(2)
            ]
            full_run = _two_updates(everything, grad_sums)
            frozen_run = _two_updates(partial, grad_sums)
            partial.release_workdir()
            for i, (a, b, start) in enumerate(zip(full_run, frozen_run, initial)):
                if i in frozen:  # no gradient, no noise, no weight decay: not a bit changed
                    np.testing.assert_array_equal(np.asarray(b), start)
                else:  # Adam is elementwise: equal updates mean equal noisy gradients
                    assert not np.array_equal(np.asarray(a), start)
                    np.testing.assert_array_equal(np.asarray(b), np.asarray(a),
                                                  err_msg=f"leaf {paths[i]}")
    finally:
        everything.release_workdir()
