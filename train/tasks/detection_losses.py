"""Detection losses on assigned targets, batched and under `jax.jit`.

- SSD (Liu et al., arXiv:1512.02325, Sec. 2.2 "Training objective"), as torchvision's `SSD.compute_loss`: smooth-L1
  (beta 1) between the predicted offsets and `encode_boxes` of the matched boxes (weights 10, 10, 5, 5) summed over
  positive anchors; softmax cross-entropy over all classes (0 the background) on the positives and on the hardest
  negatives, three per positive in each image ("hard negative mining"); both divided by the number of positives in
  the batch (at least 1). Unlike torchvision, where an image's positives exceed a quarter of its anchors, positives
  are never counted again among the negatives.
- GFL (Li et al., "Generalized Focal Loss", arXiv:2006.04388), as mmdetection's `GFLHead.loss` and NanoDet's:
  Quality Focal Loss (Sec. 3.2, beta 2) on every location's sigmoid scores, the target of a positive's class being
  the IoU of its predicted box with its assigned box (no gradient through the IoU), divided by the number of
  positives; GIoU loss (Rezatofighi et al., arXiv:1902.09630; weight 2) and Distribution Focal Loss (Sec. 3.3;
  weight 0.25, over the four sides) at the positives, each positive weighted by its highest predicted score, divided
  by the sum of those weights (NanoDet's; mmdetection clamps that sum at 1). DFL's target distances are clipped
  to reg_max - 0.01 strides (mmdetection's `bbox2distance`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from zoo.layers.boxes import SSD_BOX_WEIGHTS, box_area, box_iou, encode_boxes
from zoo.layers.distances import distribution_targets, encode_distances

NEG_TO_POS = 3  # SSD's hard negatives per positive
QFL_BETA = 2.0
GIOU_WEIGHT, DFL_WEIGHT = 2.0, 0.25  # mmdetection's and NanoDet's GFL configs


def smooth_l1(x, beta: float = 1.0):
    """torch's `smooth_l1_loss` per element: 0.5 x^2 / beta where |x| < beta, else |x| - 0.5 beta."""
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def hard_negatives(cls_loss, positive, ratio: int = NEG_TO_POS):
    """(B, A) bool: per image the `ratio` x (its positives) anchors of highest loss among the negatives."""
    negative_loss = jnp.where(positive, -jnp.inf, cls_loss)
    rank = jnp.argsort(jnp.argsort(-negative_loss, axis=1), axis=1)  # 0: the hardest negative
    return (rank < ratio * positive.sum(1, keepdims=True)) & ~positive


def ssd_loss_terms(cls_logits, bbox_regression, anchors, matches, gt_boxes, gt_classes, weight, *,
                   neg_to_pos: int = NEG_TO_POS):
    """SSD's (box loss sum, classification loss sum, positives) of a batch. `matches` (B, A) from `ssd_match`;
    `gt_classes` (B, G) with 0 the background (data class + 1); `weight` (B,) 0 for padded examples."""
    positive = (matches >= 0) & (weight[:, None] > 0)
    index = jnp.maximum(matches, 0)
    matched_boxes = jnp.take_along_axis(gt_boxes, index[..., None], axis=1)  # (B, A, 4)
    # a background anchor's target is its own anchor (finite, masked out): the log of a padded box's 0 size is not
    safe_boxes = jnp.where(positive[..., None], matched_boxes, jnp.asarray(anchors)[None])
    targets = encode_boxes(safe_boxes.astype(jnp.float32), anchors, SSD_BOX_WEIGHTS)
    box_sum = (smooth_l1(bbox_regression.astype(jnp.float32) - targets).sum(-1) * positive).sum()
    labels = jnp.where(positive, jnp.take_along_axis(gt_classes, index, axis=1), 0)
    cls_loss = optax.softmax_cross_entropy_with_integer_labels(cls_logits.astype(jnp.float32), labels)
    counted = positive | (hard_negatives(jax.lax.stop_gradient(cls_loss), positive, neg_to_pos) & (weight[:, None] > 0))
    return box_sum, (cls_loss * counted).sum(), positive.sum().astype(jnp.float32)


