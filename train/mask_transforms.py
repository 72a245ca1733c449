"""Per-example transforms of segmentation examples (`image` + `mask`): reading masks, checking them, and the geometric
augmentation of torchvision's segmentation reference, with the mask moved along with the image.

Training follows `references/segmentation/presets.py` (`SegmentationPresetTrain`): a random resize of the shorter side
to `base_size` times a factor drawn from `scale_range` (0.5-2.0 there), a horizontal flip with probability 0.5, then a
random crop of `crop_size`, the mask padded with the ignore index (255) where the resized image is smaller than the crop
(torchvision pads the image with black; here with the mean, 0 after normalization, as the letterbox of
`train.transforms`). Evaluation resizes to the model's input size (torchvision resizes the shorter side and evaluates
at a batch of one; static batches need one size). The image resamples with the run's interpolation (bilinear for the
zoo's segmentation models), the mask by nearest neighbour, so no class id is invented. Every random choice is drawn
from the numpy Generator the caller seeds: deterministic given (seed, step).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from PIL import Image

from train.augment import PHOTOMETRIC_OPS, randaugment
from train.data import DataError
from train.transforms import MASK_IGNORE, RESAMPLE, crop, decode, hflip, resize

# PIL modes that hold one number per pixel; "P" is a palette image whose indices are the classes (VOC's masks)
INDEX_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L", "1")


def read_mask(mask, what: str = "the mask") -> np.ndarray:
    """A mask (a path, a PIL image or an array) as (H, W) int32 class ids. A palette ("P") PNG gives its indices, not
    its colours; a colour (RGB) mask is an error, as the colours would have to be mapped to classes first."""
    if isinstance(mask, (str, os.PathLike)):
        with Image.open(mask) as img:
            return _pil_mask(img, f"mask {mask}")
    if isinstance(mask, Image.Image):
        return _pil_mask(mask, what)
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[-1] == 1:  # tfds stores masks as (H, W, 1)
        arr = arr[..., 0]
    if arr.ndim == 3:
        raise DataError(f"{what} has shape {arr.shape}: a {arr.shape[-1]}-channel (colour) mask; a mask holds one "
                        "class id per pixel, (H, W) (map the colours to class ids first)")
    if arr.ndim != 2 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise DataError(f"{what} must be an (H, W) integer array of class ids, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int32)


def _pil_mask(img: Image.Image, what: str) -> np.ndarray:
    if img.mode not in INDEX_MODES:
        raise DataError(f"{what} is a {img.mode} image (colours), not an index mask: save one class id per pixel as a "
                        "PNG in mode L or P (VOC's SegmentationClass PNGs are palette images whose indices are the "
                        "classes), or map the colours to class ids first")
    return np.asarray(img).astype(np.int32)


def check_mask(mask: np.ndarray, num_classes: int | None, ignore_index: int, what: str = "the mask") -> None:
    """Every value is a class id below `num_classes` or `ignore_index`."""
    if num_classes is None:
        return
    bad = ((mask < 0) | (mask >= num_classes)) & (mask != ignore_index)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"{what} holds class id {int(mask[r, c])} (at row {r}, column {c}; {int(bad.sum())} such "
                        f"pixel(s)) but the model has {num_classes} classes (ids 0-{num_classes - 1}, and "
                        f"{ignore_index} for pixels to ignore): set model.num_classes, or fix the mask")


def check_example(example, num_classes: int | None = None, ignore_index: int = MASK_IGNORE) -> None:
    """The checks of `SegmentationTransform.decode` without decoding the image (its size comes from the file's
    header): what the task runs over examples before training."""
    mask_name = named(example["mask"], "mask")
    mask = read_mask(example["mask"], mask_name)
    check_size(mask, example["image"], mask_name, named(example["image"], "image"))
    check_mask(mask, num_classes, ignore_index, mask_name)


def image_hw(image) -> tuple[int, int]:
    """(H, W) of an image given as a path (read from its header), a PIL image or an array."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as img:
            return img.size[::-1]
    if isinstance(image, Image.Image):
        return image.size[::-1]
    return tuple(np.shape(image)[:2])


def check_size(mask: np.ndarray, image, mask_name: str, image_name: str) -> None:
    h, w = image_hw(image)
    if mask.shape != (h, w):
        raise DataError(f"{mask_name} is {mask.shape[0]}x{mask.shape[1]} but {image_name} is {h}x{w}: a mask holds "
                        "one class id per pixel of its image")


def named(value, kind: str) -> str:
    """How errors name an image or mask: by its path when it is a file."""
    return f"{kind} {value}" if isinstance(value, (str, os.PathLike)) else f"the {kind}"


