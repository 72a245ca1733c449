"""SHViT: parameter counts of the deploy form against timm's BatchNorm fusion (the generic tests compare the training
form only), and converted timm weights with every attention GroupNorm's scale and shift random against timm on a
non-square input, for the training and the deploy form.

`tests/test_parity.py` converts every variant too, but with timm's GroupNorms at their init (scale 1, shift 0: a
scale/shift mix-up would not show there) and at square inputs only (where a height/width mix-up in the attention's
reshapes would not show).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy
from zoo.counting import count_params
from zoo.layers.conv import depthwise_impl
from zoo.models.shvit import VARIANTS

from reference import converted_timm_twin, perturb_batchnorm, random_images, scale_classifier_to_trained_spread

# timm 1.0.31: parameters, and after its BatchNorm fusion (`SHViT.fuse`), as ../shared/reference/timm_counts.csv
# lists them
TIMM_PARAMS = {
    "shvit_s1": (6_330_808, 6_308_660),
    "shvit_s2": (11_483_072, 11_453_508),
    "shvit_s3": (14_245_273, 14_210_010),
    "shvit_s4": (16_588_484, 16_546_248),
}
HW = (96, 128)  # maps 6x8, 3x4, 2x2: attention over non-square maps


def test_registered_variants_are_timms():
    assert set(VARIANTS) == set(TIMM_PARAMS) == set(zoo.list_models("shvit_*"))


@pytest.mark.parametrize("name", list(TIMM_PARAMS))
def test_deploy_param_counts_match_timms_fusion(name):
    """The training form's count is `test_models.py`'s; the deploy module's own parameters here (they do not depend
    on the input size: module doc of zoo.models.shvit)."""
    module = zoo.create_model(name, deploy=True)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
    assert count_params(params) == TIMM_PARAMS[name][1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(zoo model, images, timm logits, timm stage maps NHWC) for shvit_s1 with every BatchNorm perturbed and every
    GroupNorm's scale and shift random, through torch.save -> zoo.load."""
    import torch

    from reference import twin_model

    twin = twin_model("timm:shvit_s1")
    perturb_batchnorm(twin)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norms = [m for m in twin.modules() if isinstance(m, torch.nn.GroupNorm)]
        assert len(norms) == 9  # one per attention block: stages 1 and 2, depths 4 and 5
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    x = random_images(2, HW)
    scale_classifier_to_trained_spread(twin, torch.from_numpy(x.transpose(0, 3, 1, 2)))
    model, logits, stages = converted_timm_twin(twin, "shvit_s1", x, tmp_path_factory.mktemp("shvit"))
    return model, x, logits, stages


def _logits_and_stages(module, variables, x):
    """Logits and the outputs of stages 0 and 1 from one jitted forward (native depthwise: compiles faster than the
    CPU default's shifted slices, the same numbers)."""
    wanted = ("stages_0", "stages_1")

    def run(v, x):
        logits, state = module.apply(v, x, capture_intermediates=lambda m, method: method == "__call__" and
                                     m.name in wanted, mutable=["intermediates"])
        return logits, [state["intermediates"][n]["__call__"][0] for n in wanted]

    with depthwise_impl("native"):
        logits, stages = jax.jit(run)(variables, x)
    return np.asarray(logits), [np.asarray(s) for s in stages]


@pytest.mark.parity
def test_converted_weights_with_group_norm_affine_match_timm_on_non_square_maps(converted):
    model, x, expected, stages = converted
    assert 1.0 < np.abs(expected).max() < 100  # a trained model's logit scale, where 1e-4 tests the conversion
    pre_norm = model.variables["params"]["stages_1"]["blocks_0"]["mixer"]["pre_norm"]
    assert pre_norm["scale"].shape == (48,) and np.abs(np.asarray(pre_norm["bias"])).max() > 0.1
    logits, ours = _logits_and_stages(model.module, model.variables, x)
    error = np.abs(logits - expected).max()
    print(f"shvit_s1 {HW}: max|zoo - timm| logits {error:.2e}")
    assert error <= 1e-4
    for i, theirs in enumerate(stages[:2]):
        assert ours[i].shape == theirs.shape
        assert np.abs(ours[i] - theirs).max() <= 1e-5 * max(1.0, np.abs(theirs).max()), i


@pytest.mark.parity
def test_deploy_form_matches_timm(converted):
    """`compress.deploy` (every conv+BN one conv, the head's BatchNorm folded into its Linear; the GroupNorms stay)
    against timm on the same input."""
    model, x, expected, _ = converted
    fast = deploy(model)
    assert fast.module.deploy and not jax.tree_util.tree_leaves(fast.variables.get("batch_stats", {}))
    params = fast.variables["params"]
    mixer = params["stages_1"]["blocks_0"]["mixer"]
    assert set(mixer) == {"pre_norm", "qkv", "proj"} and set(mixer["qkv"]["linear"]) == {"kernel", "bias"}
    assert set(params["head"]) == {"fc"} and params["head"]["fc"]["kernel"].shape == (320, 1000)
    assert count_params(params) == TIMM_PARAMS["shvit_s1"][1]
    logits, _ = _logits_and_stages(fast.module, fast.variables, x)
    error = np.abs(logits - expected).max()
    print(f"shvit_s1 deploy form {HW}: max|zoo - timm| logits {error:.2e}")
    assert error <= 1e-4
