"""Boxes as distances from a location to their four sides, and those distances as discrete distributions.

FCOS (Tian et al., arXiv:1904.01355, Sec. 3.1, Eq. 1) regresses, at a location (x, y), the distances (l, t, r, b) to
the left, top, right and bottom sides of the box; here they are in units of the location's stride, so every level
predicts numbers of the same scale. GFL (Li et al., "Generalized Focal Loss", arXiv:2006.04388, Sec. 3.3) predicts each
distance as a distribution over the integers 0..reg_max (softmax of reg_max + 1 logits) and takes its expectation;
training pulls the probability onto the two integers around the target, which its Distribution Focal Loss weighs by
nearness: DFL = -((y_{i+1} - y) log S_i + (y - y_i) log S_{i+1}), i.e. the softmax cross-entropy of the logits
against `distribution_targets(y)` (e.g. `optax.softmax_cross_entropy(logits, distribution_targets(y, reg_max))`).

All pure jnp and jit-able; boxes are (x1, y1, x2, y2) in input pixels, `points` (..., 2) are (x, y) and `strides`
broadcast against the points' leading dimensions (`zoo.layers.points`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def encode_distances(boxes, points, strides):
    """(l, t, r, b) from `points` to the sides of `boxes` (..., 4), in units of `strides`: positive inside the box."""
    p = jnp.asarray(points, boxes.dtype)
    s = jnp.asarray(strides, boxes.dtype)[..., None]
    return jnp.concatenate([p - boxes[..., :2], boxes[..., 2:] - p], -1) / s


def decode_distances(distances, points, strides):
    """The boxes (..., 4) whose sides lie `distances` (l, t, r, b, in units of `strides`) from `points`."""
    p = jnp.asarray(points, distances.dtype)
    d = distances * jnp.asarray(strides, distances.dtype)[..., None]
    return jnp.concatenate([p - d[..., :2], p + d[..., 2:]], -1)


def distribution_integral(logits):
    """The expected value of the distribution over 0..reg_max that `logits` (..., reg_max + 1) give (GFL Sec. 3.3)."""
    bins = jnp.arange(logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1) @ bins


def distribution_targets(distances, reg_max: int):
    """The two-hot distributions (..., reg_max + 1) over 0..reg_max whose expectations are `distances` clipped to
    [0, reg_max]: weight (y_{i+1} - y) on y_i = floor(y), (y - y_i) on y_{i+1} (DFL's targets). A distance of exactly
    reg_max puts all its weight on the last bin."""
    y = jnp.clip(distances.astype(jnp.float32), 0.0, float(reg_max))
    left = jnp.clip(jnp.floor(y), 0.0, reg_max - 1.0)
    right_weight = y - left
    bins = jnp.arange(reg_max + 1, dtype=jnp.float32)
    left = left[..., None]
    return jnp.where(bins == left, 1.0 - right_weight[..., None], 0.0) + jnp.where(bins == left + 1,
                                                                                  right_weight[..., None], 0.0)
