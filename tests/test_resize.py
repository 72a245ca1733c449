"""The bilinear resize of segmentation heads (`zoo.layers.resize`): torch's `F.interpolate(mode="bilinear",
align_corners=False)` in float32, one composite in the jaxpr (no MACs) in the form TFLite's converter lowers to one
RESIZE_BILINEAR op, and a linear derivative."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.counting import count_jaxpr_macs
from zoo.layers.resize import COMPOSITE_NAME, resize_bilinear

from reference import torch

# (input H, W) -> (output H, W): upsampling by non-integer factors, downsampling, a 1x1 map, one axis unchanged
SIZES = [((13, 17), (97, 130)), ((33, 20), (7, 9)), ((1, 1), (5, 6)), ((8, 11), (8, 29))]


def _image(hw, seed=0):
    return np.random.default_rng(seed).standard_normal((2, *hw, 3)).astype(np.float32)


@pytest.mark.parity
@pytest.mark.parametrize("hw_in,hw_out", SIZES, ids=[f"{a}-{b}" for a, b in SIZES])
def test_matches_torch_interpolate(hw_in, hw_out):
    x = _image(hw_in)
    expected = torch.nn.functional.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=hw_out,
                                               mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(jax.jit(resize_bilinear, static_argnums=1)(x, hw_out))
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


def test_one_composite_of_the_image_alone_no_macs_and_a_linear_derivative():
    x = _image((13, 17))
    jaxpr = jax.make_jaxpr(lambda x: resize_bilinear(x, (40, 51)))(x).jaxpr
    composites = [e for e in _eqns(jaxpr) if e.primitive.name == "composite"]
    assert [e.params["name"] for e in composites] == [COMPOSITE_NAME]
    assert len(composites[0].invars) == 1  # a captured constant operand would keep the converter from lowering it
    assert count_jaxpr_macs(jaxpr) == 0
    # what TFLite's converter matches to lower it to RESIZE_BILINEAR (half-pixel centers): the name, the output size
    # as a dense integer attribute, align_corners false, NHWC (TF 2.21, checked by converting it once)
    text = jax.jit(lambda x: resize_bilinear(x, (40, 51))).lower(x).as_text()
    assert re.search(rf'stablehlo.composite "{COMPOSITE_NAME}" %\w+ {{composite_attributes = {{align_corners = false, '
                     r'is_nchw_op = false, size = dense<\[40, 51\]> : tensor<2xi64>}', text), text

    # linear: <resize(x), y> == <x, grad_x <resize(x), y>>, the adjoint that training backpropagates
    @jax.jit
    def adjoint_pair(x, y):
        grad = jax.grad(lambda x: jnp.vdot(resize_bilinear(x, (40, 51)), y))(x)
        return jnp.vdot(resize_bilinear(x, (40, 51)), y), jnp.vdot(x, grad)

    y = np.random.default_rng(1).standard_normal((2, 40, 51, 3)).astype(np.float32)
    forward, backward = adjoint_pair(x, y)
    assert float(forward) == pytest.approx(float(backward), rel=1e-5)
    assert resize_bilinear(x, (13, 17)) is x
    with pytest.raises(ValueError, match="NHWC"):
        resize_bilinear(x[0], (4, 4))


def _eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for v in e.params.values():
            sub = getattr(v, "jaxpr", v)
            if isinstance(sub, jax.extend.core.Jaxpr):
                yield from _eqns(sub)
