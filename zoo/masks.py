"""Per-pixel class predictions as images: class names, a palette, colour overlays, per-class pixel fractions, and a
mask at the model's input put back onto the photo it was computed from.

A segmentation model sees a photo resized and center-cropped as its `ModelCfg` says (`zoo.preprocess`), so its mask
covers that crop only. `crop_box` is the crop in the photo's own pixels and `to_photo` places the mask there (nearest
neighbour); pixels outside it get `IGNORE` (255, Pascal VOC's "void" label), which overlays leave dimmed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

IGNORE = 255
_BACKGROUND = ("__background__", "background")


def palette(n: int = 256) -> np.ndarray:
    """(n, 3) uint8 colours: Pascal VOC's palette (class bits spread over the high bits of R, G and B), so class k
    has the colour VOC's own masks give it; class 0 is black."""
    k = np.arange(n)
    out = np.zeros((n, 3), np.int64)
    for bit in range(8):
        for c in range(3):
            out[:, c] |= ((k >> (3 * bit + c)) & 1) << (7 - bit)
    return out.astype(np.uint8)


def crop_box(photo_wh: tuple[int, int], cfg) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) in the photo's pixels of what `zoo.preprocess.preprocess(photo, cfg)` keeps:
    `resize_center_crop`'s geometry (short side to size / crop_pct, center crop) mapped back."""
    import math

    w, h = photo_wh
    size_h, size_w = cfg.input_size
    if size_h == size_w:
        scale = math.floor(size_h / cfg.crop_pct)
        new_w, new_h = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    else:
        new_w, new_h = math.floor(size_w / cfg.crop_pct), math.floor(size_h / cfg.crop_pct)
    top, left = int(round((new_h - size_h) / 2.0)), int(round((new_w - size_w) / 2.0))
    sx, sy = w / new_w, h / new_h
    return left * sx, top * sy, (left + size_w) * sx, (top + size_h) * sy


def to_photo(mask: np.ndarray, photo_wh: tuple[int, int], cfg) -> np.ndarray:
    """A (H, W) class mask at the model's input -> (photo height, photo width) uint8, `IGNORE` outside the crop."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or tuple(mask.shape) != tuple(cfg.input_size):
        raise ValueError(f"expected a mask of the model's input size {tuple(cfg.input_size)}, got shape {mask.shape}")
    if mask.min(initial=0) < 0 or mask.max(initial=0) >= IGNORE:
        raise ValueError(f"class indices must lie in 0..{IGNORE - 1} to be stored as a uint8 mask")
    w, h = photo_wh
    left, top, right, bottom = crop_box(photo_wh, cfg)
    # the mask pixel whose cell holds each photo pixel's center
    rows = np.floor(((np.arange(h) + 0.5) - top) * mask.shape[0] / (bottom - top)).astype(np.int64)
    cols = np.floor(((np.arange(w) + 0.5) - left) * mask.shape[1] / (right - left)).astype(np.int64)
    inside = (rows[:, None] >= 0) & (rows[:, None] < mask.shape[0]) & (cols[None] >= 0) & (cols[None] < mask.shape[1])
    out = mask.astype(np.uint8)[np.clip(rows, 0, mask.shape[0] - 1)][:, np.clip(cols, 0, mask.shape[1] - 1)]
    return np.where(inside, out, np.uint8(IGNORE))


def overlay(photo: np.ndarray, mask: np.ndarray, labels=None, alpha: float = 0.5) -> np.ndarray:
    """The photo (H, W, 3 uint8) blended with the palette colour of each pixel's class; the background class (a
    class 0 that `labels` name background) is left as it is, `IGNORE` pixels are dimmed."""
    photo = np.asarray(photo)
    if photo.shape[:2] != np.shape(mask):
        raise ValueError(f"photo {photo.shape[:2]} and mask {np.shape(mask)} differ in size")
    img = photo.astype(np.float32)
    colours = palette()[mask].astype(np.float32)
    tinted = mask != IGNORE
    if labels is not None and len(labels) and labels[0] in _BACKGROUND:
        tinted &= mask != 0
    out = np.where(tinted[..., None], (1 - alpha) * img + alpha * colours, img)
    out = np.where((mask == IGNORE)[..., None], 0.5 * img, out)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def class_fractions(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """The fraction of labelled pixels (not `IGNORE`) in each class, (num_classes,)."""
    mask = np.asarray(mask)
    labelled = mask[mask != IGNORE].astype(np.int64)
    counts = np.bincount(labelled, minlength=num_classes)[:num_classes]
    return counts / max(labelled.size, 1)


def describe(fractions: np.ndarray, labels=None, top_k: int = 5) -> list[tuple[str, float]]:
    """The `top_k` classes by pixel fraction (present ones only) as (name, fraction)."""
    order = [int(i) for i in np.argsort(-fractions, kind="stable")[:top_k] if fractions[i] > 0]
    return [(labels[i] if labels is not None and i < len(labels) else str(i), float(fractions[i])) for i in order]


def save(photo: np.ndarray, mask: np.ndarray, out_dir: str | Path, stem: str, labels=None,
         alpha: float = 0.5) -> tuple[Path, Path]:
    """Write `<stem>_overlay.png` (the photo with its classes' colours) and `<stem>_mask.png` (the class indices as a
    palette PNG: the values are the classes, shown in their palette colours) into `out_dir`."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    overlay_path, mask_path = out_dir / f"{stem}_overlay.png", out_dir / f"{stem}_mask.png"
    Image.fromarray(overlay(photo, mask, labels, alpha)).save(overlay_path)
    mask = np.ascontiguousarray(mask, np.uint8)
    indexed = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
    indexed.putpalette(palette().reshape(-1).tolist())
    indexed.save(mask_path)
    return overlay_path, mask_path
