"""Detection examples from a tensorflow-datasets split (`coco/2017`, `voc/2007`, `voc/2012`, or any dataset whose
`objects` feature holds a `bbox` BBoxFeature and a `label` ClassLabel): `{"image", "boxes" (M, 4) float32 x1, y1, x2,
y2 in pixels, "classes" (M,) int32}`, the format of `train.box_sources`.

tfds stores boxes normalized as (ymin, xmin, ymax, xmax); they are scaled by each image's size when the example is
read. What the folder sources drop is dropped here too, when read: COCO's crowd regions (`is_crowd`) and VOC's
difficult objects (`is_difficult`), and boxes of no area after clipping to the image. Each kind of drop is logged
once per source, the first time it happens (a split of 118k images is not scanned before training).
"""

from __future__ import annotations

import logging

import numpy as np

from train.data import DataError, Source

log = logging.getLogger(__name__)

OBJECTS = "objects"
# per-object flags whose objects the training pipelines of torchvision and mmdetection leave out
DROPPED_FLAGS = {"is_crowd": "crowd regions", "is_difficult": "difficult objects"}


def is_detection_dataset(features, label_key: str = "label") -> bool:
    """Whether a tfds FeaturesDict describes detection data: no top-level `label_key`, and an `objects` sequence with
    a `bbox` and a `label`."""
    if label_key in features or OBJECTS not in features:
        return False
    inner = getattr(features[OBJECTS], "feature", None)
    keys = set(inner.keys()) if hasattr(inner, "keys") else set()
    return {"bbox", "label"} <= keys


class TfdsBoxSource(Source):
    """A detection split of a tfds dataset with random access (`tfds.data_source`), or read into memory once where
    the split is not stored for random access."""

    def __init__(self, name: str, split: str, *, data_dir: str | None = None, image_key: str = "image"):
        import tensorflow_datasets as tfds

        self.name, self.image_key = f"tfds:{name}[{split}]", image_key
        features = tfds.builder(name, data_dir=data_dir).info.features
        if image_key not in features:
            raise DataError(f"{self.name} has no feature '{image_key}'; features: {', '.join(features.keys())} "
                            "(set data.image_key)")
        if not is_detection_dataset(features):
            raise DataError(f"{self.name} has no '{OBJECTS}' feature with 'bbox' and 'label': not detection data")
        label = features[OBJECTS].feature["label"]
        self.num_classes = int(label.num_classes)
        self.class_names = tuple(label.names)
        self._logged: set[str] = set()
        try:
            self._source, self._memory = tfds.data_source(name, split=split, data_dir=data_dir), None
        except Exception:  # noqa: BLE001  (no ArrayRecord files: read the split once)
            self._source = None
            self._memory = [{image_key: r[image_key], OBJECTS: r[OBJECTS]}
                            for r in tfds.as_numpy(tfds.load(name, split=split, data_dir=data_dir))]
        if len(self) == 0:
            raise DataError(f"{self.name} is empty")

    def __len__(self):
        return len(self._memory) if self._memory is not None else len(self._source)

    def example(self, i: int) -> dict:
        record = self._memory[i] if self._memory is not None else self._source[int(i)]
        image = np.asarray(record[self.image_key])
        boxes, classes = self.boxes(record[OBJECTS], image.shape[:2])
        return {"image": image, "boxes": boxes, "classes": classes}

    def boxes(self, objects: dict, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(boxes in pixels, classes) of one record's `objects`, with the drops of the module doc."""
        h, w = int(hw[0]), int(hw[1])
        bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
        classes = np.asarray(objects["label"], np.int64).reshape(-1)
        keep = np.ones(len(bbox), bool)
        for flag, what in DROPPED_FLAGS.items():
            if flag in objects:
                marked = np.asarray(objects[flag], bool).reshape(-1)
                self._log_once(what, marked.any())
                keep &= ~marked
        boxes = bbox[:, [1, 0, 3, 2]] * np.array([w, h, w, h], np.float32)
        boxes = np.clip(boxes, 0, np.array([w, h, w, h], np.float32))
        empty = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        self._log_once("boxes of no area", bool((empty & keep).any()))
        keep &= ~empty
        if len(classes) and (classes.min() < 0 or classes.max() >= self.num_classes):
            raise DataError(f"{self.name}: an object has class {int(classes.max())}, outside the dataset's "
                            f"{self.num_classes} classes")
        return boxes[keep], classes[keep].astype(np.int32)

    def _log_once(self, what: str, happened: bool) -> None:
        if happened and what not in self._logged:
            self._logged.add(what)
            log.info("%s: dropping %s (as the folder sources do)", self.name, what)
