"""Detections from an anchor-based detector's raw outputs (SSD, Liu et al., arXiv:1512.02325, Sec. 3.7 "Inference
time"), with static shapes so that it runs under `jax.jit`.

The raw outputs are a detection model's `module.apply(v, x)`: `{"cls_logits": (N, A, C), "bbox_regression": (N, A,
4)}`, class 0 the background, one row per anchor. Per image: boxes decoded from the anchors and clipped to the image,
softmax scores; per class, the `candidates_per_class` best anchors scoring above `score_threshold`; greedy NMS within
each class; the `max_detections` best survivors over all classes. That is torchvision's `SSD.postprocess_detections`,
its data-dependent counts replaced by fixed sizes and a validity mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from zoo.layers.boxes import SSD_BOX_WEIGHTS, clip_boxes, decode_boxes
from zoo.layers.nms import greedy_nms_ordered


@dataclass(frozen=True)
class DetectionSettings:
    """Post-processing settings (the defaults are torchvision's for SSDLite)."""

    score_threshold: float = 0.001
    candidates_per_class: int = 300
    iou_threshold: float = 0.55
    max_detections: int = 300
    box_weights: tuple[float, float, float, float] = SSD_BOX_WEIGHTS


def detections(outputs, anchors: np.ndarray, image_size: tuple[int, int],
               settings: DetectionSettings = DetectionSettings()) -> dict:
    """Raw outputs and the (A, 4) anchors in input pixels -> per image `max_detections` rows by decreasing score:
    `boxes` (N, D, 4) (x1, y1, x2, y2) in input pixels, `scores` (N, D), `labels` (N, D) int32 (1..C-1) and
    `valid` (N, D) bool; rows past the detections found are zeros and not valid."""
    logits, codes = outputs["cls_logits"], outputs["bbox_regression"]
    n, a, c = logits.shape
    if codes.shape != (n, a, 4) or anchors.shape != (a, 4):
        raise ValueError(f"{a} anchors' class logits {logits.shape} need box offsets ({n}, {a}, 4) and anchors "
                         f"({a}, 4); got {codes.shape} and {anchors.shape}")
    boxes = clip_boxes(decode_boxes(codes.astype(jnp.float32), anchors, settings.box_weights), image_size)
    scores = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:]  # the background is no detection
    return select_per_class(boxes, scores, settings, first_label=1)


def select_per_class(boxes, scores, settings, first_label: int = 0) -> dict:
    """Boxes (N, A, 4) and per-class scores (N, A, C) -> the detection rows (see `detections`): per class the
    `candidates_per_class` best above `score_threshold`, greedy NMS at `iou_threshold` within the class, then the
    `max_detections` best over all classes, labels counted from `first_label`, padded to a static count.

    The classes' candidates are visited in one order by score, each suppressed only by kept boxes of its class, and
    the visit stops at the `max_detections`-th survivor (`zoo.layers.nms`): the same rows as NMS class by class, at a
    cost that follows the candidates scoring above the threshold."""
    n, a, c = scores.shape
    k = min(settings.candidates_per_class, a)
    top_scores, top_anchors = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), k)  # (N, C, k), best first
    candidates = boxes[jnp.arange(n)[:, None, None], top_anchors].reshape(n, c * k, 4)
    # every class's candidates in one order by score (ties: class-major, as the per-class ranks are); a score
    # threshold on sorted scores leaves the valid ones first, as `greedy_nms_ordered` needs
    ordered_scores, order = jax.lax.top_k(top_scores.reshape(n, c * k), c * k)
    rows = jnp.arange(n)[:, None]
    kept, valid = greedy_nms_ordered(candidates[rows, order], ordered_scores > settings.score_threshold,
                                     settings.iou_threshold, settings.max_detections, classes=order // k)
    picked = order[rows, kept]
    return {
        "boxes": jnp.where(valid[..., None], candidates[rows, picked], 0.0),
        "scores": jnp.where(valid, ordered_scores[rows, kept], 0.0),
        "labels": jnp.where(valid, picked // k + first_label, 0).astype(jnp.int32),
        "valid": valid,
    }
