"""LeViT: parameter counts against timm, the attention-bias index against timm's, the deploy form (every Linear/conv
+BN one layer with a bias, each classifier's BatchNorm folded into its Linear) against the training form, and converted timm weights
against timm with every attention bias and BatchNorm off its default.

`tests/test_parity.py` converts every variant too, but with timm's attention biases at their zero init (so the bias
indexing is not tested there), the classifier BatchNorms' statistics taken from its two test images (the head then
divides by sqrt(var) of two nearly equal pooled features, ~1e-3) and only `head_dist` rescaled (logits ~300); `_twin`
here avoids all three.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy_checked, deploy_param_count
from zoo.counting import count_params
from zoo.layers.attention import attention_bias_index
from zoo.models.levit import VARIANTS

from reference import converted_timm_twin, perturb_batchnorm, random_images, reference_counts

RES = 224  # LeViT's attention biases are sized by the token map: timm's fixed input size


@pytest.mark.parametrize("name", list(VARIANTS))
def test_param_counts_match_timm(name):
    module = zoo.create_model(name)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, RES, RES, 3))))
    assert count_params(variables["params"]) == reference_counts(f"timm:{name}", RES)["params"]


@pytest.mark.parametrize("hw,stride", [((14, 14), 1), ((7, 7), 1), ((14, 14), 2), ((7, 7), 2), ((4, 6), 2)])
def test_attention_bias_index_matches_timm(hw, stride):
    from timm.models.levit import Attention, AttentionDownsample

    if stride == 1:
        ref = Attention(dim=32, key_dim=8, num_heads=2, resolution=hw)
    else:
        ref = AttentionDownsample(in_dim=32, out_dim=32, key_dim=8, num_heads=2, stride=stride, resolution=hw)
    np.testing.assert_array_equal(attention_bias_index(hw, stride), ref.attention_bias_idxs.numpy())


def _twin(name: str, x_nchw, seed: int = 0):
    """timm's model with random attention biases (N(0, 1), the scale of q.k / sqrt(d)), BatchNorms perturbed
    (`reference.perturb_batchnorm`), the two classifier BatchNorms given statistics of the pooled features' own scale,
    and both classifiers scaled so the averaged logits have a trained model's spread (std ~3).

    Not `reference.calibrate_batchnorm`: with running statistics set to its inputs' and random attention biases, the
    twin itself is chaotic (its float32 logits ~4 from its float64 ones at 224x224); timm's default Linear init
    (variance 1/3 per layer) with the perturbed statistics keeps activations O(1) instead.
    """
    import torch

    from reference import twin_model

    twin = twin_model(f"timm:{name}")
    g = torch.Generator().manual_seed(seed)
    perturb_batchnorm(twin, seed)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if n.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g))
        with torch.inference_mode():
            pooled = twin.forward_head(twin.forward_features(x_nchw), pre_logits=True)
        for head in (twin.head, twin.head_dist):
            head.bn.running_mean.copy_(pooled.mean(0) + torch.randn(pooled.shape[1], generator=g) * 0.1)
            head.bn.running_var.copy_((torch.rand(pooled.shape[1], generator=g) * 1.5 + 0.5) * pooled.var() + 1e-2)
        with torch.inference_mode():
            std = float(twin(x_nchw).std())
        for head in (twin.head, twin.head_dist):
            head.linear.weight.mul_(3.0 / std)
            head.linear.bias.mul_(3.0 / std)
    return twin


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(zoo model, images, timm logits, timm stage maps NHWC) for levit_128s through torch.save -> zoo.load."""
    import torch

    x = random_images(4, (RES, RES))
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
    twin = _twin("levit_128s", x_nchw)
    model, expected, stages = converted_timm_twin(twin, "levit_128s", x, tmp_path_factory.mktemp("levit"))
    return model, x, expected, stages


@pytest.mark.parity
def test_converted_timm_weights_match_timm(converted):
    model, x, expected, stages = converted
    assert 1.0 < np.abs(expected).max() < 100  # a trained model's logit scale, where 1e-4 tests the conversion
    got = np.asarray(model(x))
    error = np.abs(got - expected).max()
    print(f"levit_128s {RES}x{RES}: max|zoo - timm| logits {error:.2e}")
    assert error <= 1e-4
    feats = jax.jit(lambda v, x: model.module.apply(v, x, features=True))(model.variables, x)
    for name, theirs in zip(("stages_0", "stages_1"), stages):
        ours = feats[name]
        scale = np.abs(theirs).max()
        assert np.abs(np.asarray(ours) - theirs).max() <= 1e-5 * max(1.0, scale), name


def test_deploy_form_equals_training_form(converted):
    model, x, _, _ = converted
    shape = (1, RES, RES, 3)
    fast = deploy_checked(model, x, atol=1e-4, rtol=1e-5)
    assert fast.module.deploy and not jax.tree_util.tree_leaves(fast.variables.get("batch_stats", {}))
    params = fast.variables["params"]
    assert set(params["stages_0"]["blocks_0"]["attn"]["qkv"]) == {"linear"}
    assert set(params["stages_0"]["blocks_0"]["attn"]["qkv"]["linear"]) == {"kernel", "bias"}
    assert set(params["stem"]["conv1"]) == {"linear"}
    assert set(params["head"]) == {"fc"} and set(params["head"]["fc"]) == {"head", "head_dist"}
    assert count_params(params) == deploy_param_count(model.module, shape)
    # every BatchNorm gone (scale + shift), one bias per folded layer: the official LeViT deploy form's count
    assert count_params(model.variables["params"]) == 7_777_058 and count_params(params) == 7_756_466


def test_input_size_other_than_the_biases_names_the_sizes_that_fit():
    module = zoo.create_model("levit_128s")
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, 209, 224, 3))), variables)  # still a 14x14 map
    with pytest.raises(ValueError, match=r"14x14 map at stride 16, which inputs of 209 to 224 pixels .* 256x256 input "
                                         r"gives a 16x16 map"):
        jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, 256, 256, 3))), variables)
