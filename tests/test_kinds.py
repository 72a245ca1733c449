"""The layer-kinds table: every parameter-holding layer of every registered family is in it, and a pass that meets a
layer of unknown kind fails naming the module instead of skipping it."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress import qat
from compress.fold_bn import fold_bn
from export.tflite import int8_float_pattern
from zoo.abstract import abstract_variables
from zoo.layers import kinds
from zoo.layers.conv import Conv2d
from zoo.registry import get_entry

ONE_PER_FAMILY = list({get_entry(n).cfg.family: n for n in zoo.list_models(task="classification")}.values())


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_every_layer_of_every_family_has_a_kind(name):
    module = zoo.create_model(name)
    x = jax.ShapeDtypeStruct((1, *get_entry(name).cfg.input_size, 3), jnp.float32)
    variables = abstract_variables(module, x.shape)
    kinds.check_model(module, variables, x, what="test")


class Scaled(nn.Module):
    """A layer the table does not know: it holds a parameter of its own."""

    @nn.compact
    def __call__(self, x):
        return x * self.param("gain", nn.initializers.ones, (x.shape[-1],))


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Conv2d(8, 3, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return Scaled(name="odd")(x).mean((1, 2))


def _net():
    module = Net()
    return module, module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_passes_name_a_layer_of_unknown_kind():
    module, variables = _net()
    with pytest.raises(kinds.UnknownLayerKindError, match=r"'odd' \(.*Scaled\) holds parameters \['gain'\]"):
        fold_bn(module, variables, input_shape=(1, 16, 16, 3))
    with pytest.raises(kinds.UnknownLayerKindError, match="quantization-aware training: module 'odd'"):
        qat.quantize_aware(module, variables)


def test_a_registered_kind_is_what_passes_see(monkeypatch):
    monkeypatch.setitem(kinds._TABLE, Scaled, kinds.LayerKind("norm"))
    module, variables = _net()
    folded, fv = fold_bn(module, variables, input_shape=(1, 16, 16, 3))
    assert "bn" not in fv["params"] and "gain" in fv["params"]["odd"]
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(folded.apply(fv, x), module.apply(variables, x), atol=1e-5)


def test_int8_float_layers_come_from_the_table():
    vit = zoo.create_model("mobilevit_xxs")
    pattern = int8_float_pattern(vit, None, (1, 64, 64, 3))
    assert pattern and "transformer_0/attn" in pattern and "norm1" in pattern
    assert int8_float_pattern(zoo.create_model("mobilenetv2_100"), None, (1, 64, 64, 3)) is None


class TaggedConv(Conv2d):
    """An injected conv factory (as a quantized or sparse conv would be): a Conv2d subclass, so its kind is Conv2d's."""


class TaggedDense(nn.Dense):
    pass


class TaggedNorm(nn.BatchNorm):
    pass


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_injected_layer_factories_reach_every_layer(name):
    """`conv`, `norm` and `dense` given to a family's constructor build every conv, BatchNorm and Dense of the model
    (parameters unchanged), and passes see them as the kinds they subclass."""
    base = zoo.create_model(name)
    norm = functools.partial(TaggedNorm, momentum=0.9, epsilon=getattr(base, "bn_eps", 1e-5))
    module = zoo.create_model(name, conv=TaggedConv, norm=norm, dense=TaggedDense)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    seen = []

    def record(next_fun, args, kwargs, ctx):
        if ctx.method_name == "__call__" and isinstance(ctx.module, (Conv2d, nn.Dense, nn.BatchNorm)):
            seen.append(ctx.module)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
    assert seen and all(isinstance(m, (TaggedConv, TaggedDense, TaggedNorm)) for m in seen), \
        sorted({"/".join(m.path) for m in seen if not isinstance(m, (TaggedConv, TaggedDense, TaggedNorm))})[:5]
    base_vars = abstract_variables(base, x.shape)
    has_bn = "batch_stats" in base_vars  # a family without BatchNorm (ConvNeXt: LayerNorm only) builds none
    assert {type(m) for m in seen} == {TaggedConv, TaggedDense} | ({TaggedNorm} if has_bn else set())
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(base_vars)
    kinds.check_model(module, variables, x, what="test")
