"""Patch sequences and resizing for transformer blocks on feature maps (MobileViT's unfold/fold), in NHWC."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def _bilinear_indices(size_in: int, size_out: int):
    """Source indices and weights of torch's bilinear resize (align_corners=False, no antialias) along one axis."""
    scale = np.float32(size_in) / np.float32(size_out)  # float32 arithmetic, as torch's CPU kernel
    src = np.maximum((np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int32), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_bilinear(x, size: tuple[int, int]):
    """NHWC bilinear resize equal to torch `F.interpolate(mode="bilinear", align_corners=False)`.

    Written as constant-index gathers and a lerp per axis: `jax.image.resize` antialiases when shrinking, which
    torch's default does not.
    """
    for axis, out in zip((1, 2), size):
        if x.shape[axis] == out:
            continue
        i0, i1, w1 = _bilinear_indices(x.shape[axis], out)
        shape = [1] * x.ndim
        shape[axis] = out
        w1 = jnp.asarray(w1, x.dtype).reshape(shape)
        x = jnp.take(x, i0, axis=axis) * (1 - w1) + jnp.take(x, i1, axis=axis) * w1
    return x


def unfold(x, patch: int):
    """(B, H, W, C) -> (B * P, N, C): one sequence over the N patches for each of the P pixel positions in a patch.

    Sequence (b, i * patch + j) holds pixel (i, j) of every patch, patches in row-major order: timm's order. Done with
    5-D transposes at most (TFLite's TRANSPOSE limit in older runtimes).
    """
    b, h, w, c = x.shape
    nh, nw = h // patch, w // patch
    x = x.reshape(b * nh, patch, nw, patch, c).transpose(0, 1, 3, 2, 4)  # (B nh, ph, pw, nw, C)
    x = x.reshape(b, nh, patch * patch, nw * c).transpose(0, 2, 1, 3)  # (B, P, nh, nw C)
    return x.reshape(b * patch * patch, nh * nw, c)


def fold(x, batch: int, hw: tuple[int, int], patch: int):
    """Inverse of `unfold`: (B * P, N, C) -> (B, H, W, C)."""
    (h, w), c = hw, x.shape[-1]
    nh, nw = h // patch, w // patch
    x = x.reshape(batch, patch * patch, nh, nw * c).transpose(0, 2, 1, 3)  # (B, nh, P, nw C)
    x = x.reshape(batch * nh, patch, patch, nw, c).transpose(0, 1, 3, 2, 4)  # (B nh, ph, nw, pw, C)
    return x.reshape(batch, h, w, c)
