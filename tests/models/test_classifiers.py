"""Tests for jaxdpdm/models/classifiers.py: structure, parameter counts, train/eval modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdpdm.models.classifiers import (DPDMCNN, WideResNet, classifier_for, count_parameters,
                                        init_classifier)


def test_wrn16_4_has_about_2_75m_parameters_for_cifar10():
    # Zagoruyko & Komodakis report 2.7M for WRN-16-4; convs alone are 2,742,704.
    count = count_parameters(classifier_for("wrn16_4", 10), (32, 32, 3))
    assert 2.70e6 < count < 2.80e6
    # Global average pooling: the count does not depend on the image size.
    assert count_parameters(classifier_for("wrn16_4", 10), (8, 8, 3)) == count


def test_wrn_structure_three_groups_of_two_blocks():
    params = jax.eval_shape(lambda key: init_classifier(WideResNet(10), key, (32, 32, 3)),
                            jax.random.key(0))
    blocks = sorted(name for name in params if name.startswith("WideResidualBlock"))
    assert len(blocks) == 6  # (16 - 4) / 6 = 2 blocks per group, 3 groups
    assert params["Conv_0"]["kernel"].shape == (3, 3, 3, 16)
    assert params["Dense_0"]["kernel"].shape == (256, 10)  # 64 * width 4
    # Only the first block of each group changes width or stride, so only it projects.
    projecting = [b for b in blocks if "Conv_2" in params[b]]
    assert projecting == ["WideResidualBlock_0", "WideResidualBlock_2", "WideResidualBlock_4"]


def _random_params(module, image_shape, seed=0):
    """Params with the module's shapes filled from numpy: skips compiling the initializers."""
    shapes = jax.eval_shape(lambda key: init_classifier(module, key, image_shape),
                            jax.random.key(0))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_wrn_forward_shape_and_finite():
    module = WideResNet(num_classes=3, depth=10, width=1)  # small WRN: same code path
    images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), minval=-1, maxval=1)
    params = _random_params(module, (8, 8, 3))
    logits = jax.jit(lambda p, x: module.apply({"params": p}, x, train=False))(params, images)
    assert logits.shape == (2, 3)
    assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("image_shape,flat", [((28, 28, 1), 3 * 3 * 128), ((8, 8, 1), 128),
                                              ((32, 32, 3), 4 * 4 * 128)])
def test_dpdm_cnn_layers_and_parameter_count(image_shape, flat):
    module = classifier_for("cnn", 10)
    params = jax.eval_shape(lambda key: init_classifier(module, key, image_shape),
                            jax.random.key(0))
    channels = image_shape[-1]
    assert params["Conv_0"]["kernel"].shape == (3, 3, channels, 32)
    assert params["Conv_1"]["kernel"].shape == (3, 3, 32, 64)
    assert params["Conv_2"]["kernel"].shape == (3, 3, 64, 128)
    assert params["Dense_0"]["kernel"].shape == (flat, 128)
    assert params["Dense_1"]["kernel"].shape == (128, 10)
    expected = ((9 * channels + 1) * 32 + (9 * 32 + 1) * 64 + (9 * 64 + 1) * 128 +
                (flat + 1) * 128 + (128 + 1) * 10)
    assert count_parameters(module, image_shape) == expected


def test_dpdm_cnn_dropout_only_in_training():
    module = DPDMCNN(num_classes=4, conv_channels=(4, 4, 4), dense_features=8)
    images = jax.random.uniform(jax.random.key(1), (3, 8, 8, 1), minval=-1, maxval=1)

    params = _random_params(module, (8, 8, 1))

    @jax.jit
    def run(params):
        evaluate = lambda: module.apply({"params": params}, images, train=False)
        train = lambda k: module.apply({"params": params}, images, train=True, rngs=
                                       {"dropout": jax.random.key(k)})
        return evaluate(), evaluate(), train(1), train(2)

    eval_a, eval_b, train_a, train_b = run(params)
    assert eval_a.shape == (3, 4)
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, train_b)


def test_dpdm_cnn_rejects_images_smaller_than_three_poolings():
    module = classifier_for("cnn", 10)
    with pytest.raises(ValueError, match="H, W >= 8"):
        jax.eval_shape(lambda key: init_classifier(module, key, (7, 7, 1)), jax.random.key(0))


def test_classifier_for_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown classifier"):
        classifier_for("resnet50", 10)
    with pytest.raises(ValueError, match="num_classes"):
        classifier_for("cnn", 1)
