"""Random square crops of the skimage photos (the `photos` fixture) that the export tests verify and calibrate on."""

from __future__ import annotations

import numpy as np

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


def photo_crops(photos, seed: int, per_photo: int, lo: float = 0.5) -> tuple[list[np.ndarray], np.ndarray]:
    """`per_photo` crops of each photo in `PHOTOS` (sides of `lo`-100% of its short side, half flipped) and the
    index of the photo each came from."""
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for k, name in enumerate(PHOTOS):
        img = photos[name]
        h, w = img.shape[:2]
        for _ in range(per_photo):
            s = int(rng.uniform(lo, 1.0) * min(h, w))
            y0, x0 = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            crop = img[y0:y0 + s, x0:x0 + s]
            out.append(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop))
            labels.append(k)
    return out, np.asarray(labels)
