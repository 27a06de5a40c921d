"""Tests for jaxdpdm/evaluation/inception.py, convert_inception_weights.py and the loader in
inception_weights.py.

No real weights exist offline: the layout is checked against the documented parameter count
and (when installed) pytorch-fid's own module, and the numerics against pytorch-fid's network
loaded with random weights.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpdm.evaluation import convert_inception_weights, inception, inception_weights

# torchvision documents inception_v3 with 27,161,264 parameters; minus its 1000-way fc
# (2048*1000 + 1000) and the auxiliary classifier (3,326,696) leaves the pool3 trunk, which
# the FID variant shares (its patches change pooling, not shapes).
TRUNK_LEARNABLE_PARAMS = 27_161_264 - 2_049_000 - 3_326_696


@pytest.fixture(scope="module")
def random_flat():
    """Random torch-layout weights in the reference layout, scaled to keep activations O(1)."""
    rng = np.random.default_rng(0)
    flat = {}
    for name, shape in {**inception.reference_param_shapes(), **inception.FID_FC_SHAPES}.items():
        if name.endswith("conv.weight"):
            value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[1:])), shape)
        elif name.endswith("bn.weight"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        flat[name] = value.astype(np.float32)
    return flat


def test_flax_module_has_exactly_the_reference_layout():
    shapes = jax.eval_shape(
        lambda: inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 299, 299, 3))))
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    flat = inception.flat_from_variables(zeros)
    reference = inception.reference_param_shapes()
    assert {k: v.shape for k, v in flat.items()} == reference
    # Every Flax leaf is covered by the reference names (no extra, unconverted parameters).
    assert len(jax.tree.leaves(zeros)) == len(reference)
    learnable = sum(int(np.prod(s)) for k, s in reference.items() if "running" not in k)
    assert learnable == TRUNK_LEARNABLE_PARAMS == 21_785_568
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"])) == learnable
    assert sum(k.endswith(".conv.weight") for k in reference) == 94  # Inception-v3's trunk convs
    assert reference["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert reference["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert reference["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)


def test_reference_layout_equals_torchvision_state_dict():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                          num_classes=1008)
    trunk = {
        k: tuple(v.shape)
        for k, v in net.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    assert trunk == inception.reference_param_shapes()


def test_variables_round_trip(random_flat):
    variables = inception.variables_from_flat(random_flat)
    back = inception.flat_from_variables(variables)
    assert set(back) == set(inception.reference_param_shapes())
    for name, value in back.items():
        np.testing.assert_array_equal(value, random_flat[name])


def test_wrong_weights_name_the_first_bad_parameter(random_flat, tmp_path):
    missing = dict(random_flat)
    del missing["Mixed_6c.branch7x7_2.conv.weight"]
    with pytest.raises(ValueError, match=r"missing .* 'Mixed_6c\.branch7x7_2\.conv\.weight'"):
        inception.variables_from_flat(missing)
    reshaped = {**random_flat, "Mixed_5b.branch_pool.bn.running_mean": np.zeros(31, np.float32)}
    with pytest.raises(ValueError, match=r"'Mixed_5b\.branch_pool\.bn\.running_mean' has shape"):
        inception.variables_from_flat(reshaped)
    imagenet_fc = {**random_flat, "fc.weight": np.zeros((1000, 2048), np.float32)}
    with pytest.raises(ValueError, match="1008"):
        inception.variables_from_flat(imagenet_fc)
    with pytest.raises(ValueError, match="unexpected parameter 'AuxLogits.fc.weight'"):
        inception.variables_from_flat({**random_flat, "AuxLogits.fc.weight": np.zeros(1)})
    path = tmp_path / "truncated.npz"
    np.savez(path, **random_flat)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match="truncated"):
        inception_weights.load_inception_params(path)
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        inception_weights.load_inception_params(tmp_path / "absent.npz")


def test_preprocessing_replicates_grayscale_and_scales_to_unit_range():
    gray = np.random.default_rng(1).integers(0, 256, (2, 9, 7, 1), dtype=np.uint8)
    x1 = inception.preprocess_images(jnp.asarray(gray), size=11)
    x3 = inception.preprocess_images(jnp.asarray(np.repeat(gray, 3, axis=-1)), size=11)
    assert x1.shape == (2, 11, 11, 3)
    np.testing.assert_array_equal(np.asarray(x1), np.asarray(x3))
    flat = inception.preprocess_images(jnp.full((1, 5, 5, 3), 255, jnp.uint8), size=5)
    np.testing.assert_allclose(np.asarray(flat), 1.0)


@pytest.mark.parametrize("in_hw", [(32, 32), (512, 400), (299, 299), (28, 300)])
def test_resize_matches_torch_bilinear_without_corner_alignment(in_hw):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).uniform(size=(1, *in_hw, 3)).astype(np.float32)
    ours = np.asarray(inception.preprocess_images(jnp.asarray(x)))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
        align_corners=False)
    ref = 2 * ref.permute(0, 2, 3, 1).numpy() - 1
    np.testing.assert_allclose(ours, ref, atol=1e-6)  # same weights; summation order differs


def test_features_match_pytorch_fid_with_random_weights(random_flat, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    pfi = pytest.importorskip("pytorch_fid.inception")
    # pytorch-fid builds its FID network and then fetches the weights by URL: hand it our random
    # weights instead. Its strict load_state_dict also checks our reference layout.
    state_dict = {k: torch.from_numpy(v) for k, v in random_flat.items()}
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *args, **kwargs: state_dict)
    reference_net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                    normalize_input=True).eval()
    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = reference_net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0)[0]
    expected = expected[:, :, 0, 0].numpy()

    # The converter path: .pth -> CLI -> .npz -> inception_weights.load_inception_params.
    pth, npz = tmp_path / "weights.pth", tmp_path / "weights.npz"
    torch.save(state_dict, pth)
    assert convert_inception_weights.main([str(pth), str(npz)]) == 0
    params = inception_weights.load_inception_params(npz)
    feature_fn = inception.make_feature_fn(params, batch_size=2)
    ours = feature_fn(images)
    assert ours.shape == (2, inception.FEATURE_DIM) and ours.dtype == np.float32
    scale = np.abs(expected).max()
    max_abs_diff = np.abs(ours - expected).max()
    print(f"max |jax - pytorch_fid| = {max_abs_diff:.3g} (feature scale {scale:.3g})")
    assert max_abs_diff < 1e-4 * scale
    # A padded partial batch gives the same features (frozen batch norm: no batch coupling).
    np.testing.assert_allclose(feature_fn(images[1:]), ours[1:], rtol=1e-5, atol=1e-6 * scale)


def test_pth_loading_equals_npz_loading(random_flat, tmp_path):
    torch = pytest.importorskip("torch")
    pth = tmp_path / "w.pth"
    torch.save({k: torch.from_numpy(v) for k, v in random_flat.items()}, pth)
    from_pth = inception.flat_from_variables(inception_weights.load_inception_params(pth))
    for name, value in from_pth.items():
        np.testing.assert_array_equal(value, random_flat[name])


def test_a_pth_without_torch_is_a_one_line_value_error(tmp_path, monkeypatch):
    garbage = tmp_path / "weights.pth"
    garbage.write_bytes(b"not a torch archive")
    monkeypatch.setitem(sys.modules, "torch", None)  # the import fails, as where torch is absent
    with pytest.raises(ValueError, match=r"needs torch.*pip install torch.*convert"):
        inception_weights.load_inception_params(garbage)
