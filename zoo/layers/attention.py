"""Attention layers: softmax attention written as reshapes, einsums and a softmax (no fused kernel), so it exports.

`Attention`: ViT multi-head self-attention on token sequences (qkv Dense, proj Dense; timm's names), used by
`zoo.layers.transformer`. `RelBiasAttention` / `RelBiasAttentionSubsample`: LeViT's attention on NHWC maps
(Graham et al., arXiv:2104.01136), Linear+BatchNorm projections and a learned bias per head and relative offset
(|dy|, |dx|) instead of position embeddings; the subsampling form takes queries from every `stride`-th row and column.

All three are registered in the layer-kinds table as "attention" kept float in int8 files (softmax of activations:
XNNPACK has no int8 path for it); the relative-position biases are the module's own parameters.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.layers import kinds
from zoo.layers.activations import get_act

ModuleDef = Any


class Attention(nn.Module):
    """Multi-head self-attention on (B, N, C) tokens: qkv Dense -> per-head softmax(q k^T / sqrt(d)) v -> proj Dense."""

    num_heads: int
    dtype: Any = None
    dense: ModuleDef = nn.Dense  # injected factory (quantized or sparse Dense)

    @nn.compact
    def __call__(self, x, key_bias=None, return_keys: bool = False):
        """`key_bias` (B, N): added to every query's logit for each key (token merging's log(size)); `return_keys`:
        also return the keys averaged over the heads (B, N, head_dim), token merging's similarity metric."""
        b, n, c = x.shape
        head_dim = c // self.num_heads
        qkv = self.dense(3 * c, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)  # timm's (3, heads, head_dim) channel order
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k)
        if key_bias is not None:
            attn = attn + key_bias[:, None, None, :].astype(attn.dtype)
        attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
        x = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c)
        out = self.dense(c, dtype=self.dtype, name="proj")(x)
        return (out, k.mean(axis=2)) if return_keys else out


def attention_bias_index(hw: tuple[int, int], stride: int = 1) -> np.ndarray:
    """(queries, keys) index into a head's biases: |dy| * W + |dx| between query and key positions of an (H, W) map,
    the queries on every `stride`-th row and column (the keys on all), both in row-major order."""
    h, w = hw
    ky, kx = (a.reshape(-1) for a in np.meshgrid(np.arange(h), np.arange(w), indexing="ij"))
    qy, qx = (a.reshape(-1) for a in np.meshgrid(np.arange(0, h, stride), np.arange(0, w, stride), indexing="ij"))
    return np.abs(qy[:, None] - ky[None]) * w + np.abs(qx[:, None] - kx[None])


def attend_with_bias(q, k, v, biases, index, scale):
    """softmax(q k^T * scale + bias) v per head; q (B, Nq, heads, d), k (B, N, heads, d), v (B, N, heads, dv)."""
    attn = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    attn = attn + jnp.take(biases, jnp.asarray(index), axis=1).astype(attn.dtype)  # (heads, Nq, N)
    attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
    return out.reshape(*out.shape[:2], -1)


class RelBiasAttention(nn.Module):
    """Attention on an NHWC map: LinearBn qkv (per head: key_dim q, key_dim k, attn_ratio * key_dim v), attention
    with a learned bias per relative offset, act, LinearBn projection back to the input width (LeViT's)."""

    num_heads: int
    key_dim: int
    attn_ratio: float
    linear: ModuleDef  # LinearBn with the network's dense, norm and form bound
    act: str = "hard_swish"

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, h, w, c = x.shape
        heads, kd, vd = self.num_heads, self.key_dim, int(self.attn_ratio * self.key_dim)
        qkv = self.linear(heads * (2 * kd + vd), name="qkv")(x.reshape(b, h * w, c), train)
        qkv = qkv.reshape(b, h * w, heads, 2 * kd + vd)
        q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
        biases = self.param("attention_biases", nn.initializers.zeros, (heads, h * w))
        x = attend_with_bias(q, k, v, biases, attention_bias_index((h, w)), kd**-0.5)
        x = self.linear(c, name="proj")(get_act(self.act)(x), train)
        return x.reshape(b, h, w, c)


def subsample(x, stride: int):
    """Every `stride`-th row and column of an NHWC map from the first (`x[:, ::s, ::s]`), written as pad, reshape and
    slice: TFLite runs a strided slice on its builtin kernel, outside the XNNPACK graph; these stay inside it."""
    b, h, w, c = x.shape
    hq, wq = -(-h // stride), -(-w // stride)
    x = jnp.pad(x, ((0, 0), (0, hq * stride - h), (0, wq * stride - w), (0, 0)))
    x = x.reshape(b, hq, stride, wq * stride, c)[:, :, 0]  # rows (5-D at most: older runtimes' limit)
    return x.reshape(b, hq, wq, stride, c)[:, :, :, 0]


class RelBiasAttentionSubsample(nn.Module):
    """Shrink attention: keys and values from every position, queries from every `stride`-th row and column
    (timm LeViT's "subsample" Downsample), output `out_dim` wide at the queries' resolution."""

    out_dim: int
    num_heads: int
    key_dim: int
    attn_ratio: float
    linear: ModuleDef
    act: str = "hard_swish"
    stride: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, h, w, c = x.shape
        heads, kd, vd = self.num_heads, self.key_dim, int(self.attn_ratio * self.key_dim)
        kv = self.linear(heads * (kd + vd), name="kv")(x.reshape(b, h * w, c), train).reshape(b, h * w, heads, kd + vd)
        k, v = kv[..., :kd], kv[..., kd:]
        xq = subsample(x, self.stride)
        hq, wq = xq.shape[1:3]
        q = self.linear(heads * kd, name="q")(xq.reshape(b, hq * wq, c), train).reshape(b, hq * wq, heads, kd)
        biases = self.param("attention_biases", nn.initializers.zeros, (heads, h * w))
        x = attend_with_bias(q, k, v, biases, attention_bias_index((h, w), self.stride), kd**-0.5)
        x = self.linear(self.out_dim, name="proj")(get_act(self.act)(x), train)
        return x.reshape(b, hq, wq, self.out_dim)


for _cls in (Attention, RelBiasAttention, RelBiasAttentionSubsample):
    kinds.register(_cls, kinds.LayerKind("attention", int8="float"))
