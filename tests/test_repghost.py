"""RepGhostNet: parameter counts of both forms against timm, a RepGhost module's deploy form against its training
form, and the deploy form against timm's re-parameterized model.

`tests/test_parity.py` converts every variant's training form at 224x224 and `tests/test_contract.py` checks the
deploy form of the network against its training form; the parity test here adds timm's re-parameterized checkpoint
loaded with `deploy=True` and the zoo's fusion compared with timm's (64x64, the smallest variant).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy_param_count, reparameterize
from zoo.counting import count_params
from zoo.layers.conv import Conv2d, depthwise_impl
from zoo.layers.ghost import RepGhostModule
from zoo.layers.norm import batch_norm

from reference import random_images, random_variables

# timm 1.0.31: parameters of the model; after `timm.utils.model.reparameterize_model` (each cheap conv's BatchNorm
# branch fused into it); and after `compress.deploy`, which also folds every BatchNorm left (timm's re-parameterized
# count less one channel count per BatchNorm). The training-form counts are checked against timm by test_models, the
# others for repghostnet_050 by `test_deploy_form_matches_timm`.
TIMM_PARAMS = {  # name: (training form, re-parameterized, deployed)
    "repghostnet_050": (2_313_968, 2_306_528, 2_302_956),
    "repghostnet_058": (2_546_388, 2_537_736, 2_533_576),
    "repghostnet_080": (3_278_968, 3_267_112, 3_261_420),
    "repghostnet_100": (4_073_604, 4_058_772, 4_051_648),
    "repghostnet_111": (4_539_984, 4_523_568, 4_515_684),
    "repghostnet_130": (5_478_612, 5_459_316, 5_450_052),
    "repghostnet_150": (6_575_336, 6_553_064, 6_542_368),
    "repghostnet_200": (9_796_124, 9_766_460, 9_752_212),
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


@pytest.mark.parametrize("relu", [True, False])
def test_module_deploy_form_equals_training_form(relu):
    """Through `compress.deploy`'s re-parameterization: the cheap conv and its BatchNorm branch become one conv with a
    bias; the primary conv and its BatchNorm are left to BatchNorm folding."""
    module = RepGhostModule(12, Conv2d, batch_norm(), relu=relu)
    shape = (1, 9, 9, 8)
    variables = random_variables(module, shape)
    rng = np.random.default_rng(0)

    def perturb(path, a):  # BatchNorm scales, shifts and statistics off their defaults (1, 0, 0, 1)
        key = str(path[-1].key)
        if key in ("scale", "var"):
            return rng.uniform(0.5, 1.5, np.shape(a)).astype(np.float32)
        if key in ("bias", "mean"):
            return (rng.standard_normal(np.shape(a)) * 0.1).astype(np.float32)
        return a

    variables = jax.tree_util.tree_map_with_path(perturb, variables)
    x = rng.standard_normal((2, 9, 9, 8)).astype(np.float32)
    fast_module, fast = reparameterize(module, variables, input_shape=shape)
    assert fast_module.deploy
    assert set(fast["params"]["cheap_operation"]) == {"reparam_conv"}
    assert set(fast["batch_stats"]) == {"primary_conv"}
    expected = np.asarray(module.apply(variables, x))
    got = np.asarray(fast_module.apply(fast, x))
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=0)


# ------------------------------------------------------------------------------------------------------------ parity
@pytest.mark.parity
def test_deploy_form_matches_timm(tmp_path):
    """The zoo's fusion of timm's training-form checkpoint equal to timm's own re-parameterized weights, and those,
    loaded with zoo.load(deploy=True), giving timm's re-parameterized logits (the training form's logits:
    tests/test_parity.py); the count after `compress.deploy` equal to timm's re-parameterized model with every
    BatchNorm folded."""
    import torch
    from flax import traverse_util
    from timm.utils.model import reparameterize_model

    from reference import perturb_batchnorm, scale_classifier_to_trained_spread, twin_model

    name, res = "repghostnet_050", SHAPE[1]
    x = random_images(2, (res, res))
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
    twin = twin_model(f"timm:{name}")
    perturb_batchnorm(twin)
    scale_classifier_to_trained_spread(twin, x_nchw)
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
