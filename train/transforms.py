"""Per-example transforms: decode, crop, flip, resize and pad an image and move every geometric target with it.

An example is a dict: `image` (a uint8 HxW[xC] array, a PIL image or a path) plus any targets, `label` (int),
`boxes` (N, 4) float x0, y0, x1, y1 in pixels with their `classes` (N,), `mask` (H, W) int. Crops shift, scale and
clip the boxes (a box a crop leaves empty is dropped with its class); masks are cropped, flipped and resized by
nearest neighbour and padded with `MASK_IGNORE`; keys the transform does not know pass through unchanged. Every random
choice is drawn from the numpy Generator the caller seeds, so a transform is deterministic given (seed, step).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from PIL import Image

from train.augment import PHOTOMETRIC_OPS, RANDAUGMENT_OPS, randaugment, rrc_box
from train.box_augment import augment as augment_boxes, check_recipe
from train.data import DataError, channel_message

MASK_IGNORE = 255  # mask value of pixels that carry no label (padding), skipped by segmentation losses
RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
GEOMETRIC_TARGETS = ("boxes", "mask")


def decode(image, channels: int, gray_to_rgb: bool = False) -> Image.Image:
    """A path, PIL image or uint8 array as a PIL image of `channels` channels (1: "L", 3: "RGB")."""
    mode = "RGB" if channels == 3 else "L"
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as img:
            return img.convert(mode)
    if isinstance(image, Image.Image):
        return image.convert(mode)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    have = 1 if arr.ndim == 2 else arr.shape[-1]
    if have != channels and not (have == 1 and channels == 3 and gray_to_rgb):
        raise DataError(channel_message(have, channels))
    return Image.fromarray(arr).convert(mode)


# ---- geometric primitives on a decoded example (PIL image, numpy targets) ----------------------------------------

def crop_resize(ex: dict, box: tuple[float, float, float, float], size: tuple[int, int], resample) -> dict:
    """The region `box` = (left, top, right, bottom) of the image resized to `size` (H, W), targets moved along."""
    left, top, right, bottom = box
    out = {**ex, "image": ex["image"].resize((size[1], size[0]), resample, box=box)}
    if "boxes" in ex:
        out.update(_move_boxes(ex, (left, top), (right - left, bottom - top),
                               (size[1] / (right - left), size[0] / (bottom - top))))
    if "mask" in ex:
        out["mask"] = _mask_op(ex["mask"], lambda m: m.resize((size[1], size[0]), Image.Resampling.NEAREST, box=box))
    return out


def crop(ex: dict, box: tuple[int, int, int, int]) -> dict:
    """The integer window `box` = (left, top, right, bottom) inside the image, without resampling."""
    left, top, right, bottom = box
    out = {**ex, "image": ex["image"].crop(box)}
    if "boxes" in ex:
        out.update(_move_boxes(ex, (left, top), (right - left, bottom - top), (1.0, 1.0)))
    if "mask" in ex:
        out["mask"] = np.ascontiguousarray(ex["mask"][top:bottom, left:right])
    return out


def resize(ex: dict, size: tuple[int, int], resample) -> dict:
    w, h = ex["image"].size
    return crop_resize(ex, (0, 0, w, h), size, resample)


def hflip(ex: dict) -> dict:
    w = ex["image"].size[0]
    out = {**ex, "image": ex["image"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)}
    if "boxes" in ex:
        b = ex["boxes"]
        out["boxes"] = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], -1).astype(np.float32)
    if "mask" in ex:
        out["mask"] = np.ascontiguousarray(ex["mask"][:, ::-1])
    return out


def pad(x: np.ndarray, ex: dict, size: tuple[int, int]) -> tuple[np.ndarray, dict]:
    """Pad the normalized image `x` (with 0, the mean) and the mask (with MASK_IGNORE) at the bottom and right."""
    h, w = x.shape[:2]
    if (h, w) == tuple(size):
        return x, ex
    x = np.pad(x, ((0, size[0] - h), (0, size[1] - w), (0, 0)))
    if "mask" in ex:
        ex = {**ex, "mask": np.pad(ex["mask"], ((0, size[0] - h), (0, size[1] - w)), constant_values=MASK_IGNORE)}
    return x, ex


def center_crop_plan(w: int, h: int, size: tuple[int, int], crop_pct: float) -> tuple[tuple[int, int], tuple]:
    """(resized (W, H), crop window): the arithmetic of `zoo.preprocess.resize_center_crop` (torchvision Resize +
    CenterCrop), so evaluation sees exactly what `zoo.Model.predict` does."""
    scale = math.floor(size[0] / crop_pct) if size[0] == size[1] else None
    if scale is not None:
        new = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    else:
        new = (math.floor(size[1] / crop_pct), math.floor(size[0] / crop_pct))
    top, left = int(round((new[1] - size[0]) / 2.0)), int(round((new[0] - size[1]) / 2.0))
    return new, (left, top, left + size[1], top + size[0])


def _move_boxes(ex: dict, offset, extent, scale) -> dict:
    """Boxes shifted by -offset, clipped to the region of size `extent`, scaled; those left empty are dropped."""
    b = ex["boxes"] - np.asarray([*offset, *offset], np.float32)
    b = np.clip(b, 0.0, np.asarray([*extent, *extent], np.float32)) * np.asarray([*scale, *scale], np.float32)
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    out = {"boxes": b[keep].astype(np.float32)}
    if "classes" in ex:
        out["classes"] = np.asarray(ex["classes"])[keep]
    return out


def _mask_op(mask: np.ndarray, op) -> np.ndarray:
    # mode "I" (int32) so PIL resamples class ids as numbers; NEAREST never invents a class
    return np.asarray(op(Image.fromarray(np.asarray(mask, np.int32))), np.int32)


# ---- the transform ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transform:
    """Decode, (augment,) resize and normalize one example: `transform(example, rng) -> example`.

    Training (`train=True`): random-resized-crop (or a plain resize; or the detection recipe `box_augment` of
    `train.box_augment`, then a resize), horizontal flip, RandAugment (its photometric ops only when the example
    carries boxes or a mask, which the affine ops would not move). Evaluation: `eval_resize`
    "center_crop" (resize and centre crop by `crop_pct`, as `zoo.Model.predict`; 1.0 resizes the whole image) or
    "letterbox" (keep the aspect ratio, fit inside `size`, pad bottom and right). `required` names the targets every
    example must carry. Given a bare image instead of an example, returns the transformed image array.
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    train: bool
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    gray_to_rgb: bool = False
    random_resized_crop: bool = True
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    randaugment_ops: int = 0
    randaugment_magnitude: float = 9.0
    eval_resize: str = "center_crop"
    required: tuple[str, ...] = ()
    box_augment: str = ""  # a recipe of train.box_augment.RECIPES, in place of the random resized crop

    def __post_init__(self):
        if self.eval_resize not in ("center_crop", "letterbox"):
            raise ValueError(f"eval_resize must be 'center_crop' or 'letterbox', not '{self.eval_resize}'")
        if self.interpolation not in RESAMPLE:
            raise ValueError(f"interpolation must be one of {', '.join(RESAMPLE)}, not '{self.interpolation}'")
        if self.box_augment:
            check_recipe(self.box_augment)

    def __call__(self, example, rng: np.random.Generator | None):
        if not isinstance(example, Mapping):
            return self._apply({"image": example}, rng)["image"]
        missing = [k for k in ("image", *self.required) if k not in example]
        if missing:
            raise DataError(f"example has no '{missing[0]}' (it has {', '.join(sorted(example)) or 'nothing'}); "
                            f"this task needs {', '.join(('image', *self.required))} in every example")
        return self._apply(dict(example), rng)

    def _apply(self, ex: dict, rng) -> dict:
        ex = self._decode(ex)
        resample = RESAMPLE[self.interpolation]
        padded_to = None
        if self.train:
            if self.box_augment:  # its IoU crop is the crop; the whole result is resized to the input
                ex = resize(augment_boxes(ex, self.box_augment, rng, fill=self.mean), self.size, resample)
            elif self.random_resized_crop:
                w, h = ex["image"].size
                ex = crop_resize(ex, rrc_box(w, h, rng, self.rrc_scale, self.rrc_ratio), self.size, resample)
            else:
                ex = resize(ex, self.size, resample)
            if self.hflip and rng.random() < 0.5:
                ex = hflip(ex)
            if self.randaugment_ops:
                geometric = any(k in ex for k in GEOMETRIC_TARGETS)
                ops = PHOTOMETRIC_OPS if geometric else tuple(RANDAUGMENT_OPS)
                ex["image"] = randaugment(ex["image"], self.randaugment_ops, self.randaugment_magnitude, rng, ops=ops)
        elif self.eval_resize == "letterbox":
            w, h = ex["image"].size
            s = min(self.size[0] / h, self.size[1] / w)
            ex = resize(ex, (max(1, round(h * s)), max(1, round(w * s))), resample)
            padded_to = self.size
        elif self.crop_pct >= 1.0:
            ex = resize(ex, self.size, resample)
        else:
            new, window = center_crop_plan(*ex["image"].size, self.size, self.crop_pct)
            ex = crop(resize(ex, (new[1], new[0]), resample), window)
        x = np.asarray(ex["image"], np.float32) * (1.0 / 255.0)
        if x.ndim == 2:
            x = x[..., None]
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        if padded_to is not None:
            x, ex = pad(x, ex, padded_to)
        ex["image"] = x
        return ex

    def _decode(self, ex: dict) -> dict:
        ex["image"] = decode(ex["image"], self.channels, self.gray_to_rgb)
        w, h = ex["image"].size
        if "boxes" in ex:
            boxes = np.asarray(ex["boxes"], np.float32).reshape(-1, 4)
            classes = np.asarray(ex.get("classes", np.zeros(len(boxes), np.int32)))
            if "classes" in ex and classes.shape != (len(boxes),):
                raise DataError(f"example has {len(boxes)} boxes but classes of shape {classes.shape}")
            ex["boxes"] = boxes
            if "classes" in ex:
                ex["classes"] = classes.astype(np.int32)
        if "mask" in ex:
            mask = np.asarray(ex["mask"])
            if mask.shape != (h, w):
                raise DataError(f"example mask has shape {mask.shape}, its image is {h}x{w}: a mask holds one "
                                "class id per pixel (H, W)")
            ex["mask"] = mask.astype(np.int32)
        return ex


