"""Examples in, deterministic batches out.

A `Source` gives random access to examples: dicts holding an `image` and whatever targets the data has (see
`train.transforms` for the keys the transforms move; `train.sources` for in-memory arrays, image folders and
tensorflow-datasets). A `Loader` turns a source into batches for a step: which examples (an epoch permutation seeded by
`seed`) and how they are transformed (a generator seeded by `(seed, epoch, example index)`) depend only on the seed and
the step, so a resumed run sees exactly the batches an uninterrupted one would, whatever the number of devices. Each
host builds only its slice of the global batch. The task's `collate` turns transformed examples into a batch.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections import deque
from typing import Callable, Iterator

import numpy as np
from PIL import Image


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """Data that cannot be trained on: empty, with targets the task cannot use, or not matching the model. Raised
    before training."""


# ---- sources -----------------------------------------------------------------------------------------------------

class Source:
    """Random access to examples. Subclasses set `num_classes`, `class_names`, `channels` where known."""

    name: str = "data"
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    channels: int | None = None  # None: decoded on demand to whatever the model needs (files)

    def __len__(self) -> int:
        raise NotImplementedError

    def example(self, i: int) -> dict:
        """Example `i`: `image` (a uint8 HxW[xC] array, a PIL image or a path) and its targets."""
        raise NotImplementedError

    def values(self, key: str) -> np.ndarray | None:
        """Every example's scalar target `key` at once when reading them is cheap (checks before training), else
        None."""
        return None

    def subset(self, indices: np.ndarray, name: str) -> "Source":
        return _Subset(self, np.asarray(indices), name)


class _Subset(Source):
    def __init__(self, base: Source, indices: np.ndarray, name: str):
        self.base, self.indices, self.name = base, indices, name
        self.num_classes, self.class_names, self.channels = base.num_classes, base.class_names, base.channels

    def __len__(self):
        return len(self.indices)

    def example(self, i):
        return self.base.example(int(self.indices[i]))

    def values(self, key):
        column = self.base.values(key)
        return None if column is None else column[self.indices]


def split_fraction(source: Source, fraction: float, seed: int) -> tuple[Source, Source]:
    """(train, validation) subsets: a seeded `fraction` of the examples held out."""
    n = len(source)
    k = int(round(n * fraction))
    if not 0 < k < n:
        raise DataError(f"val_fraction={fraction} leaves no training or no validation examples out of {n}")
    perm = np.random.default_rng([seed, 0xE7A1]).permutation(n)
    return source.subset(np.sort(perm[k:]), f"{source.name}[train]"), source.subset(np.sort(perm[:k]),
                                                                                     f"{source.name}[val]")


def channel_message(have: int, want: int) -> str:
    hint = ("set data.gray_to_rgb=true to repeat the gray channel, or build the model with model.in_chans=1"
            if have == 1 else f"build the model with model.in_chans={have} or convert the images")
    return f"images have {have} channel(s) but the model expects {want}: {hint}"


def check_images(source: Source, channels: int, gray_to_rgb: bool, what: str) -> None:
    """Fail before training on an empty source or images of the wrong channel count."""
    if len(source) == 0:
        raise DataError(f"{what} data ({source.name}) is empty")
    have = source.channels
    if have is None:
        first = source.example(0)["image"]
        if not isinstance(first, (str, os.PathLike, Image.Image)):
            arr = np.asarray(first)
            have = 1 if arr.ndim == 2 else arr.shape[-1]
    if have is not None and have != channels and not (have == 1 and channels == 3 and gray_to_rgb):
        raise DataError(f"{what} data ({source.name}): " + channel_message(have, channels))


# ---- batches -----------------------------------------------------------------------------------------------------

# (transformed examples, valid (B,) bool, rng: a Generator for training batches, None for evaluation) -> batch
Collate = Callable[[list, np.ndarray, "np.random.Generator | None"], dict]


def stack_collate(examples: list[dict], valid: np.ndarray, rng) -> dict:
    """Every key stacked (same shapes across examples), and `valid` (B,) float32, 0 for padding."""
    batch = {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in examples[0]}
    return {**batch, "valid": valid.astype(np.float32)}


class Loader:
    """Batches of a source for given steps: `batch(step)` is a pure function of (seed, step) and the host's slice.

    `transform(example, rng) -> example` runs per example (rng None in evaluation); `collate(examples, valid, rng)`
    makes the batch (default: `stack_collate`). Training batches are full (an epoch's remainder is dropped);
    `eval_batches()` covers every example once, padding the last batch and marking real examples in `valid`.
    """

    def __init__(self, source: Source, transform: Callable, global_batch: int, *, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, workers: int = 2, prefetch: int = 2,
                 collate: Collate | None = None):
        if global_batch % process_count:
            raise DataError(f"batch size {global_batch} is not divisible by the {process_count} hosts")
        self.source, self.transform, self.global_batch, self.seed = source, transform, global_batch, seed
        self.process_index, self.process_count = process_index, process_count
        self.local_batch = global_batch // process_count
        self.workers, self.prefetch = max(1, workers), max(1, prefetch)
        self.collate = collate or stack_collate

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

    def _example(self, i: int, rng) -> dict:
        try:
            return self.transform(self.source.example(i), rng)
        except DataError as e:
            raise DataError(f"{self.source.name}, example {i}: {e}") from None

    def batch(self, step: int) -> dict:
        epoch, idx = self._indices(step)
        examples = [self._example(int(i), np.random.default_rng([self.seed, epoch, int(i)])) for i in idx]
        return self.collate(examples, np.ones(len(idx), bool), np.random.default_rng([self.seed, 0x5EED, step]))

    def iterate(self, start: int, stop: int) -> Iterator[dict]:
        """Batches for steps start..stop-1, prepared `prefetch` ahead on `workers` threads."""
        return _prefetched(self.batch, range(start, stop), self.workers, self.prefetch)

    def eval_batches(self) -> Iterator[dict]:
        """Every example once, in order; the last batch padded (repeating example 0) with `valid` 0."""
        n = len(self.source)

        def make(b: int) -> dict:
            lo = b * self.global_batch + self.process_index * self.local_batch
            idx = np.arange(lo, lo + self.local_batch)
            valid = idx < n
            examples = [self._example(int(i), None) for i in np.where(valid, idx, 0)]
            return self.collate(examples, valid, None)

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
