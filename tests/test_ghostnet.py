"""GhostNet V1/V2/V3: parameter counts of both forms against timm, the re-parameterizable branches against their
training form, DFC attention's resize against torch's rule, and GhostNetV3's deploy form against timm's.

`tests/test_parity.py` converts every variant's training form at 224x224 (DFC attention on 56..7-pixel maps, odd
sizes included) and `tests/test_contract.py` checks each distinct architecture's deploy form against its training
form; the parity test here adds timm's re-parameterized checkpoint loaded with `deploy=True` and the zoo's fusion
compared with timm's, on the smallest input the network takes (64x64: DFC pools the last 2x2 maps to 1x1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy_param_count
from zoo.layers import kinds
from zoo.counting import count_params
from zoo.layers.conv import Conv2d, depthwise_impl
from zoo.layers.ghost import DFCAttention, GhostModule, RepBranches, _upsample_nearest_axis
from zoo.layers.norm import batch_norm

from reference import random_images, random_variables

# timm 1.0.31: parameters of the model; after `timm.utils.model.reparameterize_model` (GhostNetV3's branches fused,
# V1 and V2 have none); and after `compress.deploy`, which also folds every BatchNorm left (timm's re-parameterized
# count less one channel count per BatchNorm: its scale and shift go, a bias of that size comes). The training-form
# counts are checked against timm by test_models, the others by `test_deploy_form_matches_timm` (V3).
TIMM_PARAMS = {  # name: (training form, re-parameterized, deployed)
    "ghostnet_100": (5_182_508, 5_182_508, 5_171_524),
    "ghostnetv2_100": (6_156_908, 6_156_908, 6_125_716),
    "ghostnetv2_130": (8_960_404, 8_960_404, 8_919_880),
    "ghostnetv2_160": (12_392_698, 12_392_698, 12_342_762),
    "ghostnetv3_100": (8_129_028, 6_147_588, 6_125_716),
}
SHAPE = (1, 64, 64, 3)


def _param_count(module) -> int:
    return count_params(jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(SHAPE)))["params"])


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_param_counts_match_timm_in_both_forms(name):
    train, reparameterized, deployed = TIMM_PARAMS[name]
    module = zoo.create_model(name)
    assert _param_count(module) == train
    assert _param_count(module.clone(deploy=True)) == reparameterized
    assert deploy_param_count(module, SHAPE) == deployed


def _perturbed(variables, seed: int = 0):
    """BatchNorm scales, shifts and statistics off their defaults (gains near 1)."""
    rng = np.random.default_rng(seed)

    def walk(tree_p, tree_s):
        p, s = dict(tree_p), dict(tree_s)
        for k, sub in tree_s.items():
            if "mean" in sub:
                n = sub["mean"].shape
                var = rng.uniform(0.5, 2.0, n).astype(np.float32)
                s[k] = {"mean": (rng.standard_normal(n) * 0.1).astype(np.float32), "var": var}
                p[k] = {"scale": (rng.uniform(0.8, 1.2, n) * np.sqrt(var)).astype(np.float32),
                        "bias": (rng.standard_normal(n) * 0.1).astype(np.float32)}
            else:
                p[k], s[k] = walk(tree_p[k], sub)
        return p, s

    params, stats = walk(variables["params"], variables["batch_stats"])
    return {"params": params, "batch_stats": stats}


# (in, out, kernel, stride, groups, branches, scale, identity): GhostNetV3's primary 1x1 (no identity, even where it
# keeps the width), cheap depthwise and strided depthwise convs, RepGhost's cheap conv, and a grouped conv.
BRANCHES = {
    "v3_primary_same_width": (8, 8, 1, 1, 1, 3, False, False),
    "v3_cheap": (8, 8, 3, 1, 8, 3, True, True),
    "v3_strided_dw": (8, 8, 5, 2, 8, 3, True, False),
    "repghost_cheap": (8, 8, 3, 1, 8, 1, False, True),
    "grouped_identity": (8, 8, 3, 1, 2, 2, True, True),
}


@pytest.mark.parametrize("kind", list(BRANCHES))
def test_branches_reparameterize_to_the_training_form(kind):
    cin, cout, k, s, g, n, scale, identity = BRANCHES[kind]
    layer = RepBranches(cout, k, Conv2d, batch_norm(), stride=s, groups=g, num_conv_branches=n, scale=scale,
                        identity=identity)
    x = np.random.default_rng(1).standard_normal((2, 9, 9, cin)).astype(np.float32)
    variables = _perturbed(random_variables(layer, (1, 9, 9, cin)))
    expected = np.asarray(layer.apply(variables, x))
    deployed = kinds.kind_of(layer).reparameterize(layer, jax.device_get(variables))  # what compress.deploy calls
    assert set(deployed) == {"params"} and set(deployed["params"]) == {"reparam_conv"}
    got = np.asarray(layer.clone(deploy=True).apply(deployed, x))
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=0)


def test_identity_branch_needs_the_width_kept():
    layer = RepBranches(8, 3, Conv2d, batch_norm(), groups=4, identity=True)
    with pytest.raises(ValueError, match="identity branch needs stride 1 and 8 input channels, got stride 1 and 4"):
        jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4))))


@pytest.mark.parametrize("n,size", [(3, 7), (4, 8), (1, 3), (7, 14)])
def test_nearest_upsampling_reads_floor_of_i_times_n_over_size(n, size):
    """torch's F.interpolate(mode='nearest') with a target size: output i reads input floor(i * n / size)."""
    x = np.arange(n, dtype=np.float32).reshape(1, n, 1, 1)
    got = np.asarray(_upsample_nearest_axis(jnp.asarray(x), size, 1))[0, :, 0, 0]
    np.testing.assert_array_equal(got, np.arange(size) * n // size)


def test_dfc_attention_needs_two_pixels():
    module = GhostModule(8, Conv2d, batch_norm(), dfc=True)
    with pytest.raises(ValueError, match="at least 2x2, got 1x1"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1, 1, 4))))
    gate = DFCAttention(4, Conv2d, batch_norm())
    out = gate.apply(random_variables(gate, (1, 5, 6, 4)), jnp.ones((1, 5, 6, 4)))
    assert out.shape == (1, 5, 6, 4) and bool(((out > 0) & (out < 1)).all())


