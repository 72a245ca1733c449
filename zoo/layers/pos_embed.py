"""Learned prefix tokens and absolute position embeddings of a ViT (Dosovitskiy et al., arXiv:2010.11929; the
distillation token of DeiT, Touvron et al., arXiv:2012.12877), for any grid of patches.

The position embedding is learned for one grid (14x14 patches of a 224x224 input). On another grid its patch part is
resampled as timm's `resample_abs_pos_embed` does (its `dynamic_img_size=True` path): bicubic with antialiasing
(torch `F.interpolate(mode="bicubic", antialias=True, align_corners=False)`), the prefix tokens' entries kept.
`jax.image.resize(method="bicubic", antialias=True)` computes that resampling: both use the Keys cubic with a = -0.5
and widen the kernel by the scale when shrinking (measured against torch 2.14 on N(0, 1) grids resampled from 14x14
to 2x30 ... 24x24: within 6e-6, as far as either float32 result is from the float64 one). torch's bicubic without
antialiasing (a = -0.75) is another function; neither `jax.image.resize` setting gives it. The model applies the
antialiased one as a constant matrix per axis (`bicubic_matrix`: the weights `jax.image.resize` computes, in float64;
within 5e-7 of the float64 result there): two small matrix products of the parameter, which an export folds into a
constant.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.layers import kinds

TOKEN_NAMES = ("cls_token", "dist_token")  # timm's names of the prefix tokens, in sequence order


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 at distances |x| (Pillow's, and torch's with antialiasing)."""
    return np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) float32 M: antialiased bicubic resampling of a vector is M @ v, the weights of
    `jax.image.resize(v, (size_out,), "bicubic", antialias=True)` (the kernel widened by size_in / size_out when
    shrinking, each row normalized to sum 1), computed in float64.

    Numbers, not traced ops: traced, `jax.image.resize` computes its weights with comparisons and selects, which
    stay in an exported graph (TFLite's XNNPACK delegate runs none of them) and cost ~1 s of eager dispatch each.
    """
    inv_scale = size_in / size_out
    centers = (np.arange(size_out) + 0.5) * inv_scale - 0.5  # output pixel centres in input coordinates
    m = _keys_cubic(np.abs(centers[:, None] - np.arange(size_in)[None, :]) / max(inv_scale, 1.0))
    m = (m / m.sum(axis=1, keepdims=True)).astype(np.float32)
    m.setflags(write=False)  # shared by every caller (cached)
    return m


def resample_pos_embed(pos_embed, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int):
    """(1, num_prefix + old_h * old_w, C) -> (1, num_prefix + new_h * new_w, C): the grid part resampled (bicubic,
    antialiased, in float32, as timm), the first `num_prefix` entries unchanged."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    c = grid.shape[-1]
    grid = grid.astype(jnp.float32).reshape(*old_grid, c)
    rows, cols = bicubic_matrix(old_grid[0], new_grid[0]), bicubic_matrix(old_grid[1], new_grid[1])
    grid = jnp.einsum("hH,wW,HWc->hwc", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)
    grid = grid.reshape(1, new_grid[0] * new_grid[1], c).astype(pos_embed.dtype)
    return jnp.concatenate([prefix, grid], axis=1)


class PrefixTokensPosEmbed(nn.Module):
    """(B, H, W, C) patch embeddings -> (B, num_prefix + H W, C) tokens: the learned class token (and, with
    `num_prefix=2`, the distillation token) before the patches in row-major order, plus the learned position
    embedding, which covers the prefix tokens too (timm's `no_embed_class=False`, DeiT's and the original ViT's),
    resampled when (H, W) is not `grid` (module docstring). Parameters: `cls_token`, `dist_token` (1, 1, C),
    `pos_embed` (1, num_prefix + grid_h grid_w, C), as timm's."""

    grid: tuple[int, int] = (14, 14)
    num_prefix: int = 1

    @nn.compact
    def __call__(self, x):
        if self.num_prefix not in (1, 2):
            raise ValueError(f"PrefixTokensPosEmbed: num_prefix must be 1 (class token) or 2 (class and "
                             f"distillation tokens), got {self.num_prefix}")
        b, h, w, c = x.shape
        tokens = [self.param(name, nn.initializers.normal(std), (1, 1, c))  # timm's init scales
                  for name, std in zip(TOKEN_NAMES[:self.num_prefix], (1e-6, 0.02))]
        pos = self.param("pos_embed", nn.initializers.truncated_normal(0.02),
                         (1, self.num_prefix + self.grid[0] * self.grid[1], c))
        pos = resample_pos_embed(pos, self.grid, (h, w), self.num_prefix)
        prefix = [jnp.broadcast_to(t.astype(x.dtype), (b, 1, c)) for t in tokens]
        x = jnp.concatenate([*prefix, x.reshape(b, h * w, c)], axis=1)
        return x + pos.astype(x.dtype)


# An additive shift per position and channel (with learned tokens joined before the patches): no weight layer and
# nothing any pass folds, as LayerScale's per-channel gain is a norm-like layer that stays in the deploy form.
kinds.register(PrefixTokensPosEmbed, kinds.LayerKind("norm"))
