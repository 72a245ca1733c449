"""A small 4-part CNN whose `body_1` carries an activation channel planted 1000x wider than its neighbours: the same
model in float, a hard one for per-tensor int8 (used by the sensitivity and mixed-int8 tests)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from zoo.layers.conv import Conv2d

HW = (32, 32)
PLANT = 1000.0


class _Part(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        x = nn.relu(Conv2d(2 * self.features, 1, use_bias=True, name="expand")(x))
        return nn.relu(Conv2d(self.features, 3, use_bias=True, name="mix")(x))


class _Net(nn.Module):
    """Four parts, shallow enough that random weights quantize well (deep random networks amplify int8 noise)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(Conv2d(16, 3, stride=2, use_bias=True, name="stem")(x))
        x = _Part(16, name="body_0")(x)
        x = _Part(16, name="body_1")(x)
        return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))


def planted_nets():
    """(module, clean variables, planted variables, calibration, verify inputs). The planted copy computes the same:
    ReLU(1000 y) / 1000 = ReLU(y), so scaling body_1's expand channel 0 up and the mix weights that read it down
    changes nothing in float, while one int8 scale for that tensor can no longer resolve its other channels."""
    module = _Net()
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((12, *HW, 3)).astype(np.float32)
    x = rng.standard_normal((16, *HW, 3)).astype(np.float32)
    clean = jax.tree.map(np.array, module.init(jax.random.PRNGKey(0), x[:1]))
    clean["params"]["body_1"]["expand"]["bias"][0] = 0.5  # the planted channel is active on most inputs
    planted = jax.tree.map(np.copy, clean)
    body = planted["params"]["body_1"]
    body["expand"]["kernel"][..., 0] *= PLANT
    body["expand"]["bias"][0] *= PLANT
    body["mix"]["kernel"][:, :, 0, :] /= PLANT
    a, b = (np.asarray(module.apply(v, x)) for v in (clean, planted))
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max()  # the same model in float
    return module, clean, planted, calib, x