# ------------------------------------------------------------------------------------------------------------ parity
def _twin(name: str, x_nchw):
    from reference import perturb_batchnorm, scale_classifier_to_trained_spread, twin_model

    twin = twin_model(f"timm:{name}")
    perturb_batchnorm(twin)
    scale_classifier_to_trained_spread(twin, x_nchw)
    return twin


@pytest.mark.parity
def test_deploy_form_matches_timm(tmp_path):
    """GhostNetV3: the zoo's fusion of timm's training-form checkpoint equal to timm's own re-parameterized weights,
    and those, loaded with zoo.load(deploy=True), giving timm's re-parameterized logits (the training form's logits:
    tests/test_parity.py); the count after `compress.deploy` equal to timm's re-parameterized model with every
    BatchNorm folded."""
    import torch
    from flax import traverse_util
    from timm.utils.model import reparameterize_model

    from compress.deploy import reparameterize

    name, res = "ghostnetv3_100", SHAPE[1]
    x = random_images(2, (res, res))
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
    twin = _twin(name, x_nchw)
    fused_twin = reparameterize_model(twin)
    assert sum(p.numel() for p in twin.parameters()) == TIMM_PARAMS[name][0]
    assert sum(p.numel() for p in fused_twin.parameters()) == TIMM_PARAMS[name][1]
    bn_channels = sum(m.num_features for m in fused_twin.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert TIMM_PARAMS[name][1] - bn_channels == TIMM_PARAMS[name][2]
    with torch.inference_mode():
        expected_fused = fused_twin(x_nchw).numpy()
    torch.save(twin.state_dict(), tmp_path / "train.pth")
    torch.save(fused_twin.state_dict(), tmp_path / "deploy.pth")

    model = zoo.load(name, weights=str(tmp_path / "train.pth"), layout="timm", progress=False)
    fast = zoo.load(name, weights=str(tmp_path / "deploy.pth"), layout="timm", deploy=True, progress=False)
    _, ours = reparameterize(model.module, model.variables, input_shape=SHAPE)
    ours = traverse_util.flatten_dict(jax.device_get(ours["params"]), sep="/")
    theirs = traverse_util.flatten_dict(jax.device_get(fast.variables["params"]), sep="/")
    assert set(ours) == set(theirs)
    for k in ours:
        scale = max(1.0, float(np.abs(theirs[k]).max()))
        np.testing.assert_allclose(ours[k], theirs[k], atol=1e-5 * scale, rtol=0, err_msg=k)
    with depthwise_impl("native"):  # a smaller graph to compile than the CPU default (the same numbers)
        assert np.abs(np.asarray(fast(x)) - expected_fused).max() <= 1e-4
