"""The shard_map training steps give the same update on 8 simulated devices as on 1 device.

`scenario()` runs in a subprocess with 8 simulated CPU devices (see tests/conftest.py) and
computes every result three ways: on a mesh of all 8 devices, on a mesh of 1 device, and without
shard_map at all (plain `clipped_grad_sum` / `jax.grad`). The test compares them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdpdm import parallel
from jaxdpdm.dp import batching, clipped_grad_sum, dp_aggregate

NUM_EXAMPLES, DIM, CHUNK, MICRO = 40, 8, 16, 2


def _loss_fn(params, example, rng):
    """One example; the input noise makes the result depend on the per-example key."""
    x = example["x"] + 0.3 * jax.random.normal(rng, example["x"].shape)
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.square(h @ params["w2"] - example["y"])


def _setup():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "w1": jax.random.normal(k1, (DIM, 16)), "b1": jnp.zeros(16),
        "w2": jax.random.normal(k2, (16,)) / 2
    }
    rng = np.random.default_rng(0)
    data = {
        "x": rng.normal(size=(NUM_EXAMPLES, DIM)).astype(np.float32),
        "y": rng.normal(size=NUM_EXAMPLES).astype(np.float32),
        "index": np.arange(NUM_EXAMPLES, dtype=np.int32)
    }
    return params, data


def _dp_optimizer():
    return optax.chain(
        dp_aggregate(clip_norm=1.0, noise_multiplier=0.5, expected_batch_size=20, seed=5),
        optax.adam(1e-2))


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)]).tolist()


def _chunks(data, step):
    selected = batching.poisson_sample(NUM_EXAMPLES, 0.5, seed=1, step=step)
    return [(jax.tree.map(lambda v: v[idx], data), mask)
            for idx, mask in batching.split_into_chunks(selected, CHUNK)]


def _dp_run(mesh, params, data):
    """Two DP steps (Poisson draws of ~20 examples in chunks of 16) through DPStep."""
    optimizer = _dp_optimizer()
    step = parallel.make_dp_step(_loss_fn, optimizer, clip_norm=1.0, microbatch_size=MICRO,
                                 mesh=mesh)
    opt_state = optimizer.init(params)
    norms, clipped = [], []
    for t in range(2):
        params, opt_state, stats = step(params, opt_state, _chunks(data, t), jax.random.key(t))
        norms += np.asarray(stats.norms).tolist()
        clipped.append(int(stats.num_clipped))
    # A batch without "index": keys come from GLOBAL row positions, so still device-independent.
    no_index = {"x": data["x"][:CHUNK], "y": data["y"][:CHUNK]}
    mask = np.arange(CHUNK) < 13
    unindexed, _ = step.accumulate(params, parallel.shard_batch(no_index, mesh),
                                   parallel.shard_batch(mask, mesh), jax.random.key(9))
    return {
        "params": _flat(params), "norms": norms, "num_clipped": clipped,
        "unindexed": _flat(unindexed)
    }


def test_steps_accept_raw_uint32_keys():
    """Both steps take `jax.random.PRNGKey(t)` and make the update `jax.random.key(t)` makes."""
    params, data = _setup()
    mesh = parallel.make_data_mesh()
    optimizer = _dp_optimizer()
    dp_step = parallel.make_dp_step(_loss_fn, optimizer, clip_norm=1.0, microbatch_size=MICRO,
                                    mesh=mesh)
    pretrain_step = parallel.make_pretrain_step(_loss_fn, optax.adam(1e-2), mesh=mesh)
    batch = jax.tree.map(lambda v: v[:CHUNK], data)
    results = {}
    for name, key in (("typed", jax.random.key(3)), ("raw", jax.random.PRNGKey(3))):
        dp_params, _, _ = dp_step(params, optimizer.init(params), _chunks(data, 0), key)
        plain_params, _, _ = pretrain_step(params, optax.adam(1e-2).init(params), batch, key)
        results[name] = (_flat(dp_params), _flat(plain_params))
    assert results["raw"] == results["typed"]


def _dp_reference(params, data):
    """The same two steps without shard_map: clipped_grad_sum over each chunk, summed."""
    optimizer = _dp_optimizer()
    grad_fn = jax.jit(clipped_grad_sum(_loss_fn, clip_norm=1.0, microbatch_size=MICRO))
    update = jax.jit(optimizer.update)
    opt_state = optimizer.init(params)
    norms, clipped = [], []
    for t in range(2):
        total, step_clipped = None, 0
        for batch, mask in _chunks(data, t):
            grads, stats = grad_fn(params, batch, mask, jax.random.key(t))
            total = grads if total is None else jax.tree.map(jnp.add, total, grads)
            norms += np.asarray(stats.norms).tolist()
            step_clipped += int(stats.num_clipped)
        clipped.append(step_clipped)
        updates, opt_state = update(total, opt_state, params)
        params = optax.apply_updates(params, updates)
    return {"params": _flat(params), "norms": norms, "num_clipped": clipped}


def _pretrain_run(mesh, params, data):
    step = parallel.make_pretrain_step(_loss_fn, optax.adam(1e-2), mesh=mesh)
    opt_state = optax.adam(1e-2).init(params)
    metrics = []
    for t in range(2):
        idx = batching.shuffled_batch(NUM_EXAMPLES, CHUNK, seed=0, step=t)
        batch = jax.tree.map(lambda v: v[idx], data)
        params, opt_state, m = step(params, opt_state, batch, jax.random.key(t))
        metrics.append([float(m["loss"]), float(m["grad_norm"])])
    return {"params": _flat(params), "metrics": metrics}


def _pretrain_reference(params, data):
    optimizer = optax.adam(1e-2)

    @jax.jit
    def plain_step(params, opt_state, batch, key):
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, batch["index"])
        mean_loss = lambda p: jnp.mean(jax.vmap(_loss_fn, (None, 0, 0))(p, batch, keys))
        loss, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return optax.apply_updates(params, updates), opt_state, loss, norm

    opt_state = optimizer.init(params)
    metrics = []
    for t in range(2):
        idx = batching.shuffled_batch(NUM_EXAMPLES, CHUNK, seed=0, step=t)
        batch = jax.tree.map(lambda v: v[idx], data)
        params, opt_state, loss, norm = plain_step(params, opt_state, batch, jax.random.key(t))
        metrics.append([float(loss), float(norm)])
    return {"params": _flat(params), "metrics": metrics}


def scenario():
    """Everything the test compares; run with 8 devices. Returns a JSON-able dict."""
    params, data = _setup()
    meshes = {"8": parallel.make_data_mesh(), "1": parallel.make_data_mesh(jax.devices()[:1])}
    result = {
        "num_devices": jax.device_count(),
        "dp": {n: _dp_run(m, params, data) for n, m in meshes.items()},
        "pretrain": {n: _pretrain_run(m, params, data) for n, m in meshes.items()}
    }
    result["dp"]["reference"] = _dp_reference(params, data)
    result["pretrain"]["reference"] = _pretrain_reference(params, data)
    errors = []
    try:
        parallel.shard_batch({"x": np.zeros((12, 2))}, meshes["8"])
    except ValueError:
        errors.append("shard_batch")
    try:
        step = parallel.make_dp_step(_loss_fn, _dp_optimizer(), clip_norm=1.0, microbatch_size=4,
                                     mesh=meshes["8"])
        step.accumulate(params,
                        parallel.shard_batch(jax.tree.map(lambda v: v[:16], data), meshes["8"]),
                        parallel.shard_batch(np.ones(16, bool), meshes["8"]), jax.random.key(0))
    except ValueError:
        errors.append("chunk_size")
    result["errors"] = errors
    return result


def test_dp_and_pretrain_steps_match_across_device_counts(run_multidevice):
    out = run_multidevice("""
        import runpy
        result = runpy.run_path("tests/test_parallel.py")["scenario"]()
    """)
    assert out["num_devices"] == 8
    dp, pre = out["dp"], out["pretrain"]
    for name in ("1", "reference"):
        np.testing.assert_allclose(dp["8"]["params"], dp[name]["params"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dp["8"]["norms"], dp[name]["norms"], rtol=1e-5, atol=1e-6)
        assert dp["8"]["num_clipped"] == dp[name]["num_clipped"]
        np.testing.assert_allclose(pre["8"]["params"], pre[name]["params"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pre["8"]["metrics"], pre[name]["metrics"], rtol=1e-5)
    np.testing.assert_allclose(dp["8"]["unindexed"], dp["1"]["unindexed"], rtol=1e-5, atol=1e-6)
    assert any(dp["8"]["unindexed"])
    assert out["errors"] == ["shard_batch", "chunk_size"]