def transforms_for(data, model_cfg, *, required: tuple[str, ...] = (),
                   eval_resize: str = "center_crop") -> tuple[Transform, Transform]:
    """(train, eval) transforms from a run's `DataConfig` and a model's input settings (`ModelCfg`)."""
    if data.box_augment and "boxes" not in required:
        raise DataError(f"data.box_augment='{data.box_augment}' augments detection data, and this task's examples "
                        "carry no boxes: set data.box_augment='' or train with task.kind=detection")
    train = Transform(size=tuple(model_cfg.input_size), mean=tuple(model_cfg.mean), std=tuple(model_cfg.std),
                      channels=model_cfg.in_chans, train=True,
                      interpolation=data.interpolation or model_cfg.interpolation, crop_pct=model_cfg.crop_pct,
                      gray_to_rgb=data.gray_to_rgb, random_resized_crop=data.random_resized_crop,
                      rrc_scale=tuple(data.rrc_scale), rrc_ratio=tuple(data.rrc_ratio), hflip=data.hflip,
                      randaugment_ops=data.randaugment_ops, randaugment_magnitude=data.randaugment_magnitude,
                      eval_resize=eval_resize, required=tuple(required), box_augment=data.box_augment)
    return train, dataclasses.replace(train, train=False, crop_pct=data.eval_crop_pct or model_cfg.crop_pct)
