"""Detecting objects with an exported detection model and its sidecar (what `zoo detect --tflite` and `zoo predict
--tflite` run for a detection file).

The sidecar says how to feed the file (input size, mean/std) and names its classes; the file returns boxes after its
own decoding and NMS (`export.detection`), in input pixels. Images are resized to the input size whole (a detector
sees the whole image: the sidecar's crop is not applied), so each box maps back to the original image by the two
scale factors of that resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.metadata import read


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the original image's pixels
    label: int  # the model's class id
    name: str  # the sidecar's label name, else the id
    score: float

    def as_dict(self) -> dict:
        return {"box": [round(v, 2) for v in self.box], "label": self.label, "name": self.name,
                "score": round(self.score, 5)}


def load_rgb(image) -> np.ndarray:
    """A path, PIL image or HxWx3 uint8 array -> an HxWx3 uint8 array."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected an HxWx3 image array, got shape {image.shape}")
        return np.asarray(image, np.uint8)
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"no image file {image}")
        with Image.open(image) as im:
            return np.asarray(im.convert("RGB"))
    return np.asarray(image.convert("RGB"))


def detector_input(images: list[np.ndarray], hw: tuple[int, int], mean, std) -> np.ndarray:
    """Whole images resized (bilinear, as the model's own preprocessing) to `hw` and normalized: float NHWC."""
    from PIL import Image

    out = [np.asarray(Image.fromarray(im).resize((hw[1], hw[0]), Image.BILINEAR), np.float32) / 255.0
           for im in images]
    return ((np.stack(out) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def to_original(out: dict, sizes: list[tuple[int, int]], hw: tuple[int, int], labels, score_threshold: float
                ) -> list[list[Detection]]:
    """Per image, the valid detections scoring >= `score_threshold` (`out`: the file's, or JAX's, outputs by name),
    boxes scaled from the `hw` input back to each image's (H, W)."""
    result = []
    for i, (h, w) in enumerate(sizes):
        scale = np.asarray([w / hw[1], h / hw[0], w / hw[1], h / hw[0]])
        keep = np.asarray(out["valid"][i]).astype(bool) & (np.asarray(out["scores"][i]) >= score_threshold)
        dets = []
        for j in np.flatnonzero(keep):
            label = int(out["classes"][i][j])
            name = labels[label] if labels is not None and 0 <= label < len(labels) else str(label)
            box = tuple(float(v) for v in np.asarray(out["boxes"][i][j], np.float64) * scale)
            dets.append(Detection(box, label, name, float(out["scores"][i][j])))
        result.append(sorted(dets, key=lambda d: -d.score))
    return result


class TFLiteDetector:
    """An exported detection model: `meta` (its sidecar), `labels` (or None), and `detect(images)`."""

    def __init__(self, model_path: str | Path, num_threads: int | None = None):
        from export.runtime import LiteRTRunner

        if not Path(model_path).is_file():
            raise FileNotFoundError(f"no model file {model_path}")
        meta = read(model_path)
        if meta.get("task") != "detection":
            raise ValueError(f"{model_path} holds a {meta.get('task') or 'classification'} model, not a detection "
                             "one (its sidecar's task)")
        self.path, self.meta = Path(model_path), meta
        self.hw = tuple(meta["input_hw"])
        self.labels = tuple(meta["labels"]) if meta.get("labels") else None
        self.runner = LiteRTRunner(model_path, num_threads=num_threads)
        want = set(meta["detection"]["outputs"])
        if set(self.runner.outputs) != want:
            raise ValueError(f"{model_path} has outputs {list(self.runner.outputs)}; its sidecar names {sorted(want)}")

    @property
    def name(self) -> str:
        return self.meta["name"]

    def detect(self, images, score_threshold: float = 0.3) -> list[list[Detection]]:
        """Detections per image (paths, PIL images or HxWx3 uint8 arrays; one or a list), boxes in each original
        image's pixels, by decreasing score. A threshold below the file's own (its sidecar's settings) returns
        what the file kept."""
        items = images if isinstance(images, (list, tuple)) else [images]
        rgb = [load_rgb(im) for im in items]
        out = self.runner.run(detector_input(rgb, self.hw, self.meta["mean"], self.meta["std"]))
        return to_original(out, [im.shape[:2] for im in rgb], self.hw, self.labels, score_threshold)


def detect_tflite(model_path: str | Path, images, score_threshold: float = 0.3,
                  num_threads: int | None = None) -> list[list[Detection]]:
    """Detections per image from an exported detection model and its sidecar (see `TFLiteDetector.detect`)."""
    return TFLiteDetector(model_path, num_threads).detect(images, score_threshold)