def quality_focal_loss(logits, target_class, target_score, beta: float = QFL_BETA):
    """QFL per location (summed over classes): logits (..., C); `target_class` (...) int, -1 for background;
    `target_score` (...) the quality (IoU) the target class's sigmoid is trained towards, the other classes towards 0:
    -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log sigma)."""
    sigma = jax.nn.sigmoid(logits)
    y = jnp.where(jnp.arange(logits.shape[-1]) == target_class[..., None], target_score[..., None], 0.0)
    bce = optax.sigmoid_binary_cross_entropy(logits, y)
    return (bce * jnp.abs(y - sigma) ** beta).sum(-1)


def distribution_focal_loss(logits, distances, reg_max: int):
    """DFL per side: logits (..., reg_max + 1), target distances (...) in strides, clipped to [0, reg_max - 0.01]:
    -((y_{i+1} - y) log S_i + (y - y_i) log S_{i+1}), the cross-entropy against the two-hot target."""
    y = jnp.clip(distances, 0.0, reg_max - 0.01)
    return optax.softmax_cross_entropy(logits, distribution_targets(y, reg_max))


def giou_loss(pred, target, eps: float = 1e-6):
    """1 - GIoU of aligned boxes (..., 4) (Rezatofighi et al., arXiv:1902.09630): 1 - IoU + |C - union| / |C|, C
    the smallest box enclosing both."""
    lo, hi = jnp.maximum(pred[..., :2], target[..., :2]), jnp.minimum(pred[..., 2:], target[..., 2:])
    inter = jnp.prod(jnp.maximum(hi - lo, 0.0), -1)
    union = box_area(pred) + box_area(target) - inter
    iou = inter / jnp.maximum(union, eps)
    enclosing = jnp.prod(jnp.maximum(pred[..., 2:], target[..., 2:]) - jnp.minimum(pred[..., :2], target[..., :2]), -1)
    return 1.0 - (iou - (enclosing - union) / jnp.maximum(enclosing, eps))


def gfl_loss_terms(cls_logits, box_regression, points, strides, assigned, gt_boxes, gt_classes, weight, *,
                   pred_boxes):
    """GFL's (QFL sum, weighted GIoU sum, weighted DFL sum, positives, weight sum) of a batch. `assigned` (B, A)
    from `atss_assign`; `gt_classes` (B, G) data classes; `pred_boxes` (B, A, 4) the decoded predictions."""
    b, a, values = box_regression.shape
    reg_max = values // 4 - 1
    positive = (assigned >= 0) & (weight[:, None] > 0)
    index = jnp.maximum(assigned, 0)
    boxes = jnp.take_along_axis(gt_boxes.astype(jnp.float32), index[..., None], axis=1)  # (B, A, 4)
    classes = jnp.where(positive, jnp.take_along_axis(gt_classes, index, axis=1), -1)
    pred_boxes = pred_boxes.astype(jnp.float32)
    quality = jax.lax.stop_gradient(jnp.nan_to_num(box_iou(pred_boxes, boxes), nan=0.0))
    logits = cls_logits.astype(jnp.float32)
    qfl = (quality_focal_loss(logits, classes, jnp.where(positive, quality, 0.0)) * (weight[:, None] > 0)).sum()
    box_weight = jnp.where(positive, jax.lax.stop_gradient(jax.nn.sigmoid(logits).max(-1)), 0.0)
    giou = (giou_loss(pred_boxes, boxes) * box_weight).sum()
    distances = encode_distances(boxes, points, strides)  # (B, A, 4) in strides
    dfl = distribution_focal_loss(box_regression.astype(jnp.float32).reshape(b, a, 4, reg_max + 1), distances,
                                  reg_max)
    dfl = (dfl.sum(-1) * box_weight).sum() / 4.0  # mmdetection: the four sides averaged (avg_factor 4)
    return qfl, giou, dfl, positive.sum().astype(jnp.float32), box_weight.sum()
