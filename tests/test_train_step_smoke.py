"""Tier 2: per family, a reduced-size jitted forward and backward in training mode; numerics of the depthwise
formulations; bf16 compute; input checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import zoo
from zoo.layers.conv import Conv2d, depthwise_impl

from architectures import families, smallest
from reference import random_variables

FAMILIES = families()


# The smallest member of every registered family (the whole registry is covered by tier 1 shapes and tier 3 parity).
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forward_backward_updates_batch_stats(family):
    name = smallest(FAMILIES[family])
    # stochastic depth where the family has it (GhostNet, RepGhost and ShuffleNetV2 have none, as their twins)
    fields = type(zoo.create_model(name)).__dataclass_fields__
    module = zoo.create_model(name, num_classes=7, drop_rate=0.1,
                              **({"drop_path_rate": 0.1} if "drop_path_rate" in fields else {}))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 64, 3)), jnp.float32)
    y = jnp.arange(4) % 7
    variables = random_variables(module, x.shape)

    @jax.jit
    def loss_and_grads(params, batch_stats, rng):
        def loss_fn(p):
            logits, updates = module.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                           mutable=["batch_stats"], rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    # Native depthwise: its gradient compiles 2-8x faster than the shifted slices' and is the same function
    # (test_depthwise_formulations_agree); the shifted backward trains the fine-tuning recipes (test_train_recipe.py).
    # ConvNeXt normalizes with LayerNorm only: no statistics to update.
    with depthwise_impl("native"):
        (loss, updates), grads = loss_and_grads(variables["params"], variables.get("batch_stats", {}),
                                                jax.random.key(1))
    assert np.isfinite(float(loss))
    leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]  # numpy: an eager jnp op compiles per shape
    assert all(np.isfinite(g).all() for g in leaves)
    assert sum(np.abs(g).sum() > 0 for g in leaves) > 0.9 * len(leaves)  # gradient reaches the layers
    old = jax.tree_util.tree_leaves(variables.get("batch_stats", {}))
    new = jax.tree_util.tree_leaves(updates.get("batch_stats", {}))
    assert len(old) == len(new)
    if old:
        assert any(not np.allclose(a, b) for a, b in zip(old, new))
    # eval mode is deterministic and leaves the statistics alone: traced without a dropout key and with nothing
    # mutable, any dropout or drop-path still active, or a BatchNorm updating its statistics, raises (a trace: no
    # compile)
    out = jax.eval_shape(lambda v: module.apply(v, x, train=False), variables)
    assert out.shape == (4, 7)


@pytest.mark.parametrize("stride,kernel,padding,hw", [(1, 3, "symmetric", 9), (2, 3, "symmetric", 9),
                                                     (2, 5, "same", 10), (2, 3, "same", 7), (1, 5, "same", 8)])
def test_depthwise_formulations_agree(stride, kernel, padding, hw):
    conv = Conv2d(6, kernel, stride=stride, groups=6, padding=padding)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, hw, hw, 6)), jnp.float32)
    v = conv.init(jax.random.key(0), x)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(conv.apply(v, x).shape), jnp.float32)

    def value_and_grads(impl):  # the output and the gradients a training step takes through it
        def f(v, x):
            with depthwise_impl(impl):
                return conv.apply(v, x)
        out, vjp = jax.vjp(f, v, x)
        return out, vjp(g)

    native, shifted = value_and_grads("native"), value_and_grads("shifted")
    assert native[0].shape == shifted[0].shape
    for a, b in zip(jax.tree_util.tree_leaves(native), jax.tree_util.tree_leaves(shifted)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_same_padding_matches_tensorflow_rule():
    # TF SAME: output ceil(n / s); the extra pixel of padding goes after (right/bottom).
    from zoo.layers.conv import pad_amounts

    assert pad_amounts(224, 3, 2, 1, "same") == (0, 1)
    assert pad_amounts(225, 3, 2, 1, "same") == (1, 1)
    assert pad_amounts(112, 5, 2, 1, "same") == (1, 2)
    assert pad_amounts(224, 3, 2, 1, "symmetric") == (1, 1)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    module = zoo.create_model("mobilenetv3_small_050", dtype=jnp.bfloat16)
    x = jnp.ones((1, 64, 64, 3), jnp.float32)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), x))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(variables))
    out = jax.eval_shape(lambda v: module.apply(v, x), variables)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("bad,err,msg", [
    (np.zeros((64, 64, 3), np.float32), ValueError, "4-D NHWC"),
    (np.zeros((1, 3, 64, 64), np.float32), ValueError, "looks NCHW"),
    (np.zeros((1, 64, 64, 4), np.float32), ValueError, "in_chans=4"),
    (np.zeros((1, 64, 64, 3), np.uint8), TypeError, "preprocess"),
])
def test_bad_input_is_rejected_before_tracing(bad, err, msg):
    module = zoo.create_model("mobilenetv3_small_050")
    with pytest.raises(err, match=msg):
        jax.eval_shape(lambda: module.init(jax.random.key(0), bad))
