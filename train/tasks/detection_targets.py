"""Which ground-truth box each anchor (SSD) or location (anchor-free) learns, per image, under `jax.jit`.

Ground truth comes padded to a static count: `gt_boxes` (G, 4) x1, y1, x2, y2 in input pixels and `gt_valid` (G,)
bool. Both assigners return (A,) int32: the index of the box an anchor or location is assigned, -1 for background.
Padded boxes are never assigned; an image without boxes is all background. `jax.vmap` them over a batch.

- `ssd_match`: torchvision's `SSDMatcher` (its `det_utils.Matcher` with one threshold): every anchor takes the box it
  overlaps most if that IoU is >= `iou_threshold` (0.5, SSD's, Liu et al., arXiv:1512.02325, Sec. 2.2 "Matching
  strategy"), and every box's best anchor is forced to it whatever the IoU. Where two boxes force the same anchor the
  later box keeps it (torchvision's assignment in box order).
- `atss_assign`: Adaptive Training Sample Selection (Zhang et al., "Bridging the Gap Between Anchor-based and
  Anchor-free Detection via Adaptive Training Sample Selection", arXiv:1912.02424, Algorithm 1), as mmdetection's
  `ATSSAssigner`: per box, the `topk` locations of each level nearest to its centre are candidates; the IoU threshold
  is the candidates' mean + standard deviation (unbiased, torch's `std`); a candidate is positive when its IoU reaches
  the threshold and its centre lies inside the box (by more than 0.01 px, mmdetection's `eps`); a location positive
  for several boxes takes the one of highest IoU. The IoU is that of the location's square anchor, `anchor_scale` x
  its stride wide (GFL's and NanoDet's `octave_base_scale`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zoo.layers.boxes import box_iou

INSIDE_EPS = 0.01  # mmdetection's ATSSAssigner: a centre at least this far inside every side


def pairwise_iou(anchors, gt_boxes, gt_valid):
    """(A, G) IoU of every anchor with every box; -1 against padded boxes (below any threshold, never a best)."""
    iou = box_iou(anchors[:, None, :], gt_boxes[None, :, :])
    return jnp.where(gt_valid[None, :], jnp.nan_to_num(iou, nan=0.0), -1.0)


def ssd_match(anchors, gt_boxes, gt_valid, iou_threshold: float = 0.5):
    """Anchors (A, 4) -> (A,) index of the matched box, -1 for background (see the module doc)."""
    iou = pairwise_iou(jnp.asarray(anchors, jnp.float32), gt_boxes.astype(jnp.float32), gt_valid)
    best_gt = jnp.argmax(iou, axis=1)
    matches = jnp.where(jnp.max(iou, axis=1) >= iou_threshold, best_gt, -1)
    # every box's best anchor is forced to it; where several boxes pick one anchor the last of them keeps it
    best_anchor = jnp.argmax(iou, axis=0)  # (G,)
    forced = (jnp.arange(iou.shape[0])[:, None] == best_anchor[None, :]) & gt_valid[None, :]
    forced_gt = jnp.max(jnp.where(forced, jnp.arange(iou.shape[1])[None, :], -1), axis=1)
    return jnp.where(forced_gt >= 0, forced_gt, matches).astype(jnp.int32)


def level_slices(strides: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each level's run of locations in `strides` (levels in the order of the outputs)."""
    strides = np.asarray(strides)
    starts = [0, *(np.flatnonzero(np.diff(strides)) + 1).tolist()]
    return list(zip(starts, [*starts[1:], len(strides)]))


def square_anchors(points, strides, anchor_scale: float):
    """(A, 4) squares `anchor_scale` x stride wide centred on the locations (what ATSS measures IoU with)."""
    half = 0.5 * anchor_scale * jnp.asarray(strides, jnp.float32)[:, None]
    p = jnp.asarray(points, jnp.float32)
    return jnp.concatenate([p - half, p + half], -1)


def atss_assign(points: np.ndarray, strides: np.ndarray, gt_boxes, gt_valid, *, topk: int = 9,
                anchor_scale: float = 5.0):
    """Locations (A, 2) (x, y) with their (A,) strides, level by level -> (A,) index of the assigned box, -1 for
    background (see the module doc). `points` and `strides` are numpy constants (the levels are static)."""
    gt_boxes = gt_boxes.astype(jnp.float32)
    a, g = len(points), gt_boxes.shape[0]
    iou = pairwise_iou(square_anchors(points, strides, anchor_scale), gt_boxes, gt_valid)  # (A, G)
    centres = 0.5 * (gt_boxes[:, :2] + gt_boxes[:, 2:])
    p = jnp.asarray(points, jnp.float32)
    distance = jnp.sqrt(((p[:, None, :] - centres[None, :, :]) ** 2).sum(-1))  # (A, G)
    candidate = jnp.zeros((a, g), bool)
    for start, stop in level_slices(strides):
        k = min(topk, stop - start)
        _, nearest = jax.lax.top_k(-distance[start:stop].T, k)  # (G, k) per box, its level's k nearest
        candidate = candidate.at[start + nearest.T, jnp.arange(g)[None, :]].set(True)
    n = candidate.sum(0)  # candidates per box
    mean = jnp.where(candidate, iou, 0.0).sum(0) / n
    std = jnp.sqrt(jnp.where(candidate, (iou - mean) ** 2, 0.0).sum(0) / jnp.maximum(n - 1, 1))
    inside = jnp.minimum(jnp.minimum(p[:, None, 0] - gt_boxes[None, :, 0], p[:, None, 1] - gt_boxes[None, :, 1]),
                         jnp.minimum(gt_boxes[None, :, 2] - p[:, None, 0], gt_boxes[None, :, 3] - p[:, None, 1]))
    positive = candidate & (iou >= (mean + std)[None, :]) & (inside > INSIDE_EPS) & gt_valid[None, :]
    ranked = jnp.where(positive, iou, -jnp.inf)
    return jnp.where(positive.any(1), jnp.argmax(ranked, axis=1), -1).astype(jnp.int32)
