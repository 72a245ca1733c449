"""Detections from an anchor-free detector's raw outputs, with static shapes so that it runs under `jax.jit`.

The raw outputs are `{"cls_logits": (N, A, C), "box_regression": (N, A, 4 * (reg_max + 1))}` at the A locations of
`zoo.layers.points.points` (`zoo.layers.gfl_head.GFLHead`): a sigmoid score per class and no background class, and
per side (l, t, r, b) the logits of a distribution over 0..reg_max strides (GFL, Li et al., arXiv:2006.04388,
Sec. 3.3). Per image: each distance is its distribution's expectation, the box is decoded around its location and
clipped to the image; then, as for SSD (`zoo.models.detection_postprocess`; Liu et al., arXiv:1512.02325, Sec. 3.7),
per class the `candidates_per_class` best locations scoring above `score_threshold`, greedy NMS within each class,
and the `max_detections` best survivors over all classes. The defaults are GFL's and NanoDet-Plus's test settings
(score 0.05, IoU 0.6, 100 detections).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from zoo.layers.boxes import clip_boxes
from zoo.layers.distances import decode_distances, distribution_integral
from zoo.models.detection_postprocess import select_per_class


@dataclass(frozen=True)
class AnchorFreeSettings:
    score_threshold: float = 0.05
    candidates_per_class: int = 100
    iou_threshold: float = 0.6
    max_detections: int = 100


def decode(box_regression, points: np.ndarray, strides: np.ndarray):
    """Raw box outputs (N, A, 4 * (reg_max + 1)) -> boxes (N, A, 4) (x1, y1, x2, y2) in input pixels (unclipped)."""
    n, a, values = box_regression.shape
    if values % 4 or values < 8 or points.shape != (a, 2) or strides.shape != (a,):
        raise ValueError(f"box outputs {box_regression.shape} need 4 distributions of >= 2 bins per location and "
                         f"({a}, 2) points with ({a},) strides; got {points.shape} and {strides.shape}")
    distances = distribution_integral(box_regression.reshape(n, a, 4, values // 4))
    return decode_distances(distances, points, strides)


def detections(outputs, points: np.ndarray, strides: np.ndarray, image_size: tuple[int, int],
               settings: AnchorFreeSettings = AnchorFreeSettings()) -> dict:
    """Raw outputs, the (A, 2) locations (x, y) in input pixels and their (A,) strides -> per image `max_detections`
    rows by decreasing score: `boxes` (N, D, 4) (x1, y1, x2, y2) in input pixels, `scores` (N, D), `labels` (N, D)
    int32 (0..C-1: no background class) and `valid` (N, D) bool; rows past the detections found are zeros and not
    valid (the format of `zoo.models.detection_postprocess.detections`)."""
    logits = outputs["cls_logits"]
    boxes = clip_boxes(decode(outputs["box_regression"].astype(jnp.float32), points, strides), image_size)
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    return select_per_class(boxes, scores, settings)
