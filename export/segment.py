"""Segmenting images with an exported segmentation model and its sidecar (what `zoo segment --tflite` and
`zoo predict --tflite` run for a segmentation file).

The sidecar says how to feed the file (input size, crop, mean/std) and names its classes; the file returns per-pixel
logits at its input size, and the labelling is their argmax. `zoo.masks` puts such a mask back onto the photo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.metadata import _cfg, preprocess_for, read


class TFLiteSegmenter:
    """An exported segmentation model: `cfg` (its input size and preprocessing, from the sidecar), `labels` (or
    None), and `logits(x)` / `masks(images)`."""

    def __init__(self, model_path: str | Path, num_threads: int | None = None):
        from export.runtime import LiteRTRunner

        meta = read(model_path)
        if meta.get("task") != "segmentation":
            raise ValueError(f"{model_path} holds a {meta.get('task') or 'classification'} model, not a segmentation "
                             "one (its sidecar's task)" + ("; classify with `zoo predict --tflite`"
                                                           if meta.get("task") in (None, "classification") else ""))
        self.path, self.meta, self.cfg = Path(model_path), meta, _cfg(meta)
        self.labels = tuple(meta["labels"]) if meta.get("labels") else None
        self.runner = LiteRTRunner(model_path, num_threads=num_threads)
        if self.runner.output is None:
            raise ValueError(f"{model_path} has outputs {list(self.runner.outputs)}; a segmentation file has one, the "
                             "per-pixel logits")

    @property
    def name(self) -> str:
        return self.meta["name"]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """(N, H, W, classes) float logits of a normalized float NHWC batch."""
        return self.runner.run(x)

    def masks(self, images) -> np.ndarray:
        """(N, H, W) class indices at the file's input size, of images preprocessed as the sidecar says (paths, PIL
        images, uint8 arrays, or an already-normalized float NHWC array)."""
        return self.logits(preprocess_for(self.meta, images)).argmax(-1)


def segment_tflite(model_path: str | Path, images, num_threads: int | None = None) -> np.ndarray:
    """(N, H, W) class indices at the file's input size from an exported segmentation model and its sidecar."""
    return TFLiteSegmenter(model_path, num_threads).masks(images)
