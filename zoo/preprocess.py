"""Evaluation preprocessing as the weights' source defines it: resize the short side, center crop, normalize.

Follows timm/torchvision's eval transform on PIL images (resize to floor(size / crop_pct), center crop), so a converted
model sees the same pixels its reference saw.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from zoo.config import ModelCfg

_PIL_INTERP = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def to_pil(image) -> Image.Image:
    """A PIL image from a path, a PIL image, or an HWC/HW uint8 array."""
    if isinstance(image, (str, Path)):
        return Image.open(image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise TypeError(
            f"expected a path, a PIL image or an HxW[xC] uint8 array, got array {arr.dtype} {arr.shape}; "
            "already-normalized float arrays can be passed to the model directly"
        )
    return Image.fromarray(arr).convert("RGB")


def resize_center_crop(img: Image.Image, size: tuple[int, int], crop_pct: float, interpolation: str) -> Image.Image:
    scale = math.floor(size[0] / crop_pct) if size[0] == size[1] else None
    w, h = img.size
    if scale is not None:  # resize the shorter side, keep aspect (torchvision Resize(int))
        if w <= h:
            new = (scale, int(scale * h / w))
        else:
            new = (int(scale * w / h), scale)
    else:
        new = (math.floor(size[1] / crop_pct), math.floor(size[0] / crop_pct))
    img = img.resize(new, _PIL_INTERP[interpolation])
    w, h = img.size
    top = int(round((h - size[0]) / 2.0))
    left = int(round((w - size[1]) / 2.0))
    return img.crop((left, top, left + size[1], top + size[0]))


def preprocess(images, cfg: ModelCfg) -> np.ndarray:
    """Images (paths, PIL images or uint8 arrays, one or a list) -> float32 NHWC batch normalized for `cfg`."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    out = []
    for image in images:
        img = resize_center_crop(to_pil(image), cfg.input_size, cfg.crop_pct, cfg.interpolation)
        x = np.asarray(img, dtype=np.float32) / 255.0
        out.append((x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32))
    return np.stack(out)
