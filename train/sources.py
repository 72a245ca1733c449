"""Sources of examples: in-memory arrays, image folders (one subfolder per class), folders of images with
segmentation masks (`train.mask_sources`) or boxes (`train.box_sources`) and tensorflow-datasets splits (detection
ones, whose `objects` hold boxes, by `train.tfds_boxes`).

`open_source` picks one from a spec string (`tfds:NAME`, `folder:PATH` or a folder path, `boxes:PATH` for a folder
read as detection data only); `write_image_folder` writes arrays in the layout `FolderSource` reads. Examples of
labelled images are `{"image": ..., "label": int}`, of segmented ones `{"image": ..., "mask": (H, W) class ids}`, of
detection ones `{"image": ..., "boxes": (M, 4), "classes": (M,)}`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from train.box_sources import has_box_split, open_box_folder
from train.data import IMAGE_SUFFIXES, DataError, Source, split_fraction
from train.mask_sources import has_mask_split, open_mask_folder
from train.tfds_boxes import TfdsBoxSource, is_detection_dataset

BOXES = "boxes:"  # a spec prefix: the folder read in a detection layout only


class ArraySource(Source):
    """In-memory uint8 images (N, H, W) or (N, H, W, C), integer labels (N,) and/or other per-example targets.

    `targets` maps a key to N values, one per example: an array (N, ...) or a list of arrays of varying shapes
    (e.g. `{"boxes": [...], "classes": [...]}` with (n_i, 4) and (n_i,) arrays, or `{"mask": masks}` (N, H, W)).
    """

    def __init__(self, images, labels=None, *, targets: dict | None = None,
                 class_names: Sequence[str] | None = None, num_classes: int | None = None, name: str = "arrays"):
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise DataError(f"{name}: images must be uint8 (0-255), got {images.dtype}; e.g. "
                            "np.clip(x * 255, 0, 255).astype(np.uint8) for floats in [0, 1]")
        if images.ndim not in (3, 4) or len(images) == 0:
            raise DataError(f"{name}: expected a non-empty (N, H, W) or (N, H, W, C) image array, got {images.shape}")
        self.targets = {}
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{name}: expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
            self.targets["label"] = labels.astype(np.int64)
        for key, column in (targets or {}).items():
            if key in ("image", *self.targets):
                raise DataError(f"{name}: target '{key}' given twice (or named 'image')")
            if len(column) != len(images):
                raise DataError(f"{name}: target '{key}' has {len(column)} values for {len(images)} images")
            self.targets[key] = column
        self.images, self.name = images, name
        self.channels = 1 if images.ndim == 3 else images.shape[-1]
        self.class_names = tuple(class_names) if class_names is not None else None
        self.num_classes = num_classes or (len(self.class_names) if self.class_names else
                                           int(labels.max()) + 1 if labels is not None else None)

    def __len__(self):
        return len(self.images)

    def example(self, i):
        return {"image": self.images[i], **{k: v[i] for k, v in self.targets.items()}}

    def values(self, key):
        column = self.targets.get(key)
        return column if isinstance(column, np.ndarray) and column.shape == (len(self),) else None


class FolderSource(Source):
    """`root/<class>/<image>`: one subfolder per class, sorted by name; the label is the subfolder's index.

    `class_names` fixes the classes and their order (an evaluation split must use the training split's): a subfolder
    not among them is an error, a class without a subfolder simply has no images here.
    """

    def __init__(self, root: str | os.PathLike, *, class_names: Sequence[str] | None = None):
        root = Path(root).expanduser()
        self.name = str(root)
        if not root.is_dir():
            raise DataError(f"image folder not found: {root}")
        found_dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
        if class_names is not None:
            classes = tuple(class_names)
            unknown = [d for d in found_dirs if d not in set(classes)]
            if unknown:
                raise DataError(f"{root} has class folder(s) the training data does not: {', '.join(unknown[:10])}")
        else:
            classes = tuple(found_dirs)
        files, labels = [], []
        for k, cls in enumerate(classes):
            found = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            files += found
            labels += [k] * len(found)
        if not files:
            raise DataError(
                f"no images found in {root}: expected one subfolder per class holding image files "
                f"({', '.join(IMAGE_SUFFIXES[:4])}, ...), e.g. {root}/cat/001.jpg"
                + (f"; subfolders found: {', '.join(found_dirs[:5])}" if found_dirs else "; it has no subfolders"))
        self.files, self.label_array = files, np.asarray(labels, np.int64)
        self.class_names, self.num_classes = classes, len(classes)

    def __len__(self):
        return len(self.files)

    def example(self, i):
        return {"image": self.files[i], "label": int(self.label_array[i])}

    def values(self, key):
        return self.label_array if key == "label" else None


class TfdsSource(Source):
    """A tensorflow-datasets split with random access (`tfds.data_source`); splits that are not stored in a
    random-access format are read into memory once.

    With `mask_key` (e.g. "segmentation_mask" of `oxford_iiit_pet`) examples are `{"image", "mask"}` read from that
    feature (per-pixel class ids; its class count is not recorded by tfds: set `model.num_classes`), else
    `{"image", "label"}`.
    """

    def __init__(self, name: str, split: str, *, data_dir: str | None = None, image_key: str = "image",
                 label_key: str = "label", mask_key: str | None = None):
        import tensorflow_datasets as tfds

        self.name, self.image_key, self.label_key = f"tfds:{name}[{split}]", image_key, label_key
        self.mask_key = mask_key or None
        builder = tfds.builder(name, data_dir=data_dir)
        features = builder.info.features
        target_key = self.mask_key or label_key
        for key in (image_key, target_key):
            if key not in features:
                raise DataError(f"{self.name} has no feature '{key}'; features: {', '.join(features.keys())} "
                                f"(set data.image_key / data.{'mask_key' if self.mask_key else 'label_key'})")
        label_feature = features[target_key]
        self.num_classes = None if self.mask_key else getattr(label_feature, "num_classes", None)
        names = None if self.mask_key else getattr(label_feature, "names", None)
        self.class_names = tuple(names) if names else None
        shape = getattr(features[image_key], "shape", None)
        self.channels = shape[-1] if shape and shape[-1] is not None else None
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
            self._memory = None
        except Exception:  # noqa: BLE001  (no ArrayRecord files: fall back to reading the split once)
            self._source = None
            if self.mask_key:  # images and masks of varying sizes do not stack: a list of records
                self._memory = [{k: r[k] for k in (image_key, self.mask_key)}
                                for r in tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir))]
            else:
                arrays = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, batch_size=-1))
                self._memory = (arrays[image_key], np.asarray(arrays[label_key], np.int64))
        if len(self) == 0:
            raise DataError(f"{self.name} is empty")

    def __len__(self):
        if self._memory is None:
            return len(self._source)
        return len(self._memory) if self.mask_key else len(self._memory[1])

    def example(self, i):
        if self.mask_key:
            record = self._memory[i] if self._memory is not None else self._source[int(i)]
            return {"image": record[self.image_key], "mask": record[self.mask_key]}
        if self._memory:
            return {"image": self._memory[0][i], "label": int(self._memory[1][i])}
        record = self._source[int(i)]
        return {"image": record[self.image_key], "label": int(record[self.label_key])}

    def values(self, key):
        return self._memory[1] if (self._memory and not self.mask_key and key == "label") else None


def open_source(spec: str | Source, split: str, *, data_dir: str | None = None, image_key: str = "image",
                label_key: str = "label", class_names: Sequence[str] | None = None,
                mask_key: str | None = None) -> Source:
    """`tfds:NAME` / `folder:PATH` / a folder path -> a Source for `split`. Folders with a `split` subfolder use it;
    `class_names` (the training split's) fixes a folder's classes and their order. A folder in a segmentation layout
    (VOC's, or images/ + masks/; see `train.mask_sources`) gives images with masks; a tfds dataset does with
    `mask_key`. A folder in a detection layout (COCO's JSON or VOC's XML; see `train.box_sources`) gives images with
    boxes and classes; a VOC folder with segmentation masks too opens as segmentation unless named `boxes:PATH`. A
    tfds dataset without a `label_key` feature whose `objects` hold boxes (coco/2017, voc/2007) gives boxes and
    classes (`train.tfds_boxes`)."""
    if isinstance(spec, Source):
        return spec
    if not spec:
        raise DataError("no training data: set data.source (tfds:NAME, folder:PATH) or pass arrays")
    if spec.startswith("tfds:"):
        if mask_key is None and _tfds_detection(spec[5:], label_key, data_dir):  # coco/2017, voc/2007, ...
            return TfdsBoxSource(spec[5:], split, data_dir=data_dir, image_key=image_key)
        return TfdsSource(spec[5:], split, data_dir=data_dir, image_key=image_key, label_key=label_key,
                          mask_key=mask_key)
    if spec.startswith(BOXES):  # the detection layouts only (a VOC devkit holds masks as well)
        boxed = open_box_folder(Path(spec[len(BOXES):]).expanduser(), split, class_names)
        if boxed is None:
            raise DataError(f"{spec[len(BOXES):]} is in no detection layout: COCO's (annotations/instances_<split>.json"
                            ", <split>/), write_coco's (<split>/<name>.json, <split>/images/) or VOC's (Annotations/, "
                            "JPEGImages/, ImageSets/Main/)")
        return boxed
    root = Path(spec[7:] if spec.startswith("folder:") else spec).expanduser()
    segmented = open_mask_folder(root, split, class_names)
    if segmented is not None:
        return segmented
    boxed = open_box_folder(root, split, class_names)
    if boxed is not None:
        return boxed
    if (root / split).is_dir():
        return FolderSource(root / split, class_names=class_names)
    return FolderSource(root, class_names=class_names)


def _tfds_detection(name: str, label_key: str, data_dir: str | None) -> bool:
    import tensorflow_datasets as tfds

    return is_detection_dataset(tfds.builder(name, data_dir=data_dir).info.features, label_key)


def as_source(data, name: str) -> Source | None:
    """A Source as given, an (images, labels) or (images, masks) pair as an ArraySource, or None."""
    if data is None or isinstance(data, Source):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        if np.ndim(data[1]) == 3:  # (N, H, W): one mask per image
            return ArraySource(data[0], targets={"mask": np.asarray(data[1])}, name=name)
        return ArraySource(data[0], data[1], name=name)
    raise TypeError(f"{name} data must be a Source, an (images, labels) or (images, masks) pair or None, not "
                    f"{type(data).__name__}")


def open_data(data, seed: int, train_data=None, eval_data=None) -> tuple[Source, Source | None]:
    """(train, eval) sources of a run: given ones, else `data.source` (a `DataConfig`) with its eval split or a
    seeded `val_fraction` of the training data."""
    d = data
    train_src = as_source(train_data, "train") or open_source(d.source, d.train_split, data_dir=d.data_dir,
                                                               image_key=d.image_key, label_key=d.label_key,
                                                               mask_key=d.mask_key)
    eval_src = as_source(eval_data, "eval")
    if eval_src is None and d.val_fraction:
        train_src, eval_src = split_fraction(train_src, d.val_fraction, seed)
    elif eval_src is None and d.eval_split and train_data is None and has_split(d.source, d.eval_split):
        eval_src = open_source(d.source, d.eval_split, data_dir=d.data_dir, image_key=d.image_key,
                               label_key=d.label_key, class_names=train_src.class_names, mask_key=d.mask_key)
    return train_src, eval_src


def has_split(spec: str | Source, split: str) -> bool:
    if isinstance(spec, Source) or spec.startswith("tfds:"):
        return True
    if spec.startswith(BOXES):
        return bool(has_box_split(Path(spec[len(BOXES):]).expanduser(), split))
    root = Path(spec[7:] if spec.startswith("folder:") else spec).expanduser()
    found = has_mask_split(root, split)
    found = has_box_split(root, split) if found is None else found
    return (root / split).is_dir() if found is None else found


def write_image_folder(images, labels, root: str | os.PathLike, class_names: Sequence[str] | None = None,
                       fmt: str = "png") -> Path:
    """Write uint8 images as `root/<class>/<index>.<fmt>` (the layout FolderSource reads)."""
    root = Path(root)
    images, labels = np.asarray(images), np.asarray(labels)
    names = list(class_names) if class_names is not None else [str(k) for k in range(int(labels.max()) + 1)]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(images, labels)):
        arr = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
        Image.fromarray(arr).save(root / names[int(lab)] / f"{i:06d}.{fmt}")
    return root
