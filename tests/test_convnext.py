"""ConvNeXt: timm's weights with every block's branch switched on, the Linear form of the MLP, the deploy form.

`tests/test_parity.py` converts every variant with timm's initial layer scale (1e-6): each block's residual branch then
adds ~1e-6 to the logits, so a mistake inside a block would not show. Here layer scale, LayerNorm affine parameters
and biases are drawn so that every branch matters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy
from zoo.models.convnext import ATTO, ConvNeXt, Stage, timm_rename

from reference import jit_logits, random_images, random_variables


def _switch_on_blocks(twin, seed: int = 0) -> None:
    """Layer scales near 0.3 (a trained network's order), LayerNorm gains near 1 and shifts near 0, biases small."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.15)
            elif p.ndim == 1 and "head.fc" not in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parity
@pytest.mark.parametrize("name", ["convnext_atto", "convnext_atto_ols"])
def test_blocks_match_timm_with_layer_scale_on(name, tmp_path):
    import torch

    from reference import scale_classifier_to_trained_spread, twin_model

    x = random_images(2, (64, 64))
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
    twin = twin_model(f"timm:{name}")
    _switch_on_blocks(twin)
    scale_classifier_to_trained_spread(twin, x_nchw)
    with torch.inference_mode():
        expected = twin(x_nchw).numpy()
    torch.save(twin.state_dict(), tmp_path / "twin.pth")
    model = zoo.load(name, weights=str(tmp_path / "twin.pth"), layout="timm", progress=False)
    error = np.abs(np.asarray(model(x)) - expected).max()
    assert error <= 1e-4, error
    with torch.no_grad():  # one block's branch off: the logits move far more than the tolerance
        twin.stages[2].blocks[3].gamma.zero_()
        assert np.abs(twin(x_nchw).numpy() - expected).max() > 1e-2


def test_linear_mlp_computes_the_conv_mlp():
    """`conv_mlp=False` (Linear fc1/fc2, as timm's larger ConvNeXts) with the 1x1 kernels reshaped: the same logits."""
    small = tuple(Stage(1, s.dims // 5) for s in ATTO)  # 8, 16, 32, 64 channels
    conv_form = ConvNeXt(stages=small, num_classes=10)
    linear_form = conv_form.clone(conv_mlp=False)
    shape = (1, 32, 32, 3)
    variables = random_variables(conv_form, shape)

    def squeeze(path, leaf):
        names = [str(getattr(p, "key", p)) for p in path]
        return leaf.reshape(leaf.shape[-2:]) if "mlp" in names and names[-1] == "kernel" else leaf

    linear_vars = jax.tree_util.tree_map_with_path(squeeze, variables)
    assert jax.tree_util.tree_structure(linear_vars) == jax.tree_util.tree_structure(
        jax.eval_shape(lambda: linear_form.init(jax.random.key(0), jnp.zeros(shape))))
    x = random_images(2, shape[1:3])
    np.testing.assert_allclose(jit_logits(linear_form, linear_vars, x), jit_logits(conv_form, variables, x),
                               atol=1e-5, rtol=0)


def test_deploy_form_is_the_training_form():
    module = zoo.create_model("convnext_atto")
    variables = random_variables(module, (1, 64, 64, 3))
    fast_module, fast = deploy((module, variables))
    assert fast_module == module and fast is variables


def test_timm_names_map():
    rename = timm_rename(zoo.create_model("convnext_atto"))
    assert rename("stages.2.blocks.5") == "stages_2/blocks/block_5/layer_scale"
    assert rename("stages.1.downsample.1") == "stages_1/downsample_1"
    assert rename("stages.0.blocks.1.mlp.fc2") == "stages_0/blocks/block_1/mlp/fc2"
    assert rename("stem.2") == "stem_2" and rename("head.norm") == "head/norm"
