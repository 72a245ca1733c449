"""Greedy non-maximum suppression with static shapes, so that it runs under `jax.jit` and exports.

Greedy NMS (as in SSD, Liu et al., arXiv:1512.02325, Sec. 3.7 "Inference time"): visit boxes by decreasing score,
keep a box unless a kept box of the same class overlaps it by IoU > threshold. The data-dependent set of survivors
becomes a fixed number of output rows with a validity mask.

The visit is a `while_loop` over the candidates in score order that stops once `max_kept` boxes are kept or the
valid candidates run out, and each step compares one candidate with the (at most `max_kept`) boxes kept so far, not
with every other candidate. Its cost therefore follows the candidates an image really has: an SSD's per-class NMS over
90 classes x 300 candidates visited all 300 ranks of every class with a 27,000-box overlap each (8.1M IoUs, ~0.5 s in
LiteRT's loop at 1 thread on an AMD EPYC core, whatever the image); visiting the 27,000 in one global order costs 300
IoUs per visited candidate and stops at the 300th survivor. Per-class suppression in one global order keeps exactly
the boxes per-class greedy NMS keeps (a box's fate depends only on the higher-scoring boxes of its class), and
stopping at the `max_kept`-th survivor keeps exactly the `max_kept` best of them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zoo.layers.boxes import box_iou


def greedy_nms_ordered(boxes, valid, iou_threshold: float, max_kept: int, classes=None):
    """Greedy NMS over candidates already ordered by decreasing score: `boxes` (..., K, 4), `valid` (..., K) (the
    candidates taking part; the valid ones must come first, as they do when validity is a score threshold on sorted
    scores), `classes` (..., K) (only boxes of the same class suppress each other; None: all of them do).

    Returns (indices, mask), each (..., max_kept): the positions of the kept candidates in visiting order, then padding
    rows (mask False, index 0)."""
    lead, k = boxes.shape[:-2], boxes.shape[-2]
    b = 1
    for d in lead:
        b *= d
    boxes = boxes.reshape(b, k, 4)
    valid = valid.reshape(b, k)
    classes = jnp.zeros((b, k), jnp.int32) if classes is None else classes.reshape(b, k).astype(jnp.int32)
    slots = jnp.arange(max_kept)

    def more(state):
        i, count = state[0], state[1]
        here = jax.lax.dynamic_index_in_dim(valid, jnp.minimum(i, k - 1), axis=1, keepdims=False)
        return (i < k) & jnp.any(here & (count < max_kept))

    def visit(state):
        i, count, kept, kept_boxes, kept_classes = state
        box = jax.lax.dynamic_slice_in_dim(boxes, i, 1, axis=1)  # (B, 1, 4)
        cls = jax.lax.dynamic_slice_in_dim(classes, i, 1, axis=1)  # (B, 1)
        ok = jax.lax.dynamic_index_in_dim(valid, i, axis=1, keepdims=False) & (count < max_kept)
        overlap = (box_iou(box, kept_boxes) > iou_threshold) & (kept_classes == cls) & (slots < count[:, None])
        take = ok & ~jnp.any(overlap, axis=1)
        # selections, not `.at[...].set(...)`: a scatter has no LiteRT kernel (the converter keeps STABLEHLO_SCATTER)
        write = take[:, None] & (slots == count[:, None])
        kept = jnp.where(write, i, kept)
        kept_boxes = jnp.where(write[..., None], box, kept_boxes)
        kept_classes = jnp.where(write, cls, kept_classes)
        return i + 1, count + take.astype(jnp.int32), kept, kept_boxes, kept_classes

    start = (jnp.int32(0), jnp.zeros((b,), jnp.int32), jnp.zeros((b, max_kept), jnp.int32),
             jnp.zeros((b, max_kept, 4), boxes.dtype), jnp.zeros((b, max_kept), jnp.int32))
    _, count, kept, _, _ = jax.lax.while_loop(more, visit, start)
    mask = slots < count[:, None]
    return kept.reshape(*lead, max_kept), mask.reshape(*lead, max_kept)


def nms(boxes, scores, iou_threshold: float, max_output: int, classes=None, valid=None):
    """Greedy NMS of `boxes` (..., K, 4) with `scores` (..., K), per class when `classes` (..., K) is given: the
    static-shape counterpart of torchvision's `ops.nms` / `ops.batched_nms`.

    Returns (indices, mask), each (..., max_output): the kept boxes' indices by decreasing score, then padding rows
    (mask False, index 0). `valid` (..., K): candidates to consider (default all)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    take = lambda a: jnp.take_along_axis(a, order, axis=-1)  # noqa: E731
    ordered = jnp.take_along_axis(boxes, order[..., None], axis=-2)
    valid = jnp.ones(scores.shape, bool) if valid is None else take(valid)
    # the valid candidates first, each group in score order (a stable sort on "not valid")
    first = jnp.argsort(~valid, axis=-1, stable=True)
    order = jnp.take_along_axis(order, first, axis=-1)
    ordered = jnp.take_along_axis(ordered, first[..., None], axis=-2)
    valid = jnp.take_along_axis(valid, first, axis=-1)
    kept, mask = greedy_nms_ordered(ordered, valid, iou_threshold, max_output,
                                    None if classes is None else jnp.take_along_axis(classes, order, axis=-1))
    return jnp.where(mask, jnp.take_along_axis(order, kept, axis=-1), 0), mask
