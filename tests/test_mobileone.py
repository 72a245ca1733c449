"""MobileOne: parameter counts of both forms against timm, re-parameterization against the training form (one block of
every kind, whole networks through `compress.deploy`), and timm's training- and deploy-form weights against timm.

`tests/test_parity.py` already converts every variant's training form at 224x224; the parity tests here add the
deploy form (timm's `reparameterize_model` checkpoint loaded with `deploy=True`, and the zoo's own fusion against
timm's) on a twin whose BatchNorm gains keep activations O(1) through the 40+ blocks (see `_twin`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy_param_count, reparameterize
from zoo.counting import count_params
from zoo.layers.conv import depthwise_impl
from zoo.layers.reparam import MobileOneBlock
from zoo.models.mobileone import MobileOne, Stage

from reference import jit_logits, random_images, random_variables

# timm 1.0.31: parameters of the model, and after `timm.utils.model.reparameterize_model` (checked against timm by
# `test_deploy_form_matches_timm`; ../shared/reference/timm_counts.csv lists S0 and S1).
TIMM_PARAMS = {
    "mobileone_s0": (5_293_272, 2_078_504),
    "mobileone_s1": (4_825_192, 4_764_840),
    "mobileone_s2": (7_884_648, 7_808_168),
    "mobileone_s3": (10_170_600, 10_078_312),
    "mobileone_s4": (14_951_248, 14_838_352),
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


def _perturb_norms(variables, seed: int = 0):
    """Every BatchNorm's scale, shift and statistics moved off their defaults.

    The gain scale / sqrt(var) of each branch is near sqrt(2 / branches of its block), so the sum of a block's
    branches followed by ReLU keeps the activation scale of its input (N(0, 1 / fan_in) kernels keep it too): a
    random network then stays O(1) through its 40+ blocks instead of growing ~3x per block.
    """
    rng = np.random.default_rng(seed)

    def norm(n, gain):
        var = rng.uniform(0.5, 2.0, n).astype(np.float32)
        scale = (rng.uniform(0.8, 1.2, n) * gain * np.sqrt(var + 1e-5)).astype(np.float32)
        return ({"scale": scale, "bias": (rng.standard_normal(n) * 0.1).astype(np.float32)},
                {"mean": (rng.standard_normal(n) * 0.1).astype(np.float32), "var": var})

    def walk(p, s, gain):
        p, s = dict(p), dict(s)
        branches = [k for k in s if k.startswith("conv_kxk_") or k in ("conv_scale", "identity")]
        if branches:
            gain = np.sqrt(2.0 / len(branches))
        for k, sub in s.items():
            if "mean" in sub:
                p[k], s[k] = norm(sub["mean"].shape, gain)
            else:
                p[k], s[k] = walk(p[k], sub, gain)
        return p, s

    params, stats = walk(variables["params"], variables["batch_stats"], 1.0)
    return {"params": params, "batch_stats": stats}


# (in, out, kernel, stride, groups, branches, se): every branch combination the family uses, and a grouped (not
# depthwise) conv that it does not, for the identity kernel's in-group index.
BLOCKS = {
    "depthwise_identity": (8, 8, 3, 1, 8, 4, 0),
    "depthwise_strided": (8, 8, 3, 2, 8, 1, 0),
    "pointwise_identity": (8, 8, 1, 1, 1, 3, 0),
    "pointwise_widening_se": (8, 16, 1, 1, 1, 1, 8),
    "grouped_identity": (8, 8, 3, 1, 2, 2, 0),
    "dense_strided_se": (4, 8, 3, 2, 1, 2, 8),
}


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_reparameterize_equals_training_form(kind):
    cin, cout, k, s, g, n, se = BLOCKS[kind]
    block = MobileOneBlock(cout, k, s, g, num_conv_branches=n, se_chs=se)
    x = np.random.default_rng(1).standard_normal((2, 9, 9, cin)).astype(np.float32)
    variables = _perturb_norms(random_variables(block, (1, 9, 9, cin)))
    expected = np.asarray(block.apply(variables, x))
    fused = MobileOneBlock.reparameterize(jax.device_get(variables))
    assert set(fused) == {"params"}
    assert set(fused["params"]) == {"reparam_conv"} | ({"se"} if se else set())
    got = np.asarray(block.clone(deploy=True).apply(fused, x))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=0)


# MobileOne-S0 (4 conv branches, all three branch kinds, strided and identity blocks) and a small network of the same
# family with squeeze-excite (S4's blocks) in the last two stages; native depthwise convolutions trace a smaller graph
# than the CPU's shifted-slice form (the same numbers), which halves the compile time of S0's training form.
TINY_SE = MobileOne(stages=(Stage(units=1, out_chs=16), Stage(units=2, out_chs=24),
                            Stage(units=2, out_chs=32, se_units=1), Stage(units=1, out_chs=48, se_units=1)),
                    stem_chs=16, num_conv_branches=2)


@pytest.mark.parametrize("name", ["mobileone_s0", "tiny_se"])
def test_network_reparameterize_equals_training_form(name):
    module = TINY_SE if name == "tiny_se" else zoo.create_model(name)
    variables = _perturb_norms(random_variables(module, SHAPE))
    x = random_images(2, SHAPE[1:3])
    with depthwise_impl("native"):
        expected = jit_logits(module, variables, x)
        fast_module, fast = reparameterize(module, variables, input_shape=SHAPE)
        got = jit_logits(fast_module, fast, x)
    assert fast_module.deploy and not jax.tree_util.tree_leaves(fast.get("batch_stats", {}))
    assert set(fast["params"]["stages_2"]["block_0"]) == {"reparam_conv"}
    assert set(fast["params"]["stages_3"]["block_1"]) == {"reparam_conv"} | ({"se"} if name == "tiny_se" else set())
    assert count_params(fast["params"]) == deploy_param_count(module, SHAPE)
    assert 0.1 < np.abs(expected).max() < 1e4  # no explosion (the scale _perturb_norms aims at)
    error = np.abs(got - expected).max()
    assert error <= 1e-5 * np.abs(expected).max(), (error, np.abs(expected).max())


# ------------------------------------------------------------------------------------------------------------ parity
def _twin(name: str, x_nchw, seed: int = 0):
    """timm's model with every BatchNorm moved off its defaults as `_perturb_norms` does (branch gains near
    sqrt(2 / branches of the block), so activations stay O(1)), and logits of a trained model's spread.

    Not `reference.perturb_batchnorm` alone (gains near 1): summed over a block's 2-6 branches, activations then grow
    ~3x per block. Nor with `reference.calibrate_batchnorm` (tests/test_parity.py): statistics from two small images
    leave near-zero variances in the last stages, which amplify float32 rounding past 1e-4 here.
    """
    import torch
    from timm.models.byobnet import MobileOneBlock as TimmBlock

    from reference import scale_classifier_to_trained_spread, twin_model

    twin = twin_model(f"timm:{name}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in (m for m in twin.modules() if isinstance(m, TimmBlock)):
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
def test_in_chans_adapts_both_stem_branches(tmp_path):
    """The stem reads the image in two branches (3x3 and 1x1): both kernels are adapted for in_chans=1, so a gray
    image gives the RGB model's logits on that image repeated over RGB."""
    import torch

    x = random_images(1, (64, 64))
    twin = _twin("mobileone_s0", torch.from_numpy(x.transpose(0, 3, 1, 2)))
    torch.save(twin.state_dict(), tmp_path / "train.pth")
    with depthwise_impl("native"):
        rgb = zoo.load("mobileone_s0", weights=str(tmp_path / "train.pth"), progress=False)
        gray = zoo.load("mobileone_s0", weights=str(tmp_path / "train.pth"), in_chans=1, progress=False)
        x1 = x[..., :1]
        np.testing.assert_allclose(np.asarray(gray(x1)), np.asarray(rgb(np.repeat(x1, 3, -1))), atol=1e-4)


