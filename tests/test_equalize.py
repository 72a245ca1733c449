"""Activation equalization (`compress.equalize`): the pairs it finds, the scales it picks, a model unchanged on the
calibration data with its ReLU6 channels spread over the tensor's range. Its effect on real-weight full-int8 exports
is held by tests/test_export_models.py (MobileNetV2: 18.7 dB of logit SQNR without it, 20.3 dB with it)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from compress.equalize import Pair, channel_maxima, equalize_activations, find_pairs, pair_scales
from export.weights import calibrate_batch_stats
from reference import calibrated_random_model, jit_logits
from zoo.layers.conv import Conv2d

NAME, HW = "mobilenetv2_050", (64, 64)


@pytest.fixture(scope="module")
def small():
    """A small MobileNetV2 with random weights and BN statistics set from its inputs, plus those inputs."""
    return calibrated_random_model(NAME, HW)



def test_pairs_of_mobilenet_v2(small):
    module, variables, x = small
    pairs = {p.norm: p for p in find_pairs(module, variables, x[:2])}
    # the stem into the first depthwise conv, that block's depthwise into its projection, and in each of the 16
    # inverted residuals: expansion -> depthwise and depthwise -> projection
    assert len(pairs) == 34
    assert pairs["stem/bn1"] == Pair("stem/bn1", "stages_0/block_0/conv_dw", True, 6.0)
    assert pairs["stages_0/block_0/bn1"] == Pair("stages_0/block_0/bn1", "stages_0/block_0/conv_pw", False, 6.0)
    assert pairs["stages_3/block_2/bn1"].conv == "stages_3/block_2/conv_dw" and pairs["stages_3/block_2/bn1"].depthwise
    assert pairs["stages_3/block_2/bn2"].conv == "stages_3/block_2/conv_pwl"
    assert not any(p.norm.endswith("bn3") or p.norm.startswith("head") for p in pairs.values())  # no activation


def test_scales():
    relu6_dw, relu6_dense = Pair("a", "b", True, 6.0), Pair("a", "b", False, 6.0)
    maxima = np.array([7.0, 3.0, 0.0, 0.1, 6.0])
    np.testing.assert_allclose(pair_scales(relu6_dw, maxima), [1, 2, 1, 16, 1])  # saturating, x2, dead, capped
    np.testing.assert_allclose(pair_scales(relu6_dense, maxima), [1, np.sqrt(2), 1, np.sqrt(60), 1])
    np.testing.assert_allclose(pair_scales(relu6_dw, maxima, max_scale=4), [1, 2, 1, 4, 1])
    np.testing.assert_allclose(pair_scales(Pair("a", "b", True, None), np.array([4.0, 1.0, -1.0])), [1, 4, 1])


def test_model_unchanged_on_the_data_and_channels_spread(small):
    module, variables, x = small
    em, ev = equalize_activations(module, variables, x)
    assert em is module and jax.tree_util.tree_structure(ev) == jax.tree_util.tree_structure(variables)
    ref, out = jit_logits(module, variables, x), jit_logits(em, ev, x)
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    # the ReLU6 outputs feeding depthwise convs: each channel's maximum now closer to the tensor's
    norms = [p.norm for p in find_pairs(module, variables, x[:2]) if p.depthwise]
    before, after = channel_maxima(module, variables, x, norms), channel_maxima(em, ev, x, norms)
    use = lambda m: np.mean([np.mean(np.minimum(v, 6) / np.minimum(v, 6).max()) for v in m.values()])  # noqa: E731
    assert use(after) > use(before) + 0.2, (use(before), use(after))
    assert ev["batch_stats"] is variables["batch_stats"]  # only params move


class _ReluAlsoSkipped(nn.Module):
    """conv -> BN -> ReLU, whose output feeds a depthwise conv and is also added to the result: not movable."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(Conv2d(8, 1, name="conv")(x)))
        z = Conv2d(8, 3, groups=8, name="dw")(y)
        return jnp.mean(z + y, axis=(1, 2))


def test_an_activation_read_elsewhere_is_not_moved():
    module = _ReluAlsoSkipped()
    x = np.random.default_rng(1).standard_normal((4, 8, 8, 3)).astype(np.float32)
    variables = calibrate_batch_stats(module, module.init(jax.random.PRNGKey(0), x[:1]), x)
    # ReLU and ReLU6 agree on these inputs (nothing above 6), so the pair is taken for ReLU6 (find_pairs)
    assert find_pairs(module, variables, x[:2]) == (Pair("bn", "dw", True, 6.0),)
    _, ev = equalize_activations(module, variables, x)
    flat = lambda v: traverse_util.flatten_dict(jax.device_get(v["params"]), sep="/")  # noqa: E731
    assert all(np.array_equal(a, flat(variables)[k]) for k, a in flat(ev).items())


def test_bad_input(small):
    module, variables, x = small
    with pytest.raises(ValueError, match="non-empty float NHWC"):
        equalize_activations(module, variables, x[:0])
    with pytest.raises(TypeError, match="BatchNorm"):
        equalize_activations(module, {"params": variables["params"]}, x)
    with pytest.raises(ValueError, match="max_scale"):
        equalize_activations(module, variables, x, max_scale=0.5)
