"""RepVGG: parameter counts of both forms against timm, a network's re-parameterization against its training form, and
timm's training- and deploy-form weights against timm.

`tests/test_parity.py` converts every variant's training form at 224x224; the parity test here adds the deploy form
(timm's `reparameterize_model` checkpoint loaded with `deploy=True`, and the zoo's own fusion against timm's).
The block itself (`MobileOneBlock` with one kxk branch) is tested branch by branch in tests/test_mobileone.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy_param_count, reparameterize
from zoo.counting import count_params
from zoo.models.repvgg import RepVGG, Stage
from zoo.registry import get_entry

from reference import jit_logits, random_images, random_variables
from test_mobileone import _perturb_norms

# timm 1.0.31: parameters of the model, and after `timm.utils.model.reparameterize_model` (checked against timm by
# `test_deploy_form_matches_timm` for A0).
TIMM_PARAMS = {
    "repvgg_a0": (9_108_968, 8_309_384),
    "repvgg_a1": (14_092_264, 12_789_864),
    "repvgg_a2": (28_210_600, 25_499_944),
    "repvgg_b0": (15_817_960, 14_339_048),
}
SHAPE = (1, 64, 64, 3)


def _param_count(module) -> int:
    return count_params(jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(SHAPE)))["params"])


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_param_counts_match_timm_in_both_forms(name):
    train, deploy = TIMM_PARAMS[name]
    module = zoo.create_model(name)
    assert _param_count(module) == train
    assert _param_count(module.clone(deploy=True)) == deploy
    assert deploy_param_count(module, SHAPE) == deploy


def test_timm_checkpoint_names_map_onto_the_block():
    """RepVggBlock's `conv_kxk`/`conv_1x1` are MobileOneBlock's `conv_kxk_0`/`conv_scale`."""
    rename = get_entry("repvgg_a0").converters["timm"](zoo.create_model("repvgg_a0"))
    assert rename("stem.conv_1x1.bn.running_var") == "stem/conv_scale/bn/running_var"
    assert rename("stages.2.13.conv_kxk.conv.weight") == "stages_2/block_13/conv_kxk_0/conv/weight"
    assert rename("stages.0.1.identity.weight") == "stages_0/block_1/identity/weight"
    assert rename("stages.3.0.reparam_conv.bias") == "stages_3/block_0/reparam_conv/bias"


# A small network of the same family: strided blocks without identity and stride-1 blocks with it in every stage.
TINY = RepVGG(stages=(Stage(depth=2, out_chs=8), Stage(depth=2, out_chs=16), Stage(depth=2, out_chs=24),
                      Stage(depth=1, out_chs=32)), stem_chs=8)


def test_network_reparameterize_equals_training_form():
    variables = _perturb_norms(random_variables(TINY, SHAPE))
    x = random_images(2, SHAPE[1:3])
    expected = jit_logits(TINY, variables, x)
    fast_module, fast = reparameterize(TINY, variables, input_shape=SHAPE)
    got = jit_logits(fast_module, fast, x)
    assert fast_module.deploy and not jax.tree_util.tree_leaves(fast.get("batch_stats", {}))
    assert set(fast["params"]["stages_1"]["block_1"]) == {"reparam_conv"}
    assert count_params(fast["params"]) == deploy_param_count(TINY, SHAPE)
    error = np.abs(got - expected).max()
    assert error <= 1e-5 * max(1.0, np.abs(expected).max()), (error, np.abs(expected).max())


def _twin(name: str, x_nchw, seed: int = 0):
    """timm's model with every BatchNorm off its defaults and each block's branch gains near sqrt(2 / branches), so
    the sum of its branches followed by ReLU keeps the activation scale (as tests/test_mobileone.py's twin), and
    logits of a trained model's spread.

    Not statistics from the test images (`reference.calibrate_batchnorm`): a branch with a near-zero variance on two
    small images is amplified so much that timm's own float32 logits are 1e-4 off its float64 ones.
    """
    import torch
    from timm.models.byobnet import RepVggBlock

    from reference import scale_classifier_to_trained_spread, twin_model

    twin = twin_model(f"timm:{name}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in (m for m in twin.modules() if isinstance(m, RepVggBlock)):
            bns = [m for m in block.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            gain = (2.0 / len(bns)) ** 0.5
            for m in bns:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                scale = (torch.rand(m.num_features, generator=g) * 0.4 + 0.8) * gain
                m.weight.copy_(scale * torch.sqrt(m.running_var + m.eps))
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    scale_classifier_to_trained_spread(twin, x_nchw)
    return twin


@pytest.mark.parity
def test_deploy_form_matches_timm(tmp_path):
    """timm's training-form checkpoint through zoo.load; timm's own re-parameterized checkpoint through
    zoo.load(deploy=True); the zoo's fusion of the training form equal to timm's fused kernels."""
    import torch
    from flax import traverse_util
    from timm.utils.model import reparameterize_model

    name, res = "repvgg_a0", 64
    x = random_images(2, (res, res))
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
    twin = _twin(name, x_nchw)
    fused_twin = reparameterize_model(twin)
    assert sum(p.numel() for p in twin.parameters()) == TIMM_PARAMS[name][0]
    assert sum(p.numel() for p in fused_twin.parameters()) == TIMM_PARAMS[name][1]
    with torch.inference_mode():
        expected, expected_fused = twin(x_nchw).numpy(), fused_twin(x_nchw).numpy()
    torch.save(twin.state_dict(), tmp_path / "train.pth")
    torch.save(fused_twin.state_dict(), tmp_path / "deploy.pth")

    model = zoo.load(name, weights=str(tmp_path / "train.pth"), layout="timm", progress=False)
    assert np.abs(np.asarray(model(x)) - expected).max() <= 1e-4
    fast = zoo.load(name, weights=str(tmp_path / "deploy.pth"), layout="timm", deploy=True, progress=False)
    assert np.abs(np.asarray(fast(x)) - expected_fused).max() <= 1e-4

    _, ours = reparameterize(model.module, model.variables, input_shape=(1, res, res, 3))
    ours = traverse_util.flatten_dict(jax.device_get(ours["params"]), sep="/")
    theirs = traverse_util.flatten_dict(jax.device_get(fast.variables["params"]), sep="/")
    assert set(ours) == set(theirs)
    for k in ours:
        scale = max(1.0, float(np.abs(theirs[k]).max()))
        np.testing.assert_allclose(ours[k], theirs[k], atol=1e-5 * scale, rtol=0, err_msg=k)
