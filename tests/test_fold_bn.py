"""BatchNorm folding: the folded model computes what the original computes, for every family, and nothing else."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress.fold_bn import BatchNormFolded, FoldError, checked, find_conv_bn_pairs, fold_bn
from reference import random_variables
from zoo.layers.conv import Conv2d, depthwise_impl


def with_bn_statistics(variables, seed: int = 1):
    """Non-trivial BatchNorm parameters and running statistics (random fills leave scale 1, mean 0, var 1)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        coll, name = str(path[0].key), str(path[-1].key)
        if coll == "batch_stats":
            return (rng.normal(0, 0.3, leaf.shape) if name == "mean" else rng.uniform(0.3, 2.0, leaf.shape)
                    ).astype(leaf.dtype)
        if name == "scale":
            return rng.uniform(0.5, 1.5, leaf.shape).astype(leaf.dtype)
        if name == "bias":
            return rng.normal(0, 0.1, leaf.shape).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fill, variables)


@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "tf_efficientnet_lite0", "mobilevit_xxs"])
def test_folded_zoo_model_matches_original(name):
    module = zoo.create_model(name, num_classes=10)
    variables = with_bn_statistics(random_variables(module, (1, 64, 64, 3)))
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with depthwise_impl("native"):  # fewer ops: compiles faster, and the fold does not depend on it
        folded, fvars = checked(fold_bn, x, atol=1e-4, rtol=0.0)(module, variables)
    assert isinstance(folded, BatchNormFolded) and len(folded.folds) > 20
    assert "batch_stats" not in fvars  # every BatchNorm of these families follows a conv
    flat = jax.tree_util.tree_flatten_with_path(fvars["params"])[0]
    names = {"/".join(str(k.key) for k in p) for p, _ in flat}
    assert not any(f"{bn}/scale" in names for _, bn, _ in folded.folds)
    assert all(f"{conv}/bias" in names for conv, _, _ in folded.folds)


class Tiny(nn.Module):
    """conv -> BN -> relu, a BN not fed by a conv, a depthwise conv without BN, a classifier."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv2d(8, 3, name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
        x = nn.BatchNorm(use_running_average=not train, name="bn_after_act")(x)
        x = Conv2d(8, 3, groups=8, name="dw")(x)
        return nn.Dense(3, name="fc")(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def tiny():
    module = Tiny()
    variables = with_bn_statistics(random_variables(module, (1, 16, 16, 3)))
    x = np.random.default_rng(0).standard_normal((4, 16, 16, 3)).astype(np.float32)
    return module, variables, x


def test_only_conv_fed_batchnorms_fold_and_their_statistics_stay_frozen(tiny):
    module, variables, x = tiny
    assert find_conv_bn_pairs(module, variables, x.shape) == (("conv", "bn", 1e-5),)
    folded, fvars = checked(fold_bn, x)(module, variables)
    assert set(fvars["batch_stats"]) == {"bn_after_act"}  # a BN after an activation cannot fold; it stays
    assert set(fvars["params"]["conv"]) == {"kernel", "bias"} and "bn" not in fvars["params"]
    # training updates the statistics of the unfolded BN only; the folded one lives on, frozen, in the conv
    _, updates = folded.apply(fvars, x, train=True, mutable=["batch_stats"])
    assert set(updates["batch_stats"]) == {"bn_after_act"}


def test_checked_rejects_a_pass_that_changes_outputs(tiny):
    module, variables, x = tiny

    def broken(m, v):
        fm, fv = fold_bn(m, v)
        fv["params"]["conv"]["bias"] = fv["params"]["conv"]["bias"] + 0.1
        return fm, fv

    with pytest.raises(FoldError, match="changed the outputs"):
        checked(broken, x)(module, variables)


def test_bad_inputs_raise_before_work(tiny):
    module, variables, x = tiny
    folded, fvars = fold_bn(module, variables)
    with pytest.raises(FoldError, match="already BatchNorm-folded"):
        fold_bn(folded, fvars)
    with pytest.raises(TypeError, match="variables"):
        fold_bn(module, variables["params"])
    with pytest.raises(FoldError, match="batch_stats"):
        fold_bn(module, {"params": variables["params"]})


def test_model_call_retraces_under_another_depthwise_formulation(monkeypatch):
    """`zoo.Model` caches its jitted apply; the formulation is part of its key, so no stale trace is reused."""
    import zoo
    from zoo.layers import conv

    model = zoo.load("mobilenetv3_small_050", pretrained=False)
    x = np.zeros((1, 64, 64, 3), np.float32)
    with conv.depthwise_impl("native"):
        native = np.asarray(model(x))
    calls = []
    shifted = conv._depthwise_shifted
    monkeypatch.setattr(conv, "_depthwise_shifted", lambda *a: calls.append(1) or shifted(*a))
    with conv.depthwise_impl("shifted"):
        np.testing.assert_allclose(np.asarray(model(x)), native, atol=1e-5)
    assert calls, "the second call reused the native trace"
