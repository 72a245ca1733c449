"""StarNet: the deploy form (every conv's BatchNorm folded, the last BatchNorm, after a residual sum, an affine map)
computes the training form, and its parameter count. Counts against timm and parity: tests/test_models.py,
tests/test_parity.py."""

from __future__ import annotations

import jax
import numpy as np

import zoo
from compress.deploy import deploy, deploy_param_count
from zoo.counting import count_params
from zoo.layers.reparam import StandaloneBatchNorm

from reference import jit_logits, random_images, random_variables
from test_mobileone import _perturb_norms

SHAPE = (1, 64, 64, 3)


def test_standalone_batchnorm_deploy_form_is_its_affine_map():
    layer = StandaloneBatchNorm()
    x = np.random.default_rng(0).standard_normal((2, 5, 5, 6)).astype(np.float32)
    variables = _perturb_norms(random_variables(layer, (1, 5, 5, 6)))
    fused = StandaloneBatchNorm.reparameterize(jax.device_get(variables))
    assert set(fused) == {"params"} and set(fused["params"]) == {"scale", "bias"}
    np.testing.assert_allclose(np.asarray(layer.clone(deploy=True).apply(fused, x)),
                               np.asarray(layer.apply(variables, x)), atol=1e-5, rtol=0)


def test_deploy_form_computes_the_training_form():
    module = zoo.create_model("starnet_s1")
    variables = _perturb_norms(random_variables(module, SHAPE))
    fast_module, fast = deploy((module, variables), input_shape=SHAPE)
    assert not jax.tree_util.tree_leaves(fast.get("batch_stats", {}))
    assert set(fast["params"]["norm"]) == {"scale", "bias"}
    # timm's starnet_s1 has 2,869,168 parameters (tests/test_models.py); every conv has a bias already, so each folded
    # BatchNorm's scale and shift go; the last BatchNorm's stay as the affine map's scale and bias
    assert count_params(fast["params"]) == deploy_param_count(module, SHAPE) == 2_862_432
    x = random_images(2, SHAPE[1:3])
    expected = jit_logits(module, variables, x)
    error = np.abs(jit_logits(fast_module, fast, x) - expected).max()
    assert error <= 1e-5 * max(1.0, np.abs(expected).max()), error
