"""SSD's default boxes (Liu et al., "SSD: Single Shot MultiBox Detector", arXiv:1512.02325, Sec. 2.2 "Choosing scales
and aspect ratios for default boxes"), laid out as torchvision's `DefaultBoxGenerator` lays them out.

Map k of m gets scale s_k, linear from `min_ratio` to `max_ratio`, and s_{m+1} = 1. Each location of map k has
2 + 2 * len(aspect_ratios[k]) boxes: (s_k, s_k), (s'_k, s'_k) with s'_k = sqrt(s_k s_{k+1}), then for every ratio r
the pair (s_k sqrt(r), s_k / sqrt(r)) and its transpose. Widths and heights are clipped to [0, 1] of the image, the
centres sit at the middles of the map's cells.

Computed in numpy (a constant of the traced graph), in float32 and in the reference's order of operations, so the
boxes are the reference's to the last bit.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def ssd_scales(num_maps: int, min_ratio: float, max_ratio: float) -> list[float]:
    """s_1 .. s_m spaced linearly from `min_ratio` to `max_ratio`, then 1.0 (what s'_m is taken against)."""
    if num_maps == 1:
        return [min_ratio, max_ratio]
    step = (max_ratio - min_ratio) / (num_maps - 1.0)
    return [min_ratio + step * k for k in range(num_maps)] + [1.0]


def box_sizes(aspect_ratios: Sequence[Sequence[float]], scales: Sequence[float]) -> list[np.ndarray]:
    """Per map, the (width, height) of its boxes relative to the image, in their order at each location (unclipped)."""
    out = []
    for k, ratios in enumerate(aspect_ratios):
        s, s_next = scales[k], scales[k + 1]
        pairs = [(s, s), (math.sqrt(s * s_next),) * 2]
        for r in ratios:
            root = math.sqrt(r)
            pairs += [(s * root, s / root), (s / root, s * root)]
        out.append(np.asarray(pairs, np.float32))
    return out


def boxes_per_location(aspect_ratios: Sequence[Sequence[float]]) -> list[int]:
    return [2 + 2 * len(r) for r in aspect_ratios]


def default_boxes(grid_sizes: Sequence[tuple[int, int]], image_size: tuple[int, int],
                  aspect_ratios: Sequence[Sequence[float]], min_ratio: float, max_ratio: float,
                  clip: bool = True) -> np.ndarray:
    """(A, 4) float32 boxes (x1, y1, x2, y2) in input pixels: per map (`grid_sizes[k]` = its (rows, cols)), per
    location row by row, per box of that location; the order of an SSD head's outputs."""
    if len(grid_sizes) != len(aspect_ratios):
        raise ValueError(f"{len(grid_sizes)} feature maps for {len(aspect_ratios)} sets of aspect ratios")
    sizes = box_sizes(aspect_ratios, ssd_scales(len(aspect_ratios), min_ratio, max_ratio))
    scale = np.asarray([image_size[1], image_size[0]], np.float32)  # (x, y)
    out = []
    for (rows, cols), wh in zip(grid_sizes, sizes):
        cx = (np.arange(cols, dtype=np.float32) + np.float32(0.5)) / np.float32(cols)
        cy = (np.arange(rows, dtype=np.float32) + np.float32(0.5)) / np.float32(rows)
        cy, cx = np.meshgrid(cy, cx, indexing="ij")
        centres = np.stack([cx.ravel(), cy.ravel()], -1)[:, None, :]  # (locations, 1, 2)
        wh = np.clip(wh, 0.0, 1.0) if clip else wh
        half = np.float32(0.5) * wh[None]  # (1, boxes, 2)
        box = np.concatenate([(centres - half) * scale, (centres + half) * scale], -1)
        out.append(box.reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)
