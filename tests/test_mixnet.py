"""The mixed conv (MixNet's MDConv and grouped pointwise conv): channel groups, parameter names, errors."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.layers.conv import Conv2d
from zoo.layers.mixed_conv import MixedConv2d, MixedKernels, mixing, split_channels


def test_split_channels_gives_the_remainder_to_the_first_group():
    assert split_channels(10, 3) == [4, 3, 3]
    assert split_channels(240, 4) == [60, 60, 60, 60]


def test_depthwise_groups_are_named_as_timm_and_compute_their_own_channels():
    conv = partial(Conv2d, padding="symmetric")
    layer = MixedConv2d(10, (3, 5, 7), conv, depthwise=True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 9, 9, 10)), jnp.float32)
    variables = layer.init(jax.random.key(0), x)
    shapes = {k: v["kernel"].shape for k, v in variables["params"].items()}
    assert shapes == {"0": (3, 3, 1, 4), "1": (5, 5, 1, 3), "2": (7, 7, 1, 3)}  # timm: conv_dw.0/1/2.weight
    y = layer.apply(variables, x)
    for i, (lo, hi, k) in enumerate([(0, 4, 3), (4, 7, 5), (7, 10, 7)]):
        part = Conv2d(hi - lo, k, groups=hi - lo).apply({"params": variables["params"][str(i)]}, x[..., lo:hi])
        np.testing.assert_allclose(y[..., lo:hi], part, atol=1e-6)


def test_mixing_builds_mixed_convs_only_for_mixed_kernels():
    make = mixing(partial(Conv2d, padding="symmetric"))
    x = jnp.zeros((1, 8, 8, 6))
    pw = make(8, MixedKernels((1, 1)))
    assert {k: v["kernel"].shape for k, v in pw.init(jax.random.key(0), x)["params"].items()} == {
        "0": (1, 1, 3, 4), "1": (1, 1, 3, 4)}
    assert isinstance(make(8, 3), Conv2d)
    with pytest.raises(ValueError, match="groups=2"):
        make(8, MixedKernels((3, 5)), groups=2)
    with pytest.raises(ValueError, match="two or more"):
        MixedKernels((3,))