@pytest.mark.parity
@pytest.mark.parametrize("name,res", [("mobileone_s0", 96), ("mobileone_s4", 224)])  # S4: squeeze-excite
def test_deploy_form_matches_timm(name, res, tmp_path):
    """timm's training-form checkpoint through zoo.load; timm's own re-parameterized checkpoint through
    zoo.load(deploy=True); the zoo's fusion of the training form equal to timm's fused kernels."""
    import torch
    from flax import traverse_util
    from timm.utils.model import reparameterize_model

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

    with depthwise_impl("native"):  # a smaller graph to compile than the CPU default (the same numbers)
        model = zoo.load(name, weights=str(tmp_path / "train.pth"), layout="timm", progress=False)
        error = np.abs(np.asarray(model(x)) - expected).max()
        print(f"{name} {res}x{res}: training form max|zoo - timm| {error:.2e}")
        assert error <= 1e-4
        fast = zoo.load(name, weights=str(tmp_path / "deploy.pth"), layout="timm", deploy=True, progress=False)
        error = np.abs(np.asarray(fast(x)) - expected_fused).max()
        print(f"{name} {res}x{res}: deploy form max|zoo - timm| {error:.2e}")
        assert error <= 1e-4

    _, ours = reparameterize(model.module, model.variables, input_shape=(1, res, res, 3))
    ours = traverse_util.flatten_dict(jax.device_get(ours["params"]), sep="/")
    theirs = traverse_util.flatten_dict(jax.device_get(fast.variables["params"]), sep="/")
    assert set(ours) == set(theirs)
    for k in ours:
        scale = max(1.0, float(np.abs(theirs[k]).max()))
        np.testing.assert_allclose(ours[k], theirs[k], atol=1e-5 * scale, rtol=0, err_msg=k)
