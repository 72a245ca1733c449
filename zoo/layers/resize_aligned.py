"""Bilinear resize with aligned corners, in NHWC: torch `F.interpolate(mode="bilinear", align_corners=True)`.

MobileViTv2 (timm, ml-cvnets) resizes a map whose size is not a multiple of the patch size this way before its
block; MobileViT v1 uses the other convention (`zoo.layers.patches.resize_bilinear`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def aligned_indices(size_in: int, size_out: int):
    """Source indices and weights along one axis: output i samples input i * (in - 1) / (out - 1), computed in
    float32 as torch's CPU kernel does."""
    scale = np.float32(size_in - 1) / np.float32(size_out - 1) if size_out > 1 else np.float32(0)
    src = np.arange(size_out, dtype=np.float32) * scale
    i0 = np.minimum(np.floor(src).astype(np.int32), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear_aligned(x, size: tuple[int, int]):
    """NHWC bilinear resize to `size` with the corner pixels of input and output aligned (constant-index gathers and
    a lerp per axis)."""
    for axis, out in zip((1, 2), size):
        if x.shape[axis] == out:
            continue
        i0, i1, w1 = aligned_indices(x.shape[axis], out)
        shape = [1] * x.ndim
        shape[axis] = out
        w1 = jnp.asarray(w1, x.dtype).reshape(shape)
        x = jnp.take(x, i0, axis=axis) * (1 - w1) + jnp.take(x, i1, axis=axis) * w1
    return x
