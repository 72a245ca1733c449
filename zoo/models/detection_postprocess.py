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
from zoo.layers.nms import greedy_nms_mask


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
    `max_detections` best over all classes, labels counted from `first_label`, padded to a static count."""
    n, a, _ = scores.shape
    k = min(settings.candidates_per_class, a)
    top_scores, top_anchors = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), k)  # (N, C, k), best first
    candidates = boxes[jnp.arange(n)[:, None, None], top_anchors]  # (N, C, k, 4)
    keep = greedy_nms_mask(candidates, top_scores > settings.score_threshold, settings.iou_threshold)
    ranked = jnp.where(keep, top_scores, -jnp.inf).reshape(n, -1)
    count = min(settings.max_detections, ranked.shape[1])
    best, picked = jax.lax.top_k(ranked, count)
    valid = best > -jnp.inf
    rows = jnp.arange(n)[:, None]
    out = {
        "boxes": jnp.where(valid[..., None], candidates.reshape(n, -1, 4)[rows, picked], 0.0),
        "scores": jnp.where(valid, best, 0.0),
        "labels": jnp.where(valid, picked // k + first_label, 0).astype(jnp.int32),
        "valid": valid,
    }
    if count < settings.max_detections:
        out = {key: jnp.pad(v, [(0, 0), (0, settings.max_detections - count)] + [(0, 0)] * (v.ndim - 2))
               for key, v in out.items()}
    return out
