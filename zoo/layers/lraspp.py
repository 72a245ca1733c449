"""Lite R-ASPP, MobileNetV3's segmentation head (Howard et al., "Searching for MobileNetV3", arXiv:1905.02244
Sec. 6.4), in torchvision's form.

The last (stride-16) map goes through a 1x1 conv-BN-ReLU, gated per channel by a sigmoid of a 1x1 conv of its global
mean (the paper's pooling branch: a global pool in place of its large-stride pool, as torchvision and TF's release
build it); the result is upsampled to the stride-8 map, and a 1x1 classifier of each is summed. The paper's
Figure 10 also projects the high branch once more; torchvision classifies it directly and the parameter names here
are torchvision's (`cbr`, `scale`, `low_classifier`, `high_classifier`).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers.activations import get_act
from zoo.layers.blocks import ConvNormAct
from zoo.layers.factories import layer_factories
from zoo.layers.norm import BN_EPS_TORCH
from zoo.layers.resize import resize_bilinear


class LRASPPHead(nn.Module):
    """`{low: stride-8 map, high: last map, ...}` -> class logits at the low map's resolution."""

    num_classes: int
    low: str  # key of the low-level (stride-8) map in the backbone's dict
    high: str  # key of the high-level (last) map
    inter_chs: int = 128
    bn_eps: float = BN_EPS_TORCH
    dtype: Any = None
    # injected layer factories (None: `Conv2d`, BatchNorm of `bn_eps`), as the backbone's
    conv: Any = None
    norm: Any = None

    @nn.compact
    def __call__(self, feats: Mapping[str, Any], train: bool = False):
        conv, norm, _ = layer_factories(self.conv, self.norm, None, bn_eps=self.bn_eps, dtype=self.dtype)
        low, high = feats[self.low], feats[self.high]
        x = ConvNormAct(self.inter_chs, conv, norm, act="relu", name="cbr")(high, train)
        gate = conv(self.inter_chs, 1, name="scale")(jnp.mean(high, axis=(1, 2), keepdims=True))
        x = resize_bilinear(x * get_act("sigmoid")(gate), low.shape[1:3])
        return (conv(self.num_classes, 1, use_bias=True, name="low_classifier")(low)
                + conv(self.num_classes, 1, use_bias=True, name="high_classifier")(x))
