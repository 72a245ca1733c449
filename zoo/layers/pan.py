"""A light path-aggregation neck: FPN's top-down path, then PAN's bottom-up path, at one width, with depthwise-separable
fusions.

PAN (Liu et al., "Path Aggregation Network for Instance Segmentation", arXiv:1803.01534, Sec. 3.1) adds to FPN's
top-down path (coarse maps upsampled and added to finer ones) a bottom-up path that brings the fine maps' localization
back to the coarse ones in a few layers. NanoDet-Plus (RangiLyu, 2021, github.com/RangiLyu/nanodet) makes such a
neck cheap enough for phones: every map first reduced to one width by a 1x1 conv, 5x5 depthwise convs for the
downsampling and the fusions. Here a fusion adds the two maps (NanoDet-Plus's Ghost-PAN concatenates them) and runs a
depthwise-separable block, so each level keeps `width` channels and every op has an int8 TFLite kernel
(nearest upsampling as a concatenation and a reshape, no resize or gather).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.layers.blocks import ConvNormAct, DepthwiseSeparable

ModuleDef = Any


def upsample_nearest_2x(x, size: tuple[int, int]):
    """NHWC `x` repeated 2x along height and width (each pixel a 2x2 block), cropped to `size`: the map whose
    ceil-halving is `x` (a stride-2 conv's input size, 2n or 2n - 1)."""
    n, h, w, c = x.shape
    if not (2 * h - 1 <= size[0] <= 2 * h and 2 * w - 1 <= size[1] <= 2 * w):
        raise ValueError(f"a {h}x{w} map doubles to {2 * h}x{2 * w}, not {size[0]}x{size[1]}")
    # every pixel twice along width (concatenated along channels, reshaped), then every row twice: 4-D ops only
    x = jnp.concatenate([x, x], axis=-1).reshape(n, h, 2 * w, c)
    x = jnp.concatenate([x, x], axis=2).reshape(n, 2 * h, 2 * w, c)
    return jax.lax.slice(x, (0, 0, 0, 0), (n, size[0], size[1], c))


class LitePAN(nn.Module):
    """Maps (finest first, each half the size of the one before) -> as many maps of `width` channels.

    `lateral_i`: 1x1 conv + BN + act to `width`. Top-down: `top_down_i` fuses level i with the level above upsampled.
    Bottom-up: `down_i` (depthwise `kernel` conv, stride 2, BN, act) takes the output of level i - 1 to level i, and
    `bottom_up_i` fuses it with level i's top-down map. A fusion is the sum of its inputs through a depthwise-separable
    block (`kernel` depthwise conv, BN, act, 1x1 conv, BN, act).
    """

    width: int
    conv: ModuleDef
    norm: ModuleDef
    act: str = "relu6"
    kernel: int = 5

    def _fuse(self, name: str):
        return DepthwiseSeparable(self.width, self.conv, self.norm, self.kernel, act=self.act, pw_act=True,
                                  noskip=True, name=name)

    @nn.compact
    def __call__(self, maps: Sequence[Any], train: bool = False) -> list:
        lateral = [ConvNormAct(self.width, self.conv, self.norm, 1, act=self.act, name=f"lateral_{i}")(m, train)
                   for i, m in enumerate(maps)]
        top_down = lateral[-1:]
        for i in reversed(range(len(maps) - 1)):
            above = upsample_nearest_2x(top_down[0], lateral[i].shape[1:3])
            top_down.insert(0, self._fuse(f"top_down_{i}")(lateral[i] + above, train))
        out = top_down[:1]
        for i in range(1, len(maps)):
            down = ConvNormAct(self.width, self.conv, self.norm, self.kernel, 2, groups=self.width, act=self.act,
                               name=f"down_{i}")(out[-1], train)
            out.append(self._fuse(f"bottom_up_{i}")(top_down[i] + down, train))
        return out
