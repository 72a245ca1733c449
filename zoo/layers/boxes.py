"""Boxes (x1, y1, x2, y2): the offsets a detector predicts relative to its anchors, clipping and overlap.

The coding is R-CNN's (Girshick et al., arXiv:1311.2524, Appendix C), used by SSD (Liu et al., arXiv:1512.02325,
Eq. 2): centre offsets in units of the anchor's size, log size ratios, each multiplied by a weight (SSD's "variances"
1/10 and 1/5 as torchvision's weights (10, 10, 5, 5)). Decoding clamps the log ratios at log(1000 / 16), as
torchvision's `BoxCoder` does, so that exp() of an untrained output stays finite.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

SSD_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
MAX_LOG_RATIO = math.log(1000.0 / 16)


def _centre_size(boxes):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def decode_boxes(codes, anchors, weights=SSD_BOX_WEIGHTS, max_log_ratio: float = MAX_LOG_RATIO):
    """Predicted offsets `codes` (..., 4) relative to `anchors` (broadcastable to codes) -> boxes (..., 4)."""
    ax, ay, aw, ah = _centre_size(jnp.asarray(anchors, codes.dtype))
    wx, wy, ww, wh = weights
    dw = jnp.minimum(codes[..., 2] / ww, max_log_ratio)
    dh = jnp.minimum(codes[..., 3] / wh, max_log_ratio)
    cx = codes[..., 0] / wx * aw + ax
    cy = codes[..., 1] / wy * ah + ay
    half_w = 0.5 * (jnp.exp(dw) * aw)
    half_h = 0.5 * (jnp.exp(dh) * ah)
    return jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], -1)


def encode_boxes(boxes, anchors, weights=SSD_BOX_WEIGHTS):
    """The offsets that `decode_boxes` turns back into `boxes` (training targets of matched anchors)."""
    bx, by, bw, bh = _centre_size(boxes)
    ax, ay, aw, ah = _centre_size(jnp.asarray(anchors, boxes.dtype))
    wx, wy, ww, wh = weights
    return jnp.stack([wx * (bx - ax) / aw, wy * (by - ay) / ah, ww * jnp.log(bw / aw), wh * jnp.log(bh / ah)], -1)


def clip_boxes(boxes, image_size: tuple[int, int]):
    """Boxes clipped to an image of `image_size` (height, width)."""
    h, w = image_size
    x = jnp.clip(boxes[..., 0::2], 0, w)
    y = jnp.clip(boxes[..., 1::2], 0, h)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], -1)


def box_area(boxes):
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(a, b):
    """Intersection over union of boxes `a` (..., 4) and `b` (..., 4), broadcast against each other (pairwise:
    `box_iou(a[:, None], b[None])`). Empty boxes give NaN against each other (0 / 0), which no threshold exceeds."""
    lo = jnp.maximum(a[..., :2], b[..., :2])
    hi = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(hi - lo, 0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (box_area(a) + box_area(b) - inter)
