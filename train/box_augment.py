"""The detection augmentations of SSD (Liu et al., arXiv:1512.02325, sec. 2.2 "Data augmentation" and sec. 3.6's
zoom-out "expansion"), sampled by the rules of torchvision's detection reference (`references/detection/transforms.py`:
RandomPhotometricDistort, RandomZoomOut, RandomIoUCrop; its "ssd" preset applies them in that order).

Each step takes an example, `image` (a PIL image or an HxW[xC] array, uint8 or float in [0, 1]) with `boxes` (M, 4)
x0, y0, x1, y1 in pixels and their `classes`, and the caller's numpy Generator; it returns a new example whose image
is of the kind it was given. `augment` runs a named recipe of `RECIPES`; `train.transforms.Transform` calls it on
training examples (`data.box_augment`) before resizing to the input size.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from train.data import DataError

# the minimum IoU of the crop with some box, drawn uniformly per round; None keeps the whole image (SSD: "use the
# entire original input image", torchvision's option 1.0)
IOU_OPTIONS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, None)
_GRAY = np.asarray([0.2989, 0.587, 0.114], np.float32)  # torchvision's rgb_to_grayscale weights


def _as_array(image):
    """(image as an (H, W, C) array, its value bound: 255 for integers, 1 for floats, and the function that turns an
    array of that layout back into the kind of image given)."""
    pil = isinstance(image, Image.Image)
    arr = np.asarray(image)
    flat = arr.ndim == 2

    def back(a):
        a = a[..., 0] if flat else a
        return Image.fromarray(np.ascontiguousarray(a)) if pil else a

    if np.issubdtype(arr.dtype, np.floating) and arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"a float image holds values in [0, 1], this one [{arr.min():g}, {arr.max():g}]")
    return (arr[..., None] if flat else arr), (1.0 if np.issubdtype(arr.dtype, np.floating) else 255.0), back


def _box_iou(boxes: np.ndarray, window) -> np.ndarray:
    left, top, right, bottom = window
    iw = np.clip(np.minimum(boxes[:, 2], right) - np.maximum(boxes[:, 0], left), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], bottom) - np.maximum(boxes[:, 1], top), 0, None)
    inter = iw * ih
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + (right - left) * (bottom - top) - inter)


def iou_crop(ex: dict, rng: np.random.Generator, *, scale=(0.3, 1.0), ratio=(0.5, 2.0), options=IOU_OPTIONS,
             trials: int = 40) -> dict:
    """A crop of each side `scale` of the image's and aspect ratio (w / h) within `ratio` in which some box whose
    centre it contains has IoU >= a minimum drawn from `options`; those boxes are kept, clipped to the crop.

    Per round a minimum is drawn (None: the example is returned as it is); `trials` crops are sampled for it, and when
    none qualifies a new round draws again (so `options` without None and a minimum no crop meets would never end, as
    in torchvision). A qualifying crop holds a box's centre, so boxes never all vanish; an example without boxes is
    returned as it is (no crop can qualify)."""
    boxes = np.asarray(ex["boxes"], np.float32).reshape(-1, 4)
    if not len(boxes):
        return ex
    arr, _, back = _as_array(ex["image"])
    h, w = arr.shape[:2]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    while True:
        minimum = options[int(rng.integers(len(options)))]
        if minimum is None:
            return ex
        for _ in range(trials):
            sw, sh = scale[0] + (scale[1] - scale[0]) * rng.random(2)
            cw, ch = int(w * sw), int(h * sh)
            if cw == 0 or ch == 0 or not ratio[0] <= cw / ch <= ratio[1]:
                continue
            u = rng.random(2)
            left, top = int((w - cw) * u[0]), int((h - ch) * u[1])
            right, bottom = left + cw, top + ch
            inside = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
            if not inside.any() or _box_iou(boxes[inside], (left, top, right, bottom)).max() < minimum:
                continue
            kept = np.clip(boxes[inside] - np.float32([left, top, left, top]), 0, np.float32([cw, ch, cw, ch]))
            out = {**ex, "image": back(arr[top:bottom, left:right]), "boxes": kept.astype(np.float32)}
            if "classes" in ex:
                out["classes"] = np.asarray(ex["classes"])[inside]
            return out


def zoom_out(ex: dict, rng: np.random.Generator, fill, *, side=(1.0, 4.0), p: float = 0.5) -> dict:
    """With probability `p`, the image placed at a random position on a canvas `side` times its size (one factor for
    both sides), filled with the colour `fill` (per channel, in [0, 1]); boxes shift by the offset."""
    if rng.random() >= p:
        return ex
    arr, bound, back = _as_array(ex["image"])
    h, w, c = arr.shape
    r = side[0] + (side[1] - side[0]) * rng.random()
    cw, ch = int(w * r), int(h * r)
    u = rng.random(2)
    left, top = int((cw - w) * u[0]), int((ch - h) * u[1])
    colour = np.asarray(fill, np.float64).reshape(-1)
    colour = np.broadcast_to((colour @ _GRAY if c == 1 and colour.size == 3 else colour) * bound, (c,))
    canvas = np.empty((ch, cw, c), arr.dtype)
    canvas[...] = np.round(colour) if bound == 255.0 else colour
    canvas[top:top + h, left:left + w] = arr
    boxes = np.asarray(ex["boxes"], np.float32).reshape(-1, 4) + np.float32([left, top, left, top])
    return {**ex, "image": back(canvas), "boxes": boxes}


def _gray(x: np.ndarray) -> np.ndarray:
    return x[..., 0] if x.shape[-1] == 1 else x @ _GRAY


def _shift_hue(x: np.ndarray, shift: float) -> np.ndarray:
    """RGB in [0, 1] with the hue (HSV, in turns) moved by `shift`; grays stay gray. HSV back to RGB by the closed
    form: channel n in (5, 3, 1) of R, G, B is V - (V - min) * clip(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = np.maximum(np.maximum(r, g), b)  # (not x.max(-1): numpy reduces a last axis of 3 slowly)
    delta = v - np.minimum(np.minimum(r, g), b)
    d = np.maximum(delta, np.float32(1e-12))  # a gray pixel has delta 0: any hue, it stays gray
    sextant = np.where(r == v, (g - b) / d, np.where(g == v, 2 + (b - r) / d, 4 + (r - g) / d))
    k = sextant[..., None] + np.float32(6 * shift) + np.float32([5, 3, 1])
    k -= 6 * np.floor(k * np.float32(1 / 6))  # mod 6
    return v[..., None] - delta[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def photometric_distort(ex: dict, rng: np.random.Generator, *, brightness=(0.875, 1.125), contrast=(0.5, 1.5),
                        saturation=(0.5, 1.5), hue=(-0.05, 0.05), p: float = 0.5) -> dict:
    """Brightness, contrast (before or after the colour steps, evenly), saturation, hue and a permutation of the
    channels, each with probability `p`, factors uniform in their ranges; the boxes are left as they are. Saturation
    and hue leave a 1-channel image unchanged."""
    # one uniform per step, drawn together as torchvision does; "order" puts contrast before or after the colour steps
    u = dict(zip(("brightness", "order", "contrast_early", "saturation", "hue", "contrast_late", "permute"),
                 rng.random(7)))
    early = u["order"] < 0.5
    steps = ("brightness", "contrast_early" if early else None, "saturation", "hue", None if early else "contrast_late",
             "permute")
    steps = [name for name in steps if name and u[name] < p]
    if not steps:
        return ex
    arr, bound, back = _as_array(ex["image"])
    x = arr.astype(np.float32) / np.float32(bound)
    color = x.shape[-1] == 3
    for name in steps:
        if name == "brightness":
            x = np.clip(x * rng.uniform(*brightness), 0, 1)
        elif name.startswith("contrast"):
            f = rng.uniform(*contrast)
            x = np.clip(f * x + (1 - f) * _gray(x).mean(), 0, 1)
        elif name == "saturation":
            f = rng.uniform(*saturation)
            x = np.clip(f * x + (1 - f) * _gray(x)[..., None], 0, 1) if color else x
        elif name == "hue":
            shift = rng.uniform(*hue)
            x = _shift_hue(x, shift) if color else x
        else:
            x = x[..., rng.permutation(x.shape[-1])]
    out = np.rint(x * bound).astype(arr.dtype) if bound == 255.0 else x.astype(arr.dtype)
    return {**ex, "image": back(out)}


# recipes of `data.box_augment`: steps in order, each (example, rng, fill) -> example
_STEPS = {"photometric": lambda ex, rng, fill: photometric_distort(ex, rng),
          "zoom_out": zoom_out,
          "iou_crop": lambda ex, rng, fill: iou_crop(ex, rng)}
RECIPES = {"ssd": ("photometric", "zoom_out", "iou_crop")}  # torchvision's "ssd" preset, before its flip


def check_recipe(name: str) -> None:
    if name not in RECIPES:
        raise ValueError(f"box_augment must be '' (off) or one of {', '.join(RECIPES)}, not '{name}'")


def augment(ex: dict, recipe: str, rng: np.random.Generator, *, fill) -> dict:
    """The steps of `RECIPES[recipe]` applied to a detection example; `fill` is the zoom-out canvas colour (the
    normalization mean, in [0, 1], so that the canvas normalizes to about 0, as padding does)."""
    check_recipe(recipe)
    if "boxes" not in ex or "mask" in ex:
        has = ", ".join(sorted(ex)) or "nothing"
        raise DataError(f"box_augment='{recipe}' moves boxes with the image, and this example has "
                        f"{'a mask it would not move' if 'mask' in ex else 'no boxes'} (it has {has}): use it with "
                        "detection data (task.kind=detection), or set data.box_augment=''")
    for step in RECIPES[recipe]:
        ex = _STEPS[step](ex, rng, fill)
    return ex
