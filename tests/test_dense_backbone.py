"""Backbone options for dense prediction: a dilated output stride (DeepLab's atrous backbone) and the expansion tap
SSDLite takes its stride-16 map from, against timm's `output_stride` and torchvision's `dilated=True`."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import zoo
from zoo.models.mobilenet_base import dilate, feature_info, resolve_stages
from zoo.models.mobilenetv3 import LARGE

from reference import perturb_batchnorm, random_images, torch

X = random_images(1, (72, 88))  # not a multiple of 32: padding at every stride is exercised


def _nchw(x):
    return torch.from_numpy(x.transpose(0, 3, 1, 2))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _features(module, variables):
    return jax.jit(lambda v, x: module.apply(v, x, features=True))(variables, X)


def _saved(module, tmp_path):
    perturb_batchnorm(module)
    path = tmp_path / "twin.pth"
    torch.save(module.state_dict(), path)
    return str(path)


def test_dilate_turns_strides_past_the_output_stride_into_dilation():
    stages = resolve_stages(LARGE, stem_chs=16, act="hard_swish", se_from_exp=True, se_round="divisible")
    strides = [b.stride for s in stages for b in s]
    for output_stride, first in ((16, True), (16, False), (8, False)):
        blocks = [b for s in dilate(stages, output_stride, first) for b in s]
        assert int(np.prod([b.stride for b in blocks])) * 2 == output_stride
        # the receptive field is kept: every removed stride multiplies the dilation of the spatial convs after it
        removed = [i for i, (b, s) in enumerate(zip(blocks, strides)) if s > b.stride]
        assert blocks[-1].dilation == 32 // output_stride
        assert [b.dilation for b in blocks[:removed[0]]] == [1] * removed[0]
        assert blocks[removed[0]].dilation == (2 if first else 1)
    assert dilate(stages, 32) == tuple(tuple(s) for s in stages)
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        dilate(stages, 4)


@pytest.mark.parity
@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_stride_matches_timm(output_stride, tmp_path):
    import timm

    twin = timm.create_model("mobilenetv3_large_100", pretrained=False).eval()
    path = _saved(twin, tmp_path)
    # timm dilates only its feature extractor; it takes the classifier's weights less the head
    extractor = timm.create_model("mobilenetv3_large_100", pretrained=False, features_only=True,
                                  output_stride=output_stride).eval()
    extractor.load_state_dict(twin.state_dict(), strict=False)
    with torch.inference_mode():
        expected = [_nhwc(t) for t in extractor(_nchw(X))]
    model = zoo.load("mobilenetv3_large_100", weights=path, output_stride=output_stride)
    feats = _features(model.module, model.variables)
    names = [f.name for f in feature_info(model.module.stages)]
    assert len(names) == len(expected)
    for name, want in zip(names, expected):
        assert feats[name].shape == want.shape, name
        np.testing.assert_allclose(np.asarray(feats[name]), want, atol=1e-4, rtol=0, err_msg=name)
    assert expected[-1].shape[1:3] == (-(-72 // output_stride), -(-88 // output_stride))


@pytest.mark.parity
def test_torchvision_dilated_trunk_and_expansion_tap(tmp_path):
    import torchvision

    twin = torchvision.models.mobilenet_v3_large(weights=None, dilated=True).eval()
    path = _saved(twin, tmp_path)
    x = _nchw(X)
    with torch.inference_mode():
        c2 = twin.features[:7](x)  # the last stride-8 map (40 channels)
        c4 = twin.features[13].block[0](twin.features[:13](x))  # expansion of the first 160-wide block
        last = twin.features(x)
    model = zoo.load("mobilenet_v3_large", weights=path, output_stride=16, dilate_first=True,
                     expansion_taps=("stages_5",))
    feats = _features(model.module, model.variables)
    for key, want in (("stages_2", c2), ("stages_5.expansion", c4), ("stages_6", last)):
        np.testing.assert_allclose(np.asarray(feats[key]), _nhwc(want), atol=1e-4, rtol=0, err_msg=key)
    assert feats["stages_6"].shape[1:3] == (-(-72 // 16), -(-88 // 16))
    # timm's convention (the first dilated block keeps dilation 1) is a different function of the same weights
    other = _features(zoo.create_model("mobilenet_v3_large", output_stride=16), model.variables)
    assert np.abs(np.asarray(other["stages_6"]) - _nhwc(last)).max() > 1e-3  # 10x the bar


def test_expansion_tap_errors():
    model = zoo.create_model("mobilenetv3_large_100", expansion_taps=("stages_9",))
    with pytest.raises(ValueError, match=r"expansion_taps \['stages_9'\]: not stages of this network"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), X)
    model = zoo.create_model("mobilenetv3_large_100", expansion_taps=("stages_0",))  # a depthwise-separable block
    with pytest.raises(ValueError, match="needs an inverted residual first block, not DepthwiseSeparable"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), X)
