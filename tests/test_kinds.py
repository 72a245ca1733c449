"""The layer-kinds table: every parameter-holding layer of every registered family is in it, and a pass that meets a
layer of unknown kind fails naming the module instead of skipping it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from compress import qat
from compress.fold_bn import fold_bn
from export.tflite import int8_float_pattern
from zoo.layers import kinds
from zoo.layers.conv import Conv2d
from zoo.registry import get_entry

ONE_PER_FAMILY = list({get_entry(n).cfg.family: n for n in zoo.list_models()}.values())


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_every_layer_of_every_family_has_a_kind(name):
    module = zoo.create_model(name)
    x = jax.ShapeDtypeStruct((1, *get_entry(name).cfg.input_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)
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
