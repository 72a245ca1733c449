"""Sources of segmentation examples on disk, `{"image": path, "mask": path}`, in two layouts:

- Pascal VOC's (`VOCdevkit/VOC2012`): `JPEGImages/<id>.jpg`, `SegmentationClass/<id>.png` (palette PNGs whose indices
  are the classes, 255 on object boundaries: ignored) and the split lists `ImageSets/Segmentation/<split>.txt`;
- `images/` and `masks/` holding files of the same stems (masks as PNGs in mode L or P), split as `<split>/images`.

Class names come from a `labels.txt` at the root (one per line, in class-id order; `write_voc` writes it), else VOC's
21 for the VOC layout, else they are unknown (set `model.num_classes`). Every image must have its mask: a missing one
is an error naming both paths. The masks themselves are read and checked when an example is transformed
(`train.mask_transforms`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from train.data import IMAGE_SUFFIXES, DataError, Source

# Pascal VOC 2012's classes in id order (the devkit's `VOCcode/VOCinit.m`, with background as 0)
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
LABELS_FILE = "labels.txt"


def voc_palette() -> list[int]:
    """The colour map of VOC's SegmentationClass PNGs (the devkit's `labelcolormap`: class bits spread over the high
    bits of R, G and B), as PIL's flat 768-value palette."""
    palette = []
    for k in range(256):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def layout(root: Path) -> str | None:
    """"voc", "images_masks" or None: the segmentation layout of the folder `root`."""
    if (root / "JPEGImages").is_dir() and (root / "SegmentationClass").is_dir():
        return "voc"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "images_masks"
    return None


def open_mask_folder(root: Path, split: str, class_names: Sequence[str] | None = None) -> Source | None:
    """The segmentation source of `root` for `split` (VOC's split list, or `root/split/images`), or None when `root`
    is in neither layout."""
    if layout(root) == "voc":
        return VocSource(root, split, class_names=class_names)
    if layout(root / split) == "images_masks":  # the class list may sit beside the splits
        return MaskFolderSource(root / split, class_names=class_names or _class_names(root, None, None))
    if layout(root) == "images_masks":
        return MaskFolderSource(root, class_names=class_names)
    return None


def has_mask_split(root: Path, split: str) -> bool | None:
    """Whether a folder in a segmentation layout has `split` (None: not such a folder)."""
    if layout(root) == "voc":
        return (root / "ImageSets" / "Segmentation" / f"{split}.txt").is_file()
    if layout(root / split) == "images_masks":
        return True
    return False if layout(root) == "images_masks" else None


def _class_names(root: Path, given, default) -> tuple[str, ...] | None:
    if given is not None:
        return tuple(given)
    labels = root / LABELS_FILE
    if labels.is_file():
        names = tuple(line.strip() for line in labels.read_text().splitlines() if line.strip())
        if not names:
            raise DataError(f"{labels} is empty: it lists one class name per line, in class-id order")
        return names
    return default


class _PairSource(Source):
    """Examples `{"image": path, "mask": path}` from paired file lists."""

    def __init__(self, name: str, images: list[Path], masks: list[Path], class_names):
        self.name, self.images, self.masks = name, images, masks
        self.class_names = class_names
        self.num_classes = len(class_names) if class_names else None

    def __len__(self):
        return len(self.images)

    def example(self, i):
        return {"image": self.images[i], "mask": self.masks[i]}


class VocSource(_PairSource):
    """A split of a folder in Pascal VOC's layout (see the module doc)."""

    def __init__(self, root: str | os.PathLike, split: str = "train", *, class_names: Sequence[str] | None = None):
        root = Path(root).expanduser()
        lists = root / "ImageSets" / "Segmentation"
        listed = lists / f"{split}.txt"
        if not listed.is_file():
            have = sorted(p.stem for p in lists.glob("*.txt")) if lists.is_dir() else []
            raise DataError(f"{root} has no split '{split}': {listed} not found"
                            + (f" (splits: {', '.join(have)})" if have else ""))
        ids = [line.split()[0] for line in listed.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"{listed} lists no image")
        images = [root / "JPEGImages" / f"{i}.jpg" for i in ids]
        masks = [root / "SegmentationClass" / f"{i}.png" for i in ids]
        for image, mask in zip(images, masks):
            if not image.is_file():
                raise DataError(f"{listed} lists '{image.stem}' but {image} does not exist")
            if not mask.is_file():
                raise DataError(f"image {image} has no mask: {mask} does not exist")
        super().__init__(f"{root}[{split}]", images, masks, _class_names(root, class_names, VOC_CLASSES))


class MaskFolderSource(_PairSource):
    """`root/images/<stem>.<ext>` with `root/masks/<stem>.png` (any image suffix), paired by stem."""

    def __init__(self, root: str | os.PathLike, *, class_names: Sequence[str] | None = None):
        root = Path(root).expanduser()
        images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise DataError(f"no images found in {root / 'images'} ({', '.join(IMAGE_SUFFIXES[:4])}, ...)")
        masks = {p.stem: p for p in sorted((root / "masks").iterdir(), reverse=True)
                 if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()}  # reversed: .png wins over .jpg etc.
        missing = [p for p in images if p.stem not in masks]
        if missing:
            raise DataError(f"image {missing[0]} has no mask: expected {root / 'masks' / missing[0].stem}.png "
                            f"({len(missing)} image(s) without a mask)")
        stray = sorted(set(masks) - {p.stem for p in images})
        if stray:
            raise DataError(f"mask {masks[stray[0]]} has no image in {root / 'images'} ({len(stray)} such mask(s))")
        super().__init__(str(root), images, [masks[p.stem] for p in images], _class_names(root, class_names, None))


def write_voc(root: str | os.PathLike, images, masks, splits: dict[str, Sequence[int]],
              class_names: Sequence[str] | None = None, quality: int = 95) -> Path:
    """Write uint8 RGB images and their masks (class ids) in VOC's layout as `<index:06d>.jpg` / `.png`: masks as
    palette PNGs in VOC's colours; `splits` maps a split name to the indices it lists; `class_names` goes to
    `labels.txt`."""
    root = Path(root)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    for split, indices in splits.items():
        ids = [f"{int(i):06d}" for i in indices]
        for i, name in zip(indices, ids):
            # 4:4:4: no chroma subsampling, which would blur colours across thin structures and their mask edges
            Image.fromarray(np.asarray(images[i], np.uint8)).save(root / "JPEGImages" / f"{name}.jpg",
                                                                  quality=quality, subsampling=0)
            mask = np.ascontiguousarray(masks[i], np.uint8)
            png = Image.frombytes("P", (mask.shape[1], mask.shape[0]), mask.tobytes())
            png.putpalette(palette)
            png.save(root / "SegmentationClass" / f"{name}.png")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n in ids))
    if class_names is not None:
        (root / LABELS_FILE).write_text("".join(f"{n}\n" for n in class_names))
    return root
