"""The FCN head (Long et al., "Fully Convolutional Networks for Semantic Segmentation", arXiv:1411.4038), in
torchvision's form: the auxiliary classifier that DeepLabV3 trains on an intermediate map (arXiv:1706.05587).

A 3x3 conv-BN-ReLU to a quarter of the input width (`cbr`), dropout in training, a 1x1 `classifier`.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn

from zoo.layers.blocks import ConvNormAct
from zoo.layers.factories import layer_factories
from zoo.layers.norm import BN_EPS_TORCH


class FCNHead(nn.Module):
    """`{key: map, ...}` -> class logits at the map's resolution."""

    num_classes: int
    key: str  # the map's key in the backbone's dict
    drop_rate: float = 0.1
    bn_eps: float = BN_EPS_TORCH
    dtype: Any = None
    conv: Any = None  # injected factories (None: `Conv2d`, BatchNorm of `bn_eps`), as the backbone's
    norm: Any = None

    @nn.compact
    def __call__(self, feats: Mapping[str, Any], train: bool = False):
        conv, norm, _ = layer_factories(self.conv, self.norm, None, bn_eps=self.bn_eps, dtype=self.dtype)
        x = feats[self.key]
        x = ConvNormAct(x.shape[-1] // 4, conv, norm, kernel=3, name="cbr")(x, train)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        return conv(self.num_classes, 1, use_bias=True, name="classifier")(x)
