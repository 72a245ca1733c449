"""Input data for an export: checking representative (calibration) and verification batches, reading them from disk.

Data is held in memory as one float32 NHWC array (a few hundred images at 224x224 is a few hundred MB), so every
problem - wrong shape, wrong dtype, nothing at all - is reported before the minutes of tracing and converting start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def as_float_batch(data, input_shape: tuple[int, ...], what: str = "representative_data",
                   limit: int | None = None) -> np.ndarray:
    """An array `(N, H, W, C)` or an iterable of `(n, H, W, C)` / `(H, W, C)` arrays -> one float32 `(N, H, W, C)`.

    `input_shape` is the exported model's `(batch, H, W, C)`; N is any number >= 1. Raises TypeError for non-float
    data (images must be normalized as the model expects: `model.preprocess(images)`) and ValueError for a wrong
    shape, an empty set or non-finite values. `limit` keeps the first `limit` samples.
    """
    _, h, w, c = input_shape
    if data is None:
        raise ValueError(f"{what} is None")
    if isinstance(data, (str, Path)):
        raise TypeError(f"{what} must be arrays, not a path; read files with "
                        f"export.calibration.load_data({str(data)!r}, cfg)")
    items = [data] if hasattr(data, "shape") or isinstance(data, np.ndarray) else data
    if not isinstance(items, Iterable):
        raise TypeError(f"{what} must be an NHWC float array or an iterable of them, got {type(data).__name__}")
    parts, count = [], 0
    for k, item in enumerate(items):
        arr = np.asarray(item)
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(
                f"{what} must be float images normalized like the model input (NHWC, mean/std applied), got dtype "
                f"{arr.dtype}" + (" - uint8 pixels? use model.preprocess(images)" if arr.dtype == np.uint8 else ""))
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[1:] != (h, w, c):
            raise ValueError(f"{what} item {k} has shape {arr.shape}; expected (N, {h}, {w}, {c}) NHWC batches "
                             f"matching the export input size {h}x{w} with {c} channels")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what} item {k} contains NaN or infinite values")
        if len(arr):
            parts.append(arr.astype(np.float32, copy=False))
            count += len(arr)
        if limit is not None and count >= limit:
            break
    if count == 0:
        raise ValueError(f"{what} is empty: give at least one (H, W, C) sample")
    out = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return out[:limit] if limit is not None else out


def chunks(x: np.ndarray, batch: int) -> list[np.ndarray]:
    """Split into model-sized batches; the last one is padded by repeating its last sample."""
    out = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        if len(chunk) < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        out.append(chunk)
    return out


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted, so a class-per-subfolder tree works as well as a flat one."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def class_folder_images(folder: str | Path) -> tuple[list[Path], np.ndarray, tuple[str, ...]]:
    """`folder/<class>/<image>`: the image files, their labels (the index of the sorted subfolder) and the class names,
    the same convention as the training loop's folder source."""
    root = Path(folder)
    classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
    files, labels = [], []
    for k, cls in enumerate(classes):
        found = list_images(root / cls)
        files += found
        labels += [k] * len(found)
    return files, np.asarray(labels, np.int64), classes


def load_data(source: str | Path, cfg, limit: int | None = None, progress: bool = False) -> np.ndarray:
    """A folder of images (preprocessed with `cfg`: resize, center crop, mean/std) or a .npy of float NHWC batches."""
    from zoo.preprocess import preprocess

    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    shape = (1, *cfg.input_size, cfg.in_chans)
    if path.is_file():
        if path.suffix != ".npy":
            raise ValueError(f"calibration data must be a folder of images or a .npy file, got {path.name}")
        return as_float_batch(np.load(path, allow_pickle=False), shape, f"{path.name}", limit)
    files = list_images(path)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    files = files[:limit] if limit is not None else files
    it = files
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(files, desc=f"reading {path.name}", unit="img", leave=False)
    return np.concatenate([preprocess([f], cfg) for f in it]).astype(np.float32)
