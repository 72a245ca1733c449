"""Cascaded group attention in local windows (Liu et al., "EfficientViT: Memory Efficient Vision Transformer with
Cascaded Group Attention", arXiv:2305.07027), on NHWC maps.

`CascadedGroupAttention`: the channels are split into one group per head; head i projects (its group + head i-1's
output) to its own q, k, v with a 1x1 conv+BatchNorm, filters q with a depthwise conv+BatchNorm of its own kernel size,
and attends with a learned bias per relative offset (|dy|, |dx|) of the window (LeViT's biases,
`zoo.layers.attention.attention_bias_index`); the heads' outputs are passed through a ReLU, concatenated and
projected back to the input width by a 1x1 conv+BatchNorm. Every projection is `zoo.layers.linear_bn.Conv2dBn`, so the
deploy form is plain convolutions with biases. The child names (`qkvs_{i}`, `dws_{i}`, `proj`, `attention_biases`)
are timm's.

`LocalWindowAttention` runs it on `window` x `window` windows: a map of exactly that size is attended as a whole;
any other is padded with zeros at the bottom and right to a multiple of the window, cut into windows, attended per
window (the padded positions take part, as in timm) and cropped back. The window is a constructor argument, not the
input's size, so the parameters (the biases are `(heads, window**2)`) do not depend on the input resolution.

`CascadedGroupAttention` is registered in the layer-kinds table as "attention" kept float in int8 files, as LeViT's
attention is (softmax of activations: XNNPACK has no int8 path for it).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import kinds
from zoo.layers.attention import attend_with_bias, attention_bias_index

ModuleDef = Any


class CascadedGroupAttention(nn.Module):
    """Attention over a whole (B, window, window, C) input, one head per channel group, each head fed the previous
    head's output (see the module doc). `kernels[i]`: head i's depthwise kernel size on its queries."""

    num_heads: int
    key_dim: int
    kernels: tuple[int, ...]
    conv_bn: ModuleDef  # Conv2dBn with the network's conv, norm and form bound
    proj_conv_bn: ModuleDef  # the same whose BatchNorm scale starts at zero (timm's bn_weight_init=0)

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, h, w, c = x.shape
        heads, kd = self.num_heads, self.key_dim
        if c % heads:
            raise ValueError(f"CascadedGroupAttention: {c} channels do not split into {heads} heads")
        if len(self.kernels) < heads:
            raise ValueError(f"CascadedGroupAttention: {heads} heads need as many query kernel sizes, got "
                             f"{tuple(self.kernels)}")
        vd = c // heads  # a head's values are as wide as its channel group: the next head adds them to its group
        biases = self.param("attention_biases", nn.initializers.zeros, (heads, h * w))
        index = attention_bias_index((h, w))
        groups = jnp.split(x, heads, axis=-1)
        outs, feat = [], groups[0]
        for i in range(heads):
            if i > 0:
                feat = feat + groups[i]
            qkv = self.conv_bn(2 * kd + vd, 1, name=f"qkvs_{i}")(feat, train)
            q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
            q = self.conv_bn(kd, self.kernels[i], groups=kd, name=f"dws_{i}")(q, train)
            feat = attend_with_bias(q.reshape(b, h * w, 1, kd), k.reshape(b, h * w, 1, kd),
                                    v.reshape(b, h * w, 1, vd), biases[i:i + 1], index, kd**-0.5)
            feat = feat.reshape(b, h, w, vd)
            # timm's ReLU on the concatenation, applied per head (the same numbers), and as a plain maximum: the
            # nested jit of `nn.relu` drops this layer's path from the op's name in a TFLite file, so an int8
            # export would quantize it outside the float attention (a standalone int8 RELU, off XNNPACK)
            outs.append(jnp.maximum(feat, 0.0))
        return self.proj_conv_bn(c, 1, name="proj")(jnp.concatenate(outs, axis=-1), train)


kinds.register(CascadedGroupAttention, kinds.LayerKind("attention", int8="float"))


def window_partition(x, window: int):
    """(B, H, W, C) with H, W multiples of `window` -> (B * H/window * W/window, window, window, C), windows in
    row-major order. Four-dimensional reshapes and one transpose (older runtimes take 5-D at most)."""
    b, h, w, c = x.shape
    nh, nw = h // window, w // window
    x = x.reshape(b * nh, window, nw, window * c).transpose(0, 2, 1, 3)
    return x.reshape(b * nh * nw, window, window, c)


def window_reverse(x, window: int, hw: tuple[int, int]):
    """The inverse of `window_partition` for an (H, W) map."""
    h, w = hw
    nh, nw = h // window, w // window
    c = x.shape[-1]
    x = x.reshape(-1, nw, window, window * c).transpose(0, 2, 1, 3)
    return x.reshape(-1, h, w, c)


class LocalWindowAttention(nn.Module):
    """`CascadedGroupAttention` (child `attn`) on `window` x `window` windows of an NHWC map (module doc)."""

    window: int
    num_heads: int
    key_dim: int
    kernels: tuple[int, ...]
    conv_bn: ModuleDef
    proj_conv_bn: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.window < 1:
            raise ValueError(f"LocalWindowAttention: window must be at least 1, got {self.window}")
        attn = CascadedGroupAttention(self.num_heads, self.key_dim, tuple(self.kernels), self.conv_bn,
                                      self.proj_conv_bn, name="attn")
        _, h, w, _ = x.shape
        ws = self.window
        if h == ws and w == ws:
            return attn(x, train)
        ph, pw = -(-h // ws) * ws, -(-w // ws) * ws
        x = jnp.pad(x, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)))
        x = window_reverse(attn(window_partition(x, ws), train), ws, (ph, pw))
        return x[:, :h, :w]
