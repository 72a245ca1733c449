"""EdgeNeXt: timm's weights with every branch switched on, on a non-square input; the positional encoding and the SDTA
channel split against timm's own; the deploy form; the key map.

`tests/test_parity.py` converts every variant with timm's initial layer scales (1e-6: each block's residual branches
then add ~1e-6 to the logits, so a mistake inside a block would not show), XCA temperatures at 1 (a temperature
mix-up between heads would not show) and at the square default input (where a height/width mix-up in the positional
encoding or the attention's reshapes would not show). Here all three are drawn so that each matters.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import zoo
from compress.deploy import deploy
from zoo.layers.conv import depthwise_impl
from zoo.models.edgenext import VARIANTS, fourier_position_features, split_widths, timm_rename

from reference import converted_timm_twin, random_images, random_variables

HW = (64, 96)  # maps 16x24, 8x12 (the positional encoding's), 4x6, 2x3


def test_registered_variants_are_timms():
    assert set(VARIANTS) == set(zoo.list_models("edgenext_*")) == {
        "edgenext_xx_small", "edgenext_x_small", "edgenext_small", "edgenext_base"}


def _switch_on_branches(twin, seed: int = 0) -> None:
    """Layer scales near 0.3 (a trained network's order), XCA temperatures in 0.5-2.5 per head, LayerNorm gains near
    1 and shifts near 0, biases small."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name.endswith(("gamma", "gamma_xca")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.15)
            elif name.endswith("temperature"):
                p.copy_(torch.rand(p.shape, generator=g) * 2.0 + 0.5)
            elif p.ndim == 1 and "head.fc" not in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(zoo model, images, timm logits, timm stage maps NHWC, timm module) for edgenext_xx_small with every branch on,
    through torch.save -> zoo.load."""
    import torch

    from reference import scale_classifier_to_trained_spread, twin_model

    twin = twin_model("timm:edgenext_xx_small")
    _switch_on_branches(twin)
    x = random_images(2, HW)
    scale_classifier_to_trained_spread(twin, torch.from_numpy(x.transpose(0, 3, 1, 2)))
    model, logits, stages = converted_timm_twin(twin, "edgenext_xx_small", x, tmp_path_factory.mktemp("edgenext"))
    return model, x, logits, stages, twin


def _logits_and_stages(module, variables, x):
    """Logits and the backbone's stage maps from one jitted forward of the backbone (native depthwise: compiles faster
    than the CPU default's shifted slices, the same numbers); the classifier's Linear applied to `pre_logits` here."""
    with depthwise_impl("native"):
        feats = jax.jit(lambda v, x: module.apply(v, x, features=True))(variables, x)
    fc = variables["params"]["head"]["fc"]
    logits = np.asarray(feats["pre_logits"]) @ np.asarray(fc["kernel"]) + np.asarray(fc["bias"])
    return logits, [np.asarray(feats[f"stages_{i}"]) for i in range(4)]


@pytest.mark.parity
def test_converted_weights_with_branches_on_match_timm_on_a_non_square_input(converted):
    import torch

    model, x, expected, stages, twin = converted
    assert 1.0 < np.abs(expected).max() < 100  # a trained model's logit scale, where 1e-4 tests the conversion
    sdta = model.variables["params"]["stages_1"]["blocks"]["block_1"]
    assert np.asarray(sdta["xca"]["temperature"]).std() > 0.1 and np.asarray(sdta["gamma_xca"]).min() > 0.1
    logits, ours = _logits_and_stages(model.module, model.variables, x)
    error = np.abs(logits - expected).max()
    print(f"edgenext_xx_small {HW}: max|zoo - timm| logits {error:.2e}")
    assert error <= 1e-4
    for mine, theirs in zip(ours, stages):
        assert mine.shape == theirs.shape
        assert np.abs(mine - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max())
    with torch.no_grad():  # one SDTA attention branch off: the logits move far more than 1e-4
        twin.stages[1].blocks[1].gamma_xca.zero_()
        assert np.abs(twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy() - expected).max() > 1e-2


@pytest.mark.parity
@pytest.mark.parametrize("hw", [(5, 7), (12, 8)])
def test_positional_features_are_timms(hw):
    """timm's PositionalEncodingFourier with an identity projection gives its sine features: ours, at non-square
    sizes (the encoding is computed for whatever map the input gives)."""
    import torch
    from timm.models.edgenext import PositionalEncodingFourier

    pe = PositionalEncodingFourier(hidden_dim=32, dim=64)
    with torch.no_grad():
        pe.token_projection.weight.copy_(torch.eye(64)[:, :, None, None])
        pe.token_projection.bias.zero_()
        theirs = pe((1, *hw))[0].numpy().transpose(1, 2, 0)
    ours = fourier_position_features(*hw)
    assert ours.shape == (*hw, 64) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    assert not np.allclose(ours[..., :32], ours[..., 32:], atol=1e-3)  # rows and columns encoded apart


@pytest.mark.parity
@pytest.mark.parametrize("channels,scales", [(88, 3), (100, 3), (168, 4), (48, 2)])
def test_channel_groups_are_torch_chunks(channels, scales):
    import torch

    assert split_widths(channels, scales) == tuple(c.shape[0] for c in torch.arange(channels).chunk(scales))


def test_channel_groups_that_do_not_split_raise():
    with pytest.raises(ValueError, match="do not split into 4 groups"):
        split_widths(6, 4)  # torch's chunk gives 3 groups of 2: timm's block fails on it too
    with pytest.raises(ValueError, match="at least 2"):
        split_widths(8, 1)


def test_deploy_form_is_the_training_form():
    module = zoo.create_model("edgenext_xx_small")
    variables = random_variables(module, (1, 64, 64, 3))
    fast_module, fast = deploy((module, variables))
    assert fast_module == module and fast is variables


def test_timm_names_map():
    rename = timm_rename(zoo.create_model("edgenext_xx_small"))
    assert rename("stages.2.blocks.4") == "stages_2/blocks/block_4/layer_scale"  # a conv encoder's gamma
    assert rename("stages.2.blocks.5") == "stages_2/blocks/block_5"  # an SDTA block's gamma and gamma_xca
    assert rename("stages.1.blocks.1.convs.0") == "stages_1/blocks/block_1/convs_0"
    assert rename("stages.1.blocks.1.pos_embd.token_projection") == "stages_1/blocks/block_1/pos_embd/token_projection"
    assert rename("stages.3.downsample.1") == "stages_3/downsample_1"
    assert rename("stem.1") == "stem_1" and rename("head.norm") == "head/norm"
