"""The DeepLabV3+ head (Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
Segmentation", arXiv:1802.02611 Sec. 3.1, Fig. 2): ASPP on the deepest map, then a decoder that refines it with a
stride-4 map of the backbone.

- **Encoder**: `zoo.layers.aspp.ASPP` as torchvision builds it (1x1, three atrous 3x3 and image-pooling branches,
  each conv-BN-ReLU, 256 channels, a 1x1 projection). Its atrous convs stay plain: the paper's separable ASPP
  (Sec. 3.2) belongs to its Xception encoder, and plain ASPP keeps the layer shared with DeepLabV3.
- **Decoder** (Sec. 3.1): the low-level map reduced by a 1x1 conv-BN-ReLU to 48 channels (`reduce`; the paper's
  Table 1 best), the ASPP output upsampled bilinearly to it (half-pixel centres), both concatenated, two 3x3 convs
  of 256 channels (`fuse_0`, `fuse_1`), a 1x1 `classifier`. The 3x3 convs are depthwise-separable (depthwise
  3x3-BN-ReLU, pointwise 1x1-BN-ReLU, as the paper's Table 5 "SC" decoder and its mobile release build them): at
  stride 4 a full 3x3 of 304 -> 256 channels would cost more MACs than a MobileNet backbone.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers.aspp import ASPP
from zoo.layers.blocks import ConvNormAct, DepthwiseSeparable
from zoo.layers.factories import layer_factories
from zoo.layers.norm import BN_EPS_TORCH
from zoo.layers.resize import resize_bilinear

# the paper's atrous rates at output stride 16 (Sec. 4.1: (6, 12, 18)); scaled by 16 / output_stride elsewhere
RATES_AT_16 = (6, 12, 18)


def atrous_rates(output_stride: int) -> tuple[int, ...]:
    """ASPP's rates for a map at `output_stride`: (6, 12, 18) at 16, doubled at 8 (Sec. 4.1), halved at 32."""
    if output_stride not in (8, 16, 32):
        raise ValueError(f"ASPP rates are defined for output strides 8, 16 and 32, not {output_stride}")
    return tuple(r * 16 // output_stride for r in RATES_AT_16)


class DeepLabV3PlusHead(nn.Module):
    """`{high: deepest map, low: stride-4 map, ...}` -> class logits at the low map's resolution."""

    num_classes: int
    high: str  # key of the map ASPP reads (the backbone's output stride)
    low: str  # key of the stride-4 map the decoder reads
    rates: tuple[int, ...] = RATES_AT_16
    chs: int = 256
    low_chs: int = 48
    drop_rate: float = 0.1  # after ASPP's projection (the paper's release: keep probability 0.9)
    bn_eps: float = BN_EPS_TORCH
    dtype: Any = None
    # injected layer factories (None: `Conv2d`, BatchNorm of `bn_eps`), as the backbone's
    conv: Any = None
    norm: Any = None

    @nn.compact
    def __call__(self, feats: Mapping[str, Any], train: bool = False):
        conv, norm, _ = layer_factories(self.conv, self.norm, None, bn_eps=self.bn_eps, dtype=self.dtype)
        low = feats[self.low]
        x = ASPP(tuple(self.rates), conv, norm, self.chs, self.drop_rate, name="aspp")(feats[self.high], train)
        x = resize_bilinear(x, low.shape[1:3])
        x = jnp.concatenate([x, ConvNormAct(self.low_chs, conv, norm, name="reduce")(low, train)], -1)
        for i in range(2):
            x = DepthwiseSeparable(self.chs, conv, norm, pw_act=True, noskip=True, name=f"fuse_{i}")(x, train)
        return conv(self.num_classes, 1, use_bias=True, name="classifier")(x)
