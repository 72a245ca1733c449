"""Greedy non-maximum suppression with static shapes, so that it runs under `jax.jit` and exports.

Greedy NMS (as in SSD, Liu et al., arXiv:1512.02325, Sec. 3.7 "Inference time"): visit boxes by decreasing score,
keep a box unless a kept box of the same class overlaps it by IoU > threshold. The data-dependent set of survivors
becomes a mask over a fixed number of candidates, and the output a fixed number of rows with a validity mask. The
visit is one loop over the candidates, each step vectorized over every batch dimension (images, classes), so an SSD's
per-class NMS over 90 classes x 300 candidates costs 300 small steps, not a 27,000 x 27,000 overlap matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.layers.boxes import box_iou


def greedy_nms_mask(boxes, valid, iou_threshold: float, classes=None):
    """Which of `boxes` (..., K, 4), ordered by decreasing score, greedy NMS keeps: a bool mask (..., K).

    `valid` (..., K): the candidates taking part (the others are neither kept nor suppress). `classes` (..., K):
    only boxes of the same class suppress each other (None: all of them do)."""
    k = boxes.shape[-2]
    order = jnp.arange(k)

    def visit(i, state):
        keep, suppressed = state
        kept = valid[..., i] & ~suppressed[..., i]
        overlap = box_iou(jax.lax.dynamic_slice_in_dim(boxes, i, 1, boxes.ndim - 2), boxes) > iou_threshold
        if classes is not None:
            overlap &= classes == classes[..., i, None]
        suppressed |= kept[..., None] & overlap & (order > i)
        # a selection, not `keep.at[..., i].set(kept)`: the same values, and a scatter has no LiteRT kernel
        # (the converter keeps it as STABLEHLO_SCATTER); this becomes EQUAL + SELECT_V2
        return jnp.where(order == i, kept[..., None], keep), suppressed

    none = jnp.zeros(valid.shape, bool)
    keep, _ = jax.lax.fori_loop(0, k, visit, (none, none))
    return keep


def nms(boxes, scores, iou_threshold: float, max_output: int, classes=None, valid=None):
    """Greedy NMS of `boxes` (..., K, 4) with `scores` (..., K), per class when `classes` (..., K) is given: the
    static-shape counterpart of torchvision's `ops.nms` / `ops.batched_nms`.

    Returns (indices, mask), each (..., max_output): the kept boxes' indices by decreasing score, then padding rows
    (mask False, index 0). `valid` (..., K): candidates to consider (default all)."""
    k = boxes.shape[-2]
    count = min(max_output, k)
    order = jnp.argsort(-scores, axis=-1, stable=True)
    take = lambda a: jnp.take_along_axis(a, order, axis=-1)  # noqa: E731
    ordered = jnp.take_along_axis(boxes, order[..., None], axis=-2)
    valid = jnp.ones(scores.shape, bool) if valid is None else take(valid)
    keep = greedy_nms_mask(ordered, valid, iou_threshold, None if classes is None else take(classes))
    # the kept candidates first, each group in score order (a stable sort on "not kept")
    rank = jnp.argsort(~keep, axis=-1, stable=True)[..., :count]
    indices = jnp.take_along_axis(order, rank, axis=-1)
    mask = jnp.take_along_axis(keep, rank, axis=-1)
    if count < max_output:
        pad = [(0, 0)] * (indices.ndim - 1) + [(0, max_output - count)]
        indices, mask = jnp.pad(indices, pad), jnp.pad(mask, pad)
    return jnp.where(mask, indices, 0), mask