@dataclass(frozen=True)
class SegmentationTransform:
    """Decode, augment (training), resize and normalize an example `{"image", "mask"}`: `transform(example, rng)`.

    `size` (H, W): the evaluation size (the model's input); `crop_size` (H, W): the training crop; `base_size`: the
    shorter side that `scale_range` multiplies. Given a bare image instead of an example, returns the evaluation
    image array (as `train.transforms.Transform` does).
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    train: bool
    crop_size: tuple[int, int] | None = None  # None: `size`
    base_size: int | None = None  # None: the shorter side of `size`
    scale_range: tuple[float, float] = (0.5, 2.0)
    interpolation: str = "bilinear"
    gray_to_rgb: bool = False
    hflip: bool = True
    randaugment_ops: int = 0  # photometric ops only: they leave every pixel where it is
    randaugment_magnitude: float = 9.0
    num_classes: int | None = None  # checked in every mask when set
    ignore_index: int = MASK_IGNORE

    def __post_init__(self):
        if self.interpolation not in RESAMPLE:
            raise ValueError(f"interpolation must be one of {', '.join(RESAMPLE)}, not '{self.interpolation}'")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be 0 < low <= high, not {self.scale_range}")

    def __call__(self, example, rng: np.random.Generator | None):
        if not isinstance(example, Mapping):
            img = decode(example, self.channels, self.gray_to_rgb)
            return self._normalize(img.resize((self.size[1], self.size[0]), RESAMPLE[self.interpolation]))
        missing = [k for k in ("image", "mask") if k not in example]
        if missing:
            raise DataError(f"example has no '{missing[0]}' (it has {', '.join(sorted(example)) or 'nothing'}); "
                            "segmentation needs image and mask in every example")
        ex = self.decode(example)
        return self._augment(ex, rng) if self.train else self._evaluate(ex)

    def decode(self, example: Mapping) -> dict:
        """The image as a PIL image and the mask as checked (H, W) int32 class ids; errors name the files."""
        image_name, mask_name = named(example["image"], "image"), named(example["mask"], "mask")
        try:
            img = decode(example["image"], self.channels, self.gray_to_rgb)
        except DataError as e:
            raise DataError(f"{image_name}: {e}") from None
        mask = read_mask(example["mask"], mask_name)
        check_size(mask, img, mask_name, image_name)
        check_mask(mask, self.num_classes, self.ignore_index, mask_name)
        return {**example, "image": img, "mask": mask}

    def _augment(self, ex: dict, rng: np.random.Generator) -> dict:
        w, h = ex["image"].size
        base = self.base_size or min(self.size)
        short = max(1, int(round(base * rng.uniform(*self.scale_range))))
        f = short / min(w, h)
        ex = resize(ex, (max(1, int(round(h * f))), max(1, int(round(w * f)))), RESAMPLE[self.interpolation])
        if self.hflip and rng.random() < 0.5:
            ex = hflip(ex)
        ch, cw = self.crop_size or self.size
        w, h = ex["image"].size
        # the window in the image padded at the bottom and right to at least the crop (torchvision's pad_if_smaller)
        top, left = int(rng.integers(0, max(h - ch, 0) + 1)), int(rng.integers(0, max(w - cw, 0) + 1))
        ex = crop(ex, (left, top, min(left + cw, w), min(top + ch, h)))
        if self.randaugment_ops:
            ex["image"] = randaugment(ex["image"], self.randaugment_ops, self.randaugment_magnitude, rng,
                                      ops=PHOTOMETRIC_OPS)
        return self._finish(ex, (ch, cw))

    def _evaluate(self, ex: dict) -> dict:
        return self._finish(resize(ex, tuple(self.size), RESAMPLE[self.interpolation]), tuple(self.size))

    def _normalize(self, img: Image.Image) -> np.ndarray:
        x = np.asarray(img, np.float32) * (1.0 / 255.0)
        if x.ndim == 2:
            x = x[..., None]
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    def _finish(self, ex: dict, size: tuple[int, int]) -> dict:
        """Normalize, then pad to `size` at the bottom and right: the image with 0 (the mean after normalization), the
        mask with the ignore index, so padding never counts in the loss or the metrics."""
        x, mask = self._normalize(ex["image"]), ex["mask"]
        ph, pw = size[0] - x.shape[0], size[1] - x.shape[1]
        if ph or pw:
            x = np.pad(x, ((0, ph), (0, pw), (0, 0)))
            mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=self.ignore_index)
        return {**ex, "image": x, "mask": np.ascontiguousarray(mask, np.int32)}
