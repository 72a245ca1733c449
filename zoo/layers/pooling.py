"""Average pooling at stride 1 that leaves the padding out of the count (PyTorch's
`AvgPool2d(k, stride=1, padding=k // 2, count_include_pad=False)`): the token mixer of PoolFormer (Yu et al.,
arXiv:2111.11418) and of EfficientFormer's 4-D blocks (arXiv:2206.01191).

Every output is the mean of the input pixels its window covers: for 3x3, nine inside the map, six on an edge, four
in a corner. It is written as a zero pad, sums of shifted slices (the rows of the window, then its columns) and a
product with the reciprocal counts, a constant (1, H, W, 1) map computed in numpy. Why not `flax.linen.avg_pool(...,
count_include_pad=False)`: its reduce_window pair converts to one AVERAGE_POOL_2D with SAME padding, which also
leaves the padding out and matches in fp32, but LiteRT's XNNPACK delegate does not take AVERAGE_POOL_2D in int8 (each
one splits the delegated graph); PAD, SLICE, ADD and MUL stay in one XNNPACK partition in fp32 and int8 alike. No
convolution either: a fixed box filter would add its multiply-adds to the jaxpr's MAC count, where the reference
counts pooling as none.
"""

from __future__ import annotations

import functools
import operator

import jax.numpy as jnp
import numpy as np


def window_counts(size: int, window: int) -> np.ndarray:
    """How many of the `window` positions centred on each of `size` positions lie inside [0, size)."""
    half = window // 2
    i = np.arange(size)
    return np.minimum(i + half, size - 1) - np.maximum(i - half, 0) + 1


def avg_pool_excluding_padding(x, window: int = 3):
    """Mean over the `window` x `window` neighbourhood of every pixel of an NHWC map, at stride 1 (same size out),
    dividing by the number of pixels inside the map."""
    if window < 1 or window % 2 != 1:
        raise ValueError(f"avg_pool_excluding_padding takes an odd window (the output keeps the input size), got "
                         f"{window}")
    if x.ndim != 4:
        raise ValueError(f"avg_pool_excluding_padding takes an NHWC map, got shape {x.shape}")
    _, h, w, _ = x.shape
    half = window // 2
    padded = jnp.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
    rows = functools.reduce(operator.add, (padded[:, i:i + h] for i in range(window)))
    total = functools.reduce(operator.add, (rows[:, :, j:j + w] for j in range(window)))
    reciprocal = 1.0 / np.outer(window_counts(h, window), window_counts(w, window))
    return total * jnp.asarray(reciprocal[None, :, :, None], x.dtype)
