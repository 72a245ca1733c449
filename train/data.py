"""Labelled images in, deterministic batches out.

Sources give random access to (image, label) pairs: `ArraySource` (in-memory arrays), `FolderSource` (one subfolder
per class) and `TfdsSource` (tensorflow-datasets by name and split). A `Loader` turns a source into batches for a step:
which examples (an epoch permutation seeded by `seed`) and how they are augmented (a generator seeded by
`(seed, epoch, example index)`) depend only on the seed and the step, so a resumed run sees exactly the batches an
uninterrupted one would, whatever the number of devices. Each host builds only its slice of the global batch.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from train.augment import randaugment, random_resized_crop
from zoo.preprocess import resize_center_crop

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """Data that cannot be trained on: empty, mislabelled, or not matching the model. Raised before training."""


# ---- sources -----------------------------------------------------------------------------------------------------

class Source:
    """Random access to labelled images. Subclasses set `num_classes`, `class_names`, `channels` where known."""

    name: str = "data"
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    channels: int | None = None  # None: decoded on demand to whatever the model needs (files)

    def __len__(self) -> int:
        raise NotImplementedError

    def image(self, i: int):
        """A uint8 HxW[xC] array, a PIL image, or a path."""
        raise NotImplementedError

    def label(self, i: int) -> int:
        raise NotImplementedError

    def labels(self) -> np.ndarray | None:
        """All labels when reading them is cheap (used to check them before training), else None."""
        return None

    def subset(self, indices: np.ndarray, name: str) -> "Source":
        return _Subset(self, np.asarray(indices), name)


class _Subset(Source):
    def __init__(self, base: Source, indices: np.ndarray, name: str):
        self.base, self.indices, self.name = base, indices, name
        self.num_classes, self.class_names, self.channels = base.num_classes, base.class_names, base.channels

    def __len__(self):
        return len(self.indices)

    def image(self, i):
        return self.base.image(int(self.indices[i]))

    def label(self, i):
        return self.base.label(int(self.indices[i]))

    def labels(self):
        all_labels = self.base.labels()
        return None if all_labels is None else all_labels[self.indices]


class ArraySource(Source):
    """In-memory uint8 images (N, H, W) or (N, H, W, C) and integer labels (N,)."""

    def __init__(self, images, labels, *, class_names: Sequence[str] | None = None, num_classes: int | None = None,
                 name: str = "arrays"):
        images, labels = np.asarray(images), np.asarray(labels)
        if images.dtype != np.uint8:
            raise DataError(f"{name}: images must be uint8 (0-255), got {images.dtype}; e.g. "
                            "np.clip(x * 255, 0, 255).astype(np.uint8) for floats in [0, 1]")
        if images.ndim not in (3, 4) or len(images) == 0:
            raise DataError(f"{name}: expected a non-empty (N, H, W) or (N, H, W, C) image array, got {images.shape}")
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{name}: expected {len(images)} integer labels, got {labels.dtype} {labels.shape}")
        self.images, self.label_array, self.name = images, labels.astype(np.int64), name
        self.channels = 1 if images.ndim == 3 else images.shape[-1]
        self.class_names = tuple(class_names) if class_names is not None else None
        self.num_classes = num_classes or (len(self.class_names) if self.class_names else int(labels.max()) + 1)

    def __len__(self):
        return len(self.images)

    def image(self, i):
        return self.images[i]

    def label(self, i):
        return int(self.label_array[i])

    def labels(self):
        return self.label_array


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

    def image(self, i):
        return self.files[i]

    def label(self, i):
        return int(self.label_array[i])

    def labels(self):
        return self.label_array


class TfdsSource(Source):
    """A tensorflow-datasets split with random access (`tfds.data_source`); splits that are not stored in a
    random-access format are read into memory once."""

    def __init__(self, name: str, split: str, *, data_dir: str | None = None, image_key: str = "image",
                 label_key: str = "label"):
        import tensorflow_datasets as tfds

        self.name, self.image_key, self.label_key = f"tfds:{name}[{split}]", image_key, label_key
        builder = tfds.builder(name, data_dir=data_dir)
        features = builder.info.features
        for key in (image_key, label_key):
            if key not in features:
                raise DataError(f"{self.name} has no feature '{key}'; features: {', '.join(features.keys())} "
                                "(set data.image_key / data.label_key)")
        label_feature = features[label_key]
        self.num_classes = getattr(label_feature, "num_classes", None)
        names = getattr(label_feature, "names", None)
        self.class_names = tuple(names) if names else None
        shape = getattr(features[image_key], "shape", None)
        self.channels = shape[-1] if shape and shape[-1] is not None else None
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir)
            self._memory = None
        except Exception:  # noqa: BLE001  (no ArrayRecord files: fall back to reading the split once)
            arrays = tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir, batch_size=-1))
            self._source = None
            self._memory = (arrays[image_key], np.asarray(arrays[label_key], np.int64))
        if len(self) == 0:
            raise DataError(f"{self.name} is empty")

    def __len__(self):
        return len(self._memory[1]) if self._memory else len(self._source)

    def image(self, i):
        return self._memory[0][i] if self._memory else self._source[int(i)][self.image_key]

    def label(self, i):
        return int(self._memory[1][i]) if self._memory else int(self._source[int(i)][self.label_key])

    def labels(self):
        return self._memory[1] if self._memory else None


def open_source(spec: str | Source, split: str, *, data_dir: str | None = None, image_key: str = "image",
                label_key: str = "label", class_names: Sequence[str] | None = None) -> Source:
    """`tfds:NAME` / `folder:PATH` / a folder path -> a Source for `split`. Folders with a `split` subfolder use it;
    `class_names` (the training split's) fixes a folder's classes and their order."""
    if isinstance(spec, Source):
        return spec
    if not spec:
        raise DataError("no training data: set data.source (tfds:NAME, folder:PATH) or pass arrays")
    if spec.startswith("tfds:"):
        return TfdsSource(spec[5:], split, data_dir=data_dir, image_key=image_key, label_key=label_key)
    root = Path(spec[7:] if spec.startswith("folder:") else spec).expanduser()
    if (root / split).is_dir():
        return FolderSource(root / split, class_names=class_names)
    return FolderSource(root, class_names=class_names)


def has_split(spec: str | Source, split: str) -> bool:
    if isinstance(spec, Source) or spec.startswith("tfds:"):
        return True
    root = Path(spec[7:] if spec.startswith("folder:") else spec).expanduser()
    return (root / split).is_dir()


def split_fraction(source: Source, fraction: float, seed: int) -> tuple[Source, Source]:
    """(train, validation) subsets: a seeded `fraction` of the examples held out."""
    n = len(source)
    k = int(round(n * fraction))
    if not 0 < k < n:
        raise DataError(f"val_fraction={fraction} leaves no training or no validation examples out of {n}")
    perm = np.random.default_rng([seed, 0xE7A1]).permutation(n)
    return source.subset(np.sort(perm[k:]), f"{source.name}[train]"), source.subset(np.sort(perm[:k]),
                                                                                     f"{source.name}[val]")


# ---- per-example transform ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transform:
    """Decode, (augment,) resize and normalize one image to float32 HxWxC."""

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

    def to_pil(self, image) -> Image.Image:
        mode = "RGB" if self.channels == 3 else "L"
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as img:
                return img.convert(mode)
        if isinstance(image, Image.Image):
            return image.convert(mode)
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        have = 1 if arr.ndim == 2 else arr.shape[-1]
        if have != self.channels and not (have == 1 and self.channels == 3 and self.gray_to_rgb):
            raise DataError(_channel_message(have, self.channels))
        return Image.fromarray(arr).convert(mode)

    def __call__(self, image, rng: np.random.Generator | None) -> np.ndarray:
        img = self.to_pil(image)
        resample = _RESAMPLE[self.interpolation]
        if self.train:
            if self.random_resized_crop:
                img = random_resized_crop(img, self.size, rng, self.rrc_scale, self.rrc_ratio, resample)
            else:
                img = img.resize((self.size[1], self.size[0]), resample)
            if self.hflip and rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.randaugment_ops:
                img = randaugment(img, self.randaugment_ops, self.randaugment_magnitude, rng)
        elif self.crop_pct >= 1.0:
            img = img.resize((self.size[1], self.size[0]), resample)
        else:
            img = resize_center_crop(img, self.size, self.crop_pct, self.interpolation)
        x = np.asarray(img, np.float32) * (1.0 / 255.0)
        if x.ndim == 2:
            x = x[..., None]
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


def _channel_message(have: int, want: int) -> str:
    hint = ("set data.gray_to_rgb=true to repeat the gray channel, or build the model with model.in_chans=1"
            if have == 1 else f"build the model with model.in_chans={have} or convert the images")
    return f"images have {have} channel(s) but the model expects {want}: {hint}"


def check_source(source: Source, num_classes: int, channels: int, gray_to_rgb: bool, what: str) -> None:
    """Fail before training on labels the classifier cannot hold or images of the wrong channel count."""
    if len(source) == 0:
        raise DataError(f"{what} data ({source.name}) is empty")
    labels = source.labels()
    if labels is not None:
        bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
        if bad.size:
            raise DataError(
                f"{what} data ({source.name}): {bad.size} label(s) outside [0, {num_classes}), e.g. label "
                f"{int(labels[bad[0]])} at index {int(bad[0])}; the model has {num_classes} classes "
                "(set model.num_classes, or fix the labels)")
    elif source.num_classes is not None and source.num_classes > num_classes:
        raise DataError(f"{what} data ({source.name}) has {source.num_classes} classes but the model only "
                        f"{num_classes} (set model.num_classes)")
    have = source.channels
    if have is None:
        first = source.image(0)
        if not isinstance(first, (str, os.PathLike, Image.Image)):
            arr = np.asarray(first)
            have = 1 if arr.ndim == 2 else arr.shape[-1]
    if have is not None and have != channels and not (have == 1 and channels == 3 and gray_to_rgb):
        raise DataError(f"{what} data ({source.name}): " + _channel_message(have, channels))


# ---- batches -----------------------------------------------------------------------------------------------------

class Loader:
    """Batches of a source for given steps: `batch(step)` is a pure function of (seed, step) and the host's slice.

    Training batches are full (an epoch's remainder is dropped); `eval_batches()` covers every example once, padding
    the last batch and marking real examples in `mask`.
    """

    def __init__(self, source: Source, transform: Transform, global_batch: int, *, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, workers: int = 2, prefetch: int = 2,
                 collate=None):
        if global_batch % process_count:
            raise DataError(f"batch size {global_batch} is not divisible by the {process_count} hosts")
        self.source, self.transform, self.global_batch, self.seed = source, transform, global_batch, seed
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = global_batch // process_count
        self.workers, self.prefetch = max(1, workers), max(1, prefetch)
        self.collate = collate or _collate

    @property
    def steps_per_epoch(self) -> int:
        return len(self.source) // self.global_batch

    def _indices(self, step: int) -> tuple[int, np.ndarray]:
        spe = self.steps_per_epoch
        if spe == 0:
            raise DataError(f"{self.source.name} has {len(self.source)} examples, fewer than one batch of "
                            f"{self.global_batch}; lower data.batch_size")
        epoch, offset = divmod(step, spe)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        start = offset * self.global_batch + self.process_index * self.local_batch
        return epoch, perm[start:start + self.local_batch]

    def batch(self, step: int) -> dict:
        epoch, idx = self._indices(step)
        images = np.stack([self.transform(self.source.image(i), np.random.default_rng([self.seed, epoch, int(i)]))
                           for i in idx])
        labels = np.asarray([self.source.label(i) for i in idx], np.int64)
        return self.collate(images, labels, np.random.default_rng([self.seed, 0x5EED, step]))

    def iterate(self, start: int, stop: int) -> Iterator[dict]:
        """Batches for steps start..stop-1, prepared `prefetch` ahead on `workers` threads."""
        return _prefetched(self.batch, range(start, stop), self.workers, self.prefetch)

    def eval_batches(self) -> Iterator[dict]:
        """Every example once, in order; the last batch padded (repeating example 0) with `mask` 0."""
        n = len(self.source)

        def make(b: int) -> dict:
            lo = b * self.global_batch + self.process_index * self.local_batch
            idx = np.arange(lo, lo + self.local_batch)
            valid = idx < n
            idx = np.where(valid, idx, 0)
            images = np.stack([self.transform(self.source.image(int(i)), None) for i in idx])
            labels = np.asarray([self.source.label(int(i)) for i in idx], np.int64)
            return {"image": images, "label": labels, "mask": valid.astype(np.float32)}

        return _prefetched(make, range(-(-n // self.global_batch)), self.workers, self.prefetch)


def _prefetched(fn, items, workers: int, depth: int) -> Iterator:
    """`fn(item)` for each item, in order, computed on a thread pool at most `depth` items ahead."""
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="loader") as pool:
        pending: deque = deque()
        items = iter(items)
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                break
        while pending:
            out = pending.popleft().result()
            nxt = next(items, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
            yield out


def _collate(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> dict:
    return {"image": images, "label": labels}


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
