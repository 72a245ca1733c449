"""SegFormer's all-MLP decoder (Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", arXiv:2105.15203 Sec. 3.2, Eq. 4), on the maps of any backbone at strides 4, 8, 16 and 32.

Each map is projected to a common `width` by a Linear per position (a 1x1 conv with bias, `linear_c1`..`linear_c4`,
the official release's names), upsampled bilinearly to the stride-4 map (half-pixel centres, as its
`align_corners=False`), concatenated deepest first, fused by a 1x1 conv-BN-ReLU (`linear_fuse`), then dropout in
training and a 1x1 class conv (`linear_pred`).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers.blocks import ConvNormAct
from zoo.layers.factories import layer_factories
from zoo.layers.norm import BN_EPS_TORCH
from zoo.layers.resize import resize_bilinear


class MLPDecoderHead(nn.Module):
    """`{keys[i]: map, ...}` (strides 4, 8, 16, 32 in that order) -> class logits at the first map's resolution."""

    num_classes: int
    keys: tuple[str, ...]
    width: int = 256  # the paper's C for MiT-B0/B1 (Sec. 4.1: 256; 768 for the larger encoders)
    drop_rate: float = 0.1
    bn_eps: float = BN_EPS_TORCH
    dtype: Any = None
    # injected layer factories (None: `Conv2d`, BatchNorm of `bn_eps`), as the backbone's
    conv: Any = None
    norm: Any = None

    @nn.compact
    def __call__(self, feats: Mapping[str, Any], train: bool = False):
        conv, norm, _ = layer_factories(self.conv, self.norm, None, bn_eps=self.bn_eps, dtype=self.dtype)
        size = feats[self.keys[0]].shape[1:3]
        maps = [resize_bilinear(conv(self.width, 1, use_bias=True, name=f"linear_c{i + 1}")(feats[k]), size)
                for i, k in enumerate(self.keys)]
        x = ConvNormAct(self.width, conv, norm, name="linear_fuse")(jnp.concatenate(maps[::-1], -1), train)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        return conv(self.num_classes, 1, use_bias=True, name="linear_pred")(x)
