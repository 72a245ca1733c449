"""Separable self-attention (Mehta & Rastegari, "Separable Self-attention for Mobile Vision Transformers",
arXiv:2206.02680) and the pre-norm transformer layer built on it, on patch-grouped maps.

Input layout (B, P, N, C): for each of the P pixel positions inside a patch, the sequence of the N patches
(`zoo.layers.patches.unfold` reshaped to 4-D). It is an ordinary NHWC map with H = P and W = N, so the projections are
1x1 convolutions from the injected conv factory (timm's are `nn.Conv2d` on its (B, C, P, N) layout: the same
weights), and the norms are `GroupNorm1` on the 4-D tensor.

The attention is linear in N: one 1x1 conv gives, per position, one query score, C keys and C values; the scores are
a softmax over the N patches (the "context scores"), the keys weighted by them and summed over the patches give one
C-wide context vector per pixel position, and that vector gates ReLU(values) at every patch before the output 1x1
conv. No N x N matrix is formed. Child names are timm's (`qkv_proj`, `out_proj`; `norm1`, `attn`, `norm2`,
`mlp/fc1`, `mlp/fc2`).

`LinearSelfAttention` is registered in the layer-kinds table as "attention" kept float in int8 files (its softmax of
activations and the product of two activations: XNNPACK has no int8 path for the softmax).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.layers import kinds
from zoo.layers.activations import get_act
from zoo.layers.blocks import drop_path
from zoo.layers.single_head_attention import GroupNorm1

ModuleDef = Any

# timm's GroupNorm1 keeps torch GroupNorm's default eps
GROUP_NORM_EPS = 1e-5


def separable_attention(q, k, v):
    """The attention itself on (B, P, N) query scores, (B, P, N, C) keys and values -> (B, P, N, C)."""
    scores = jax.nn.softmax(q.astype(jnp.float32), axis=-1).astype(k.dtype)  # over the N patches
    context = jnp.einsum("bpn,bpnc->bpc", scores, k)  # one context vector per pixel position
    # ReLU as a plain maximum, so the op keeps this layer's path in an exported file (see single_head_attention)
    return jnp.maximum(v, 0.0) * context[:, :, None, :]


class LinearSelfAttention(nn.Module):
    """1x1 conv `qkv_proj` to 1 + 2C channels (query score, keys, values) -> separable attention -> 1x1 `out_proj`."""

    conv: ModuleDef

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        qkv = self.conv(1 + 2 * c, 1, use_bias=True, name="qkv_proj")(x)
        out = separable_attention(qkv[..., 0], qkv[..., 1:1 + c], qkv[..., 1 + c:])
        return self.conv(c, 1, use_bias=True, name="out_proj")(out)


class ConvMlp(nn.Module):
    """1x1 conv `fc1` to `hidden` -> act -> 1x1 conv `fc2` back to the input width (timm's ConvMlp, biases on)."""

    hidden: int
    conv: ModuleDef
    act: str = "silu"

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = get_act(self.act)(self.conv(self.hidden, 1, use_bias=True, name="fc1")(x))
        return self.conv(c, 1, use_bias=True, name="fc2")(x)


class LinearTransformerBlock(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)), both norms `GroupNorm1` (statistics over the whole image)."""

    conv: ModuleDef
    mlp_ratio: float = 2.0
    act: str = "silu"
    drop_path_rate: float = 0.0
    norm_eps: float = GROUP_NORM_EPS
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        y = LinearSelfAttention(self.conv, name="attn")(GroupNorm1(epsilon=self.norm_eps, dtype=self.dtype,
                                                                   name="norm1")(x))
        x = x + drop_path(y, self.drop_path_rate, train, self)
        y = ConvMlp(int(c * self.mlp_ratio), self.conv, self.act, name="mlp")(
            GroupNorm1(epsilon=self.norm_eps, dtype=self.dtype, name="norm2")(x))
        return x + drop_path(y, self.drop_path_rate, train, self)


kinds.register(LinearSelfAttention, kinds.LayerKind("attention", int8="float"))
