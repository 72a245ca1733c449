"""`compress.deploy`: re-parameterization through the layer-kinds table, then BatchNorm folding; verified by running
both forms, and the deploy parameter count from shapes alone equals the converted model's."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.deploy import deploy, deploy_checked, deploy_param_count, reparameterize
from compress.fold_bn import FoldError
from zoo.counting import count_params
from zoo.layers import kinds
from zoo.layers.conv import Conv2d

from reference import random_variables


class TwoBranch(nn.Module):
    """RepVGG-style block: 3x3 conv+BN plus 1x1 conv+BN plus identity BN in training, one 3x3 conv when deployed."""

    features: int
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.deploy:
            return nn.relu(Conv2d(self.features, 3, use_bias=True, name="fused")(x))
        bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)  # noqa: E731
        y = bn("bn3")(Conv2d(self.features, 3, name="conv3")(x)) + bn("bn1")(Conv2d(self.features, 1, name="conv1")(x))
        return nn.relu(y + bn("bn_id")(x))


def _fold(v, name, eps=1e-5):
    s = v["params"][name]["scale"] / np.sqrt(v["batch_stats"][name]["var"] + eps)
    return s, v["params"][name]["bias"] - v["batch_stats"][name]["mean"] * s


def _fuse_two_branch(module, v):
    c = module.features
    s3, b3 = _fold(v, "bn3")
    s1, b1 = _fold(v, "bn1")
    sid, bid = _fold(v, "bn_id")
    k = np.asarray(v["params"]["conv3"]["kernel"]) * s3
    k[1:2, 1:2] += np.asarray(v["params"]["conv1"]["kernel"]) * s1
    k[1, 1] += np.eye(c) * sid
    return {"params": {"fused": {"kernel": k, "bias": np.asarray(b3 + b1 + bid)}}}


kinds.register(TwoBranch, kinds.LayerKind("reparam", reparameterize=_fuse_two_branch))


class Net(nn.Module):
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.BatchNorm(use_running_average=not train, name="stem_bn")(Conv2d(8, 3, name="stem")(x))
        x = TwoBranch(8, deploy=self.deploy, name="block")(x)
        return nn.Dense(4, name="head")(x.mean((1, 2)))


class NoDeployField(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return TwoBranch(3, name="block")(x).mean((1, 2))


X = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)


def test_reparameterized_then_folded_equals_the_training_form():
    module = Net()
    variables = random_variables(module, (1, 16, 16, 3))
    fast_module, fast = deploy_checked((module, variables), X, atol=1e-5)
    assert not fast.get("batch_stats")  # every BatchNorm is gone
    assert set(fast["params"]["block"]) == {"fused"}
    assert count_params(fast["params"]) == deploy_param_count(module, (1, 16, 16, 3)) < count_params(variables["params"])


def test_a_reparameterizable_layer_needs_a_deploy_field():
    module = NoDeployField()
    with pytest.raises(FoldError, match="no `deploy` field"):
        reparameterize(module, random_variables(module, (1, 16, 16, 3)))


def test_zoo_models_deploy_by_folding_batchnorm():
    model = zoo.load("mobilenetv3_small_050", pretrained=False)
    fast = deploy_checked(model, X, atol=1e-4)
    assert count_params(fast.variables["params"]) == deploy_param_count(model.module, (1, 16, 16, 3))
    assert deploy(model).cfg == model.cfg
