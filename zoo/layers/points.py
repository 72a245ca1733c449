"""The locations an anchor-free detector predicts at: one per cell of each feature map it reads (FCOS, Tian et al.,
"FCOS: Fully Convolutional One-Stage Object Detection", arXiv:1904.01355, Sec. 3.1), in input pixels.

Every downsampling of the zoo's backbones and necks is a stride-2 conv padded by (kernel - 1) / 2 (or TF's SAME),
which gives ceil(size / 2); the map at stride s of an H x W input is then ceil(H / s) x ceil(W / s). A location sits
at its cell's centre, ((col + 0.5) s, (row + 0.5) s): FCOS's (floor(s / 2) + col s, ...) for the even strides used.

Computed in numpy (a constant of the traced graph), like SSD's default boxes (`zoo.layers.anchors`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def level_sizes(image_size: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int]]:
    """(rows, cols) of the map at each stride for an input of `image_size` (height, width)."""
    h, w = image_size
    return [(-(-h // s), -(-w // s)) for s in strides]


def points(image_size: tuple[int, int], strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The (A, 2) float32 centres (x, y) in input pixels and the (A,) float32 stride of each location: level by level
    in the order of `strides`, row by row within a level (the order of an anchor-free head's outputs)."""
    centres, level_strides = [], []
    for (rows, cols), s in zip(level_sizes(image_size, strides), strides):
        cy, cx = np.meshgrid((np.arange(rows) + 0.5) * s, (np.arange(cols) + 0.5) * s, indexing="ij")
        centres.append(np.stack([cx.ravel(), cy.ravel()], -1))
        level_strides.append(np.full(rows * cols, s))
    return np.concatenate(centres).astype(np.float32), np.concatenate(level_strides).astype(np.float32)
