"""ShuffleNetV2's channel shuffle: the interleaving torchvision's `channel_shuffle` defines, traced to reshapes and a
transpose only (the ops TFLite converts as RESHAPE and TRANSPOSE; no gather)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from zoo.models.shufflenetv2 import channel_shuffle


@pytest.mark.parametrize("groups", [2, 3])
def test_channel_shuffle_interleaves_groups(groups):
    c = 4 * groups
    x = np.random.default_rng(0).standard_normal((2, 3, 5, c)).astype(np.float32)
    got = np.asarray(channel_shuffle(x, groups))
    per = c // groups
    for g in range(groups):
        for k in range(per):
            np.testing.assert_array_equal(got[..., k * groups + g], x[..., g * per + k])


def test_channel_shuffle_traces_to_reshape_and_transpose():
    jaxpr = jax.make_jaxpr(lambda x: channel_shuffle(x, 2))(np.zeros((1, 4, 4, 8), np.float32))
    assert {e.primitive.name for e in jaxpr.jaxpr.eqns} == {"reshape", "transpose"}


def test_channel_shuffle_rejects_uneven_groups():
    with pytest.raises(ValueError, match="do not split into 2 groups"):
        channel_shuffle(np.zeros((1, 2, 2, 5), np.float32), 2)
