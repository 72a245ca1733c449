"""RepViT: parameter counts of both forms against timm (the deploy form against timm's `fuse()`, which the generic
tests do not compare), the token mixer's and the head's re-parameterization against their training forms, and the
tags. Training-form parity, MACs, feature maps and whole-network deploy equivalence are the generic tests'."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy_param_count
from zoo.counting import count_params
from zoo.layers.repvgg_dw import RepVggDw
from zoo.models.backbone import PRE_LOGITS
from zoo.models.repvit import AveragedDistilledHead
from zoo.registry import UnknownModelError

from reference import random_variables

# timm 1.0.31: parameters of the model, and after its `fuse()` (the same as `timm.utils.model.reparameterize_model`;
# ../shared/reference/timm_counts.csv lists M0.9 and M1.0)
TIMM_PARAMS = {
    "repvit_m0_9": (5_489_328, 5_067_056),
    "repvit_m1_0": (7_302_796, 6_810_312),
    "repvit_m1_1": (8_802_912, 8_244_312),
    "repvit_m1_5": (14_644_432, 14_049_992),
    "repvit_m2_3": (23_688_792, 22_926_792),
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


def _perturbed(variables, seed: int = 0):
    """Every BatchNorm's scale, shift and statistics off their defaults, and every bias non-zero."""
    rng = np.random.default_rng(seed)

    def move(path, leaf):
        key = str(getattr(path[-1], "key", path[-1]))
        if key in ("scale", "var"):
            return rng.uniform(0.5, 1.5, np.shape(leaf)).astype(np.float32)
        if key in ("bias", "mean"):
            return (rng.standard_normal(np.shape(leaf)) * 0.2).astype(np.float32)
        return leaf

    return jax.tree_util.tree_map_with_path(move, variables)


def test_token_mixer_reparameterize_equals_training_form():
    layer = RepVggDw(3)
    x = np.random.default_rng(1).standard_normal((2, 9, 9, 8)).astype(np.float32)
    variables = _perturbed(random_variables(layer, (1, 9, 9, 8)))
    expected = np.asarray(layer.apply(variables, x))
    fused = RepVggDw.reparameterize(jax.device_get(variables))
    assert set(fused) == {"params"} and set(fused["params"]) == {"reparam_conv"}
    got = np.asarray(layer.clone(deploy=True).apply(fused, x))
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=0)


def test_head_deploys_to_one_linear_computing_the_average():
    head = AveragedDistilledHead(5)
    feats = {PRE_LOGITS: np.random.default_rng(2).standard_normal((3, 16)).astype(np.float32)}
    variables = _perturbed(jax.device_get(head.init(jax.random.key(0), feats)))
    expected = np.asarray(head.apply(variables, feats))
    fused = AveragedDistilledHead.reparameterize(variables)
    assert set(fused["params"]) == {"fc"} and fused["params"]["fc"]["kernel"].shape == (16, 5)
    got = np.asarray(head.clone(deploy=True).apply(fused, feats))
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()), rtol=0)


@pytest.mark.reference
def test_every_timm_tag_is_registered_and_a_wrong_tag_is_named():
    import timm

    ours = set(zoo.list_models("repvit_m*", pretrained=True))
    theirs = {n for n in timm.list_models("repvit_m*", pretrained=True) if n.split(".")[0] in TIMM_PARAMS}
    assert ours == theirs
    with pytest.raises(UnknownModelError, match="no pretrained tag 'dist_in1k'"):
        zoo.load("repvit_m0_9.dist_in1k", progress=False)
