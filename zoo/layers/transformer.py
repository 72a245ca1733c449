"""Transformer blocks: the pre-norm ViT block and its MLP, and MobileViT's block that runs one over a feature map.

`MobileViTBlock` (Mehta & Rastegari, arXiv:2110.02178): a local kxk conv and a 1x1 projection to the transformer
width, unfold into patches (`zoo.layers.patches`), a ViT encoder run across patches for every pixel position inside a
patch, LayerNorm, fold back, project to the block width and fuse with the block input by a kxk conv on their
concatenation. Child names are timm's (`conv_kxk`, `conv_1x1`, `transformer_{k}/attn/qkv`, `norm`, `conv_proj`,
`conv_fusion`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers.activations import get_act
from zoo.layers.attention import Attention
from zoo.layers.blocks import ConvNormAct, drop_path
from zoo.layers.norm import LN_EPS_TORCH
from zoo.layers.patches import fold, resize_bilinear, unfold
from zoo.layers.token_merging import bipartite_merge

ModuleDef = Any


class Mlp(nn.Module):
    """Dense `fc1` to `hidden` -> act -> Dense `fc2` back to the input width."""

    hidden: int
    act: str = "silu"
    dtype: Any = None
    dense: ModuleDef = nn.Dense

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = get_act(self.act)(self.dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        return self.dense(c, dtype=self.dtype, name="fc2")(x)


class TransformerBlock(nn.Module):
    """Pre-norm ViT block (timm vision_transformer.Block): x + attn(ln(x)), then x + mlp(ln(x))."""

    num_heads: int
    mlp_ratio: float = 2.0
    act: str = "silu"
    drop_path_rate: float = 0.0
    dtype: Any = None
    dense: ModuleDef = nn.Dense
    ln: ModuleDef | None = None  # LayerNorm factory (None: flax's with torch's default eps)

    merge: int = 0  # patch tokens merged between attention and MLP (`zoo.layers.token_merging`)
    num_prefix: int = 1  # class/distillation tokens, kept out of merging

    @nn.compact
    def __call__(self, x, train: bool = False, size=None):
        """`size` (B, N, 1): patches per token, for token merging (proportional attention, merges weighted by size);
        then returns (x, size)."""
        ln = self.ln or partial(nn.LayerNorm, epsilon=LN_EPS_TORCH, dtype=self.dtype)
        attention = Attention(self.num_heads, self.dtype, self.dense, name="attn")
        if size is None:
            y = attention(ln(name="norm1")(x))
        else:
            y, keys = attention(ln(name="norm1")(x), key_bias=jnp.log(size[..., 0]), return_keys=True)
        x = x + drop_path(y, self.drop_path_rate, train, self)
        if size is not None:
            x, size = bipartite_merge(x, size, keys, self.merge, self.num_prefix)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.act, self.dtype, self.dense, name="mlp")(ln(name="norm2")(x))
        x = x + drop_path(y, self.drop_path_rate, train, self)
        return x if size is None else (x, size)


class MobileViTBlock(nn.Module):
    """Local kxk conv -> 1x1 to the transformer width -> unfold -> `depth` transformer blocks -> LayerNorm -> fold ->
    1x1 back to `out_chs` -> kxk fusion conv over concat(input, x).

    A feature map whose size is not a multiple of the patch size is resized (bilinear) up to the next multiple before
    unfolding and back after folding, as timm and ml-cvnets do.
    """

    out_chs: int
    transformer_dim: int
    depth: int
    conv: ModuleDef
    norm: ModuleDef
    patch_size: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    kernel: int = 3
    stride: int = 1
    act: str = "silu"
    drop_path_rate: float = 0.0
    dtype: Any = None
    dense: ModuleDef = nn.Dense

    @nn.compact
    def __call__(self, x, train: bool = False):
        shortcut = x
        in_chs = x.shape[-1]
        x = ConvNormAct(in_chs, self.conv, self.norm, self.kernel, self.stride, act=self.act, name="conv_kxk")(x, train)
        x = self.conv(self.transformer_dim, 1, name="conv_1x1")(x)

        b, h, w, _ = x.shape
        p = self.patch_size
        hp, wp = math.ceil(h / p) * p, math.ceil(w / p) * p
        x = resize_bilinear(x, (hp, wp))
        x = unfold(x, p)
        for k in range(self.depth):
            x = TransformerBlock(self.num_heads, self.mlp_ratio, self.act, self.drop_path_rate, self.dtype, self.dense,
                                 name=f"transformer_{k}")(x, train)
        x = nn.LayerNorm(epsilon=LN_EPS_TORCH, dtype=self.dtype, name="norm")(x)
        x = fold(x, b, (hp, wp), p)
        x = resize_bilinear(x, (h, w))

        x = ConvNormAct(self.out_chs, self.conv, self.norm, 1, act=self.act, name="conv_proj")(x, train)
        x = jnp.concatenate([shortcut.astype(x.dtype), x], axis=-1)
        return ConvNormAct(self.out_chs, self.conv, self.norm, self.kernel, act=self.act, name="conv_fusion")(x, train)
