"""Atrous Spatial Pyramid Pooling and the DeepLabV3 head (Chen et al., "Rethinking Atrous Convolution for Semantic
Image Segmentation", arXiv:1706.05587 Sec. 3.3), in torchvision's form.

ASPP runs parallel branches on one map - a 1x1 conv, 3x3 convs at several atrous rates, and image-level features
(global mean, 1x1 conv, broadcast back over the map) - each conv-BN-ReLU, concatenates them and projects with a 1x1
conv-BN-ReLU (then dropout in training). The head follows it with a 3x3 conv-BN-ReLU and a 1x1 classifier.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers.blocks import ConvNormAct
from zoo.layers.factories import layer_factories
from zoo.layers.norm import BN_EPS_TORCH


class ASPP(nn.Module):
    """NHWC map -> `out_chs` channels at the same resolution. Branches `convs_0` (1x1), `convs_1`.. (one per rate),
    `pool` (image-level features), then `project`."""

    rates: tuple[int, ...]
    conv: Any  # factories with their options bound (the head's)
    norm: Any
    out_chs: int = 256
    drop_rate: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = False):
        branches = [ConvNormAct(self.out_chs, self.conv, self.norm, name="convs_0")(x, train)]
        for i, rate in enumerate(self.rates):
            # padding = rate keeps the size (the conv factory's symmetric padding of a dilated 3x3)
            branches.append(ConvNormAct(self.out_chs, self.conv, self.norm, kernel=3, dilation=rate,
                                        name=f"convs_{i + 1}")(x, train))
        pooled = ConvNormAct(self.out_chs, self.conv, self.norm, name="pool")(
            jnp.mean(x, axis=(1, 2), keepdims=True), train)
        # upsampling a 1x1 map bilinearly repeats it: a broadcast, exactly
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], self.out_chs)))
        x = ConvNormAct(self.out_chs, self.conv, self.norm, name="project")(jnp.concatenate(branches, -1), train)
        return nn.Dropout(self.drop_rate)(x, deterministic=not train)


class DeepLabHead(nn.Module):
    """`{key: map, ...}` -> class logits at the map's resolution: ASPP (`aspp`), 3x3 conv-BN-ReLU (`cbr`), 1x1
    `classifier`. torchvision's rates for an output stride of 16 are (12, 24, 36) (the paper's Sec. 4.3 uses
    (6, 12, 18) at that stride; doubled for stride 8)."""

    num_classes: int
    key: str  # the map's key in the backbone's dict
    rates: tuple[int, ...] = (12, 24, 36)
    chs: int = 256
    bn_eps: float = BN_EPS_TORCH
    dtype: Any = None
    conv: Any = None  # injected factories (None: `Conv2d`, BatchNorm of `bn_eps`), as the backbone's
    norm: Any = None

    @nn.compact
    def __call__(self, feats: Mapping[str, Any], train: bool = False):
        conv, norm, _ = layer_factories(self.conv, self.norm, None, bn_eps=self.bn_eps, dtype=self.dtype)
        x = ASPP(self.rates, conv, norm, self.chs, name="aspp")(feats[self.key], train)
        x = ConvNormAct(self.chs, conv, norm, kernel=3, name="cbr")(x, train)
        return conv(self.num_classes, 1, use_bias=True, name="classifier")(x)
