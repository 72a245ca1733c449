"""DeiT: what the generic tests leave out. The position embedding's resampling against timm's, converted weights of
the distilled model against timm at a size other than 224x224 (timm's `dynamic_img_size=True`) with every parameter
off its initial value, the feature pyramid against timm's block outputs, the distilled head's deploy form (one
Linear), and the error for an input size that is not a multiple of the patch size.

`tests/test_parity.py` converts every variant at 224x224 only, with timm's initial parameters: zero biases, unit
LayerNorms, weights of std 0.02 (every block then adds little to the embeddings), so it tests neither the resampling
nor the norms' and biases' conversion.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import zoo
from compress.deploy import deploy, deploy_param_count
from zoo.counting import count_params
from zoo.layers.pos_embed import resample_pos_embed

from reference import random_images, torch

NAME = "deit_tiny_distilled_patch16_224"
HW = (64, 96)  # a 4x6 patch grid: the 14x14 position embedding resampled down, not square


@pytest.mark.reference
@pytest.mark.parametrize("new_grid", [(4, 6), (7, 7), (13, 13), (16, 16), (12, 20)])
@pytest.mark.parametrize("num_prefix", [1, 2])
def test_pos_embed_resampling_matches_timm(new_grid, num_prefix):
    from timm.layers import resample_abs_pos_embed

    pos = np.random.default_rng(0).standard_normal((1, num_prefix + 14 * 14, 8)).astype(np.float32)
    ref = resample_abs_pos_embed(torch.from_numpy(pos), list(new_grid), (14, 14), num_prefix).numpy()
    got = np.asarray(resample_pos_embed(pos, (14, 14), new_grid, num_prefix))
    assert got.shape == ref.shape == (1, num_prefix + new_grid[0] * new_grid[1], 8)
    np.testing.assert_array_equal(got[:, :num_prefix], pos[:, :num_prefix])
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def _twin(x_nchw, seed: int = 0):
    """timm's distilled DeiT-Ti at any size (`dynamic_img_size=True`) with every parameter drawn anew: LayerNorm
    scales around 1 and shifts around 0, biases, tokens and position embedding N(0, 0.1-0.5), weights
    N(0, 1/fan_in) (so attention logits are O(1) and every block changes the tokens), then both classifiers scaled so
    the averaged logits have a trained model's spread (std ~3), each with its own weights."""
    import timm

    torch.manual_seed(seed)
    twin = timm.create_model(NAME, dynamic_img_size=True).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in twin.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif n.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(np.prod(p.shape[1:])))
            else:  # biases, tokens, position embedding
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "token" in n or "pos" in n else 0.1))
        with torch.inference_mode():
            std = float(twin(x_nchw).std())
        for head in (twin.head, twin.head_dist):
            head.weight.mul_(3.0 / std)
            head.bias.mul_(3.0 / std)
    return twin


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(zoo model, images, timm's logits, its two classifiers' logits and pre-logits, its blocks 2, 5, 8, 11 (NCHW),
    the zoo's logits and feature dict) for timm's weights through torch.save -> zoo.load."""
    x = random_images(2, HW)
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
    twin = _twin(x_nchw)
    with torch.inference_mode():
        expected = twin(x_nchw).numpy()
        tokens = twin.forward_features(x_nchw)
        parts = (twin.head(tokens[:, 0]).numpy(), twin.head_dist(tokens[:, 1]).numpy(),
                 twin.forward_head(tokens, pre_logits=True).numpy())
        blocks = twin.forward_intermediates(x_nchw, indices=[2, 5, 8, 11], intermediates_only=True)
    path = tmp_path_factory.mktemp("deit") / "twin.pth"
    torch.save(twin.state_dict(), path)
    model = zoo.load(NAME, weights=str(path), layout="timm", progress=False)
    got = jax.jit(lambda v, x: (model.module.apply(v, x), model.module.apply(v, x, features=True)))(model.variables, x)
    return model, x, expected, parts, blocks, got


@pytest.mark.parity
def test_distilled_model_at_another_size_matches_timm(converted):
    """Eval output = the mean of the two classifiers' logits, as timm's; the position embedding resampled to 4x6."""
    _, _, expected, (y_cls, y_dist, pre_logits), _, (logits, feats) = converted
    assert np.abs(y_cls - y_dist).max() > 1.0  # two different classifiers: their mean is not either one
    np.testing.assert_allclose(expected, (y_cls + y_dist) / 2, atol=1e-5, rtol=0)
    error = float(np.abs(np.asarray(logits) - expected).max())
    print(f"{NAME} {HW[0]}x{HW[1]}: max|zoo - timm| logits {error:.2e} (max |logit| {np.abs(expected).max():.1f})")
    assert error <= 1e-4
    np.testing.assert_allclose(np.asarray(feats["pre_logits"]), pre_logits, atol=1e-4, rtol=0)


@pytest.mark.parity
def test_feature_pyramid_is_timm_block_outputs_resampled(converted):
    """stride 16: block 8's patch tokens as timm returns them; 4 and 8: blocks 2 and 5 upsampled as torch's bilinear
    (align_corners=False); 32: block 11 max-pooled 2x2/2."""
    import torch.nn.functional as F

    _, _, _, _, blocks, (_, feats) = converted
    h, w = HW[0] // 16, HW[1] // 16
    expected = {
        "blocks_2": F.interpolate(blocks[0], size=(4 * h, 4 * w), mode="bilinear", align_corners=False),
        "blocks_5": F.interpolate(blocks[1], size=(2 * h, 2 * w), mode="bilinear", align_corners=False),
        "blocks_8": blocks[2],
        "blocks_11": F.max_pool2d(blocks[3], 2, 2, ceil_mode=True),
    }
    assert set(feats) == {*expected, "pre_logits"}  # (the order: tests/test_models.py; jit returns keys sorted)
    for key, theirs in expected.items():
        theirs = theirs.numpy().transpose(0, 2, 3, 1)
        assert feats[key].shape == theirs.shape, key
        scale = np.abs(theirs).max()
        assert np.abs(np.asarray(feats[key]) - theirs).max() <= 1e-5 * max(1.0, scale), key


@pytest.mark.parity
def test_deploy_form_is_one_linear_computing_the_mean(converted):
    model, x, expected, _, _, _ = converted
    fast = deploy(model)
    head = fast.variables["params"]["head"]
    assert fast.module.deploy and set(head) == {"fc"} and head["fc"]["kernel"].shape == (2 * 192, 1000)
    got = np.asarray(jax.jit(fast.module.apply)(fast.variables, x))
    assert np.abs(got - expected).max() <= 1e-4
    train_count = count_params(model.variables["params"])
    assert count_params(fast.variables["params"]) == deploy_param_count(model.module, (1, *HW, 3)) == train_count - 1000


@pytest.mark.parametrize("hw,hint", [((100, 100), "96 or 112"), ((8, 224), "height of 16 and a width of 224"),
                                     ((224, 230), "height of 224 and a width of 224 or 240")])
def test_input_size_must_be_a_multiple_of_the_patch_size(hw, hint):
    module = zoo.create_model("deit_tiny_patch16_224")
    x = jax.ShapeDtypeStruct((1, *hw, 3), np.float32)
    with pytest.raises(ValueError, match=rf"multiples of its patch size 16 .*got {hw[0]}x{hw[1]}.*{hint}"):
        jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
