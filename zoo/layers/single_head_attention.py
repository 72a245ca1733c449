"""Single-head partial attention (Yun & Ro, "SHViT: Single-Head Vision Transformer with Memory Efficient Macro
Design", arXiv:2401.16456), on NHWC maps.

Only the first `pdim` channels take part: they are normalized (GroupNorm with one group: statistics over the whole
map and those channels, per image), projected by one 1x1 conv+BatchNorm to a query and a key of `qk_dim` channels
and a value of `pdim`, and attended over every position by one head (softmax(q k^T / sqrt(qk_dim)) v). The result
is concatenated back with the untouched channels, passed through a ReLU, and projected over the full width by a
1x1 conv+BatchNorm. Both projections are `zoo.layers.linear_bn.Conv2dBn`, so the deploy form is plain convolutions
with biases; the GroupNorm (`GroupNorm1`: flax's, computed on the 4-D map so that it exports to XNNPACK's ops)
stays, its statistics being the input's. The child names (`pre_norm`, `qkv`, `proj`) are timm's
(`timm/models/shvit.py`, SHSA).

Registered in the layer-kinds table as "attention" kept float in int8 files, as LeViT's and EfficientViT's attention
are (softmax of activations, and here a GroupNorm: XNNPACK has no int8 path for either).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.layers import kinds

ModuleDef = Any


class GroupNorm1(nn.GroupNorm):
    """GroupNorm with one group (timm's GroupNorm1) on an NHWC map: per image, the mean and (two-pass, as torch's)
    variance over every position and channel, then a scale and shift per channel. Parameters and layer kind are
    flax's GroupNorm's; the computation stays 4-D, where flax's reshapes to (B, H, W, groups, C / groups) and its
    5-D broadcasts export as BROADCAST_TO ops that XNNPACK does not take."""

    num_groups: int = 1
    epsilon: float = 1e-5  # torch GroupNorm's default, which timm's GroupNorm1 keeps

    @nn.compact
    def __call__(self, x, *, mask=None):
        if self.num_groups != 1 or self.group_size is not None or mask is not None:
            raise ValueError("GroupNorm1 normalizes with one group, without a mask")
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        dtype = self.dtype or x.dtype
        xf = x.astype(jnp.float32)
        axes = tuple(range(1, x.ndim))
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        xc = xf - mean
        var = jnp.mean(xc * xc, axis=axes, keepdims=True)
        y = xc * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale + bias).astype(dtype)


class SingleHeadAttention(nn.Module):
    """Attention of one head on the first `pdim` channels of a (B, H, W, C) map over all its positions; the output is
    C wide (module doc)."""

    qk_dim: int
    pdim: int
    conv_bn: ModuleDef  # Conv2dBn with the network's conv, norm and form bound
    proj_conv_bn: ModuleDef  # the same whose BatchNorm scale starts at zero (timm's bn_weight_init=0)
    norm_eps: float = 1e-5  # GroupNorm1's
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, h, w, c = x.shape
        kd, pd = self.qk_dim, self.pdim
        if not 0 < pd <= c:
            raise ValueError(f"SingleHeadAttention: pdim must be in 1..{c} (the input's channels), got {pd}")
        x1, x2 = x[..., :pd], x[..., pd:]
        x1 = GroupNorm1(epsilon=self.norm_eps, dtype=self.dtype, name="pre_norm")(x1)
        qkv = self.conv_bn(2 * kd + pd, 1, name="qkv")(x1, train).reshape(b, h * w, 2 * kd + pd)
        q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
        attn = jnp.einsum("bqd,bkd->bqk", q, k) * kd**-0.5
        attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
        x1 = jnp.einsum("bqk,bkd->bqd", attn, v).reshape(b, h, w, pd)
        # timm's ReLU on the concatenation, applied to each part (the same numbers), and as a plain maximum: the
        # nested jit of `nn.relu` drops this layer's path from the op's name in a TFLite file, as does the export's
        # own move of a ReLU after a concatenation onto its parts, and an int8 export would then quantize it outside
        # the float attention (a standalone int8 RELU, off XNNPACK)
        x = jnp.concatenate([jnp.maximum(x1, 0.0), jnp.maximum(x2, 0.0)], axis=-1)
        return self.proj_conv_bn(c, 1, name="proj")(x, train)


kinds.register(SingleHeadAttention, kinds.LayerKind("attention", int8="float"))
