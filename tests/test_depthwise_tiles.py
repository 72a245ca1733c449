"""Depthwise kernels of more taps than XNNPACK runs fast are exported as sums of smaller depthwise convolutions; the
three formulations (native, shifted slices, tiled) compute the same convolution."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from zoo.layers.blocks import ConvNormAct
from zoo.layers.conv import XNNPACK_MAX_DEPTHWISE_TAPS, Conv2d, depthwise_impl, depthwise_tiles
from zoo.layers.norm import batch_norm


@pytest.mark.parametrize("kh,kw", [(5, 5), (6, 6), (7, 7), (9, 9), (11, 11), (7, 3), (1, 31), (13, 2)])
def test_tiles_cover_every_tap_once_within_the_limit(kh, kw):
    tiles = depthwise_tiles(kh, kw)
    covered = np.zeros((kh, kw), int)
    for r0, r1, c0, c1 in tiles:
        assert (r1 - r0) * (c1 - c0) <= XNNPACK_MAX_DEPTHWISE_TAPS
        covered[r0:r1, c0:c1] += 1
    assert (covered == 1).all()
    if kh * kw <= XNNPACK_MAX_DEPTHWISE_TAPS:
        assert tiles == [(0, kh, 0, kw)]  # small kernels stay one op


def test_fewest_tiles_for_the_zoos_large_kernels():
    assert len(depthwise_tiles(7, 7)) == 3 and len(depthwise_tiles(9, 9)) == 4 and len(depthwise_tiles(11, 11)) == 6


@pytest.mark.parametrize("kernel,stride,dilation,padding,bias", [
    (7, 1, 1, "symmetric", True), (7, 2, 1, "symmetric", False), (9, 2, 1, "same", True), (11, 1, 1, "same", False),
    (7, 1, 2, "symmetric", True), (6, 2, 1, "same", True), (3, 1, 1, "symmetric", True), (3, 2, 1, "same", False),
    (5, 2, 1, "symmetric", True)])
def test_tiled_and_shifted_formulations_compute_the_native_convolution(kernel, stride, dilation, padding, bias):
    """Also what lets other tests run models under whichever formulation compiles fastest."""
    conv = Conv2d(12, kernel, stride=stride, dilation=dilation, groups=12, padding=padding, use_bias=bias)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 17, 19, 12))
    variables = conv.init(jax.random.PRNGKey(1), x)
    if bias:
        variables = {"params": {**variables["params"], "bias": np.linspace(-1, 1, 12, dtype=np.float32)}}
    with depthwise_impl("native"):
        want = conv.apply(variables, x)
    with depthwise_impl("tiled"):
        got = conv.apply(variables, x)
        primitives = [e.primitive.name for e in jax.make_jaxpr(lambda v: conv.apply(v, x))(variables).jaxpr.eqns]
    with depthwise_impl("shifted"):
        shifted = conv.apply(variables, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(shifted), np.asarray(want), atol=2e-5, rtol=1e-5)
    assert primitives.count("conv_general_dilated") == len(depthwise_tiles(kernel, kernel))


class LargeKernelBlock(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = batch_norm()
        x = ConvNormAct(16, Conv2d, norm, 1, name="pw")(x, train)
        x = ConvNormAct(16, Conv2d, norm, 7, groups=16, name="dw")(x, train)
        return x.mean((1, 2))


def test_export_runs_a_7x7_depthwise_conv_as_three_with_batchnorm_folded():
    from export import to_tflite

    module = LargeKernelBlock()
    x = np.random.default_rng(0).standard_normal((4, 24, 24, 3)).astype(np.float32)
    variables = module.init(jax.random.PRNGKey(0), x[:1])
    res = to_tflite(module, variables, input_hw=(24, 24), verify_data=x, progress=False)  # verified against JAX
    ops = res.ops.ops
    assert ops["DEPTHWISE_CONV_2D"] == 3 and ops["ADD"] == 2, ops  # the bias fused into the first block's conv
    assert ops.get("MUL") == 1, ops  # the mean's 1/N only: BatchNorm folded into the convs (exported before them)
    assert res.delegate.partitions == 1
