"""ReLU linear attention with multi-scale aggregation (Cai et al., "EfficientViT: Multi-Scale Linear Attention for
High-Resolution Dense Prediction", arXiv:2205.14756, Sec. 3.1; timm's `LiteMLA`), on NHWC maps.

A 1x1 conv (no bias) projects the input to queries, keys and values of `heads` heads of `head_dim` channels each,
laid out per head as [q | k | v]. Each aggregation scale adds as many more heads: a depthwise k x k conv over all of
those channels, then a 1x1 conv grouped per head and per q/k/v (3 * heads groups), both without bias. Every head, the
projected ones and the aggregated ones, then attends over all positions with ReLU as the similarity kernel:

    out_n = sum_m (relu(q_n) . relu(k_m)) v_m / (sum_m relu(q_n) . relu(k_m) + eps)

computed in linear time as relu(q) (relu(k)^T v) over relu(q) (sum_m relu(k_m)) + eps. timm pads v with a column of
ones to get the denominator from the same product; here the key sum is its own reduction (the same numbers up to
rounding, and no constant tensor concatenated in the exported graph). As timm does, the products and the division
run in at least float32 whatever the compute dtype (the sums over positions overflow or round badly in bfloat16).
The heads' outputs are concatenated (projected heads first, then each scale's) and projected to `out_features` by a
1x1 conv+BatchNorm (`zoo.layers.linear_bn.Conv2dBn`, which folds in the deploy form).

Child names are timm's (`qkv`, `aggreg_{i}` with `dw` / `pw` for its Sequential's 0 / 1, `proj`). Registered in the
layer-kinds table as "attention" kept float in int8 files: the division by a sum of products of activations has no
useful int8 range (the numerator and the denominator scale together), as softmax attention has none.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import kinds

ModuleDef = Any

EPS = 1e-5  # timm's LiteMLA default, added to the denominator


def relu_linear_attention(q, k, v, eps: float = EPS):
    """(B, G, N, d) queries, keys and values -> (B, G, N, d): ReLU-kernel attention of each of the G heads over the
    N positions (module doc), in at least float32."""
    dtype = jnp.promote_types(v.dtype, jnp.float32)
    q, k, v = jnp.maximum(q.astype(dtype), 0.0), jnp.maximum(k.astype(dtype), 0.0), v.astype(dtype)
    kv = jnp.einsum("bgnd,bgne->bgde", k, v)
    num = jnp.einsum("bgnd,bgde->bgne", q, kv)
    ksum = jnp.sum(k, axis=2, keepdims=True)  # (B, G, 1, d)
    den = jnp.einsum("bgnd,bgmd->bgnm", q, ksum)  # (B, G, N, 1): a product, as the numerator
    return num / (den + eps)


class Aggregate(nn.Module):
    """Depthwise k x k conv, then a 1x1 conv with `groups` groups, neither with a bias (timm's `aggreg.{i}`)."""

    kernel: int
    groups: int
    conv: ModuleDef

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = self.conv(c, self.kernel, groups=c, name="dw")(x)
        return self.conv(c, 1, groups=self.groups, name="pw")(x)


class ReluLinearAttention(nn.Module):
    """Multi-scale ReLU linear attention of a (B, H, W, C) map: C // head_dim heads (module doc)."""

    out_features: int
    head_dim: int
    conv: ModuleDef  # Conv2d factory (no norm) for `qkv` and the aggregations
    conv_bn: ModuleDef  # Conv2dBn with the network's conv, norm and form bound, for `proj`
    scales: tuple[int, ...] = (5,)
    eps: float = EPS
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, h, w, c = x.shape
        d = self.head_dim
        heads = c // d
        if heads < 1:
            raise ValueError(f"ReluLinearAttention: {c} input channels give no head of {d} channels")
        qkv = self.conv(3 * heads * d, 1, name="qkv")(x)
        parts = [qkv] + [Aggregate(s, 3 * heads, self.conv, name=f"aggreg_{i}")(qkv) for i, s in enumerate(self.scales)]
        groups = heads * (1 + len(self.scales))
        # channels are head-major ([q | k | v] per head), so (B, N, G, 3d) splits them by head
        y = jnp.concatenate(parts, axis=-1).reshape(b, h * w, groups, 3 * d).transpose(0, 2, 1, 3)
        out = relu_linear_attention(y[..., :d], y[..., d:2 * d], y[..., 2 * d:], self.eps)
        out = out.astype(self.dtype or x.dtype).transpose(0, 2, 1, 3).reshape(b, h, w, groups * d)
        return self.conv_bn(self.out_features, 1, name="proj")(out, train)


kinds.register(ReluLinearAttention, kinds.LayerKind("attention", int8="float"))
