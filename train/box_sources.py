"""Sources of detection examples on disk: `{"image": path, "boxes": (M, 4) float32 x1, y1, x2, y2 in pixels,
"classes": (M,) int32}`, with class ids counted from 0 over the dataset's categories in id order.

- COCO's format (`CocoSource`): an instances JSON (`images`, `annotations` with `bbox` [x, y, w, h], `categories`)
  beside a folder of the images it names (`write_coco` writes one).
- Pascal VOC's (`VocBoxSource`): `Annotations/<id>.xml`, `JPEGImages/<id>.jpg` and `ImageSets/Main/<split>.txt`.

What is read is checked once, when the source opens, and what cannot be used is said there:
- a box reaching outside its image is clipped to it; a box of no area (after clipping) is dropped;
- COCO crowd regions (`iscrowd`) and VOC's `difficult` objects are dropped (they mark regions, not instances to
  learn, as torchvision's and mmdetection's training pipelines treat them);
- an annotation whose image id the JSON does not list is dropped;
- an image without boxes stays, as a negative example;
- each of those is counted in one log line (`logging`, this module's logger);
- an error, naming the file and the entry: a category or class name the dataset does not declare, an image file
  that is missing, a JSON or XML file that cannot be read.
COCO's category ids map back from class ids with `source.category_ids` (for COCO's evaluator).

Folders (`open_box_folder`, which `train.sources.open_source` asks after the segmentation layouts): VOC's detection
layout; COCO's own (`annotations/instances_<split>.json`, images in `<split>/`); or `write_coco`'s, one folder per split
(`<split>/<name>.json` beside `<split>/images/`) or the folder itself for every split.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from train.data import DataError, Source

log = logging.getLogger(__name__)

# Pascal VOC's 20 object classes (the devkit's `VOCopts.classes`), class ids 0..19
VOC_OBJECT_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                      "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                      "tvmonitor")


class BoxSource(Source):
    """Examples from per-image records `(path, boxes, classes)` already checked (see the module doc)."""

    def __init__(self, name: str, records: list[tuple[Path, np.ndarray, np.ndarray]], class_names: Sequence[str]):
        self.name, self.records = name, records
        self.class_names, self.num_classes = tuple(class_names), len(class_names)

    def __len__(self):
        return len(self.records)

    def example(self, i: int) -> dict:
        path, boxes, classes = self.records[i]
        return {"image": str(path), "boxes": boxes.copy(), "classes": classes.copy()}


class CocoSource(BoxSource):
    """A COCO-format instances JSON and the folder of its images (see the module doc)."""

    def __init__(self, annotations: str | os.PathLike, images: str | os.PathLike):
        annotations, images = Path(annotations), Path(images)
        try:
            data = json.loads(annotations.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the COCO annotations {annotations}: {e}") from None
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DataError(f"{annotations} is not a COCO instances file: no '{key}' list")
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = tuple(int(c["id"]) for c in categories)
        index = {cid: k for k, cid in enumerate(self.category_ids)}
        entries = {int(im["id"]): im for im in data["images"]}
        counts: Counter = Counter()
        per_image: dict[int, list] = {i: [] for i in entries}
        for ann in data["annotations"]:
            if int(ann["category_id"]) not in index:
                raise DataError(f"{annotations}: annotation {ann.get('id')} has category_id {ann['category_id']}, "
                                f"which its 'categories' do not declare (ids {list(self.category_ids)[:20]})")
            if int(ann["image_id"]) not in entries:
                counts["naming an image not listed"] += 1
                continue
            if ann.get("iscrowd", 0):
                counts["crowd regions"] += 1
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            per_image[int(ann["image_id"])].append(([x, y, x + w, y + h], index[int(ann["category_id"])]))
        records = []
        for image_id, im in entries.items():
            path = images / im["file_name"]
            if not path.is_file():
                raise DataError(f"{annotations}: image {image_id} is {path}, which does not exist")
            size = (im.get("width"), im.get("height"))
            records.append(_record(path, per_image[image_id], size, counts))
        super().__init__(annotations.stem, records, [c.get("name", str(c["id"])) for c in categories])
        _log_counts(annotations, len(records), counts)


class VocBoxSource(BoxSource):
    """Pascal VOC's detection layout for one split (see the module doc); class names from a `labels.txt` at the
    root (one per line, in class-id order), else VOC's 20."""

    def __init__(self, root: str | os.PathLike, split: str, class_names: Sequence[str] | None = None):
        root = Path(root)
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise DataError(f"no split list {listing} (VOC's detection layout: Annotations/, JPEGImages/, "
                            "ImageSets/Main/<split>.txt)")
        labels = root / "labels.txt"
        names = tuple(class_names or (labels.read_text().split() if labels.is_file() else VOC_OBJECT_CLASSES))
        index = {n: k for k, n in enumerate(names)}
        counts: Counter = Counter()
        records = []
        for stem in listing.read_text().split():
            xml = root / "Annotations" / f"{stem}.xml"
            try:
                tree = ET.parse(xml).getroot()
            except (OSError, ET.ParseError) as e:
                raise DataError(f"cannot read {xml}: {e}") from None
            objects = []
            for obj in tree.iter("object"):
                name = (obj.findtext("name") or "").strip()
                if name not in index:
                    raise DataError(f"{xml}: object class '{name}' is not one of the dataset's classes "
                                    f"({', '.join(names[:20])})")
                if int(obj.findtext("difficult") or 0):
                    counts["difficult objects"] += 1
                    continue
                box = obj.find("bndbox")
                # VOC counts pixels from 1, ends included: pixel i spans [i - 1, i) in continuous coordinates
                x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                objects.append(([x1 - 1, y1 - 1, x2, y2], index[name]))
            size = tree.find("size")
            wh = (None, None) if size is None else (float(size.findtext("width")), float(size.findtext("height")))
            path = root / "JPEGImages" / f"{stem}.jpg"
            if not path.is_file():
                raise DataError(f"{xml} describes {path}, which does not exist")
            records.append(_record(path, objects, wh, counts))
        super().__init__(f"{root.name}/{split}", records, names)
        _log_counts(listing, len(records), counts)


def box_layout(root: Path) -> str | None:
    """"voc", "coco", "coco_folder" or None: the detection layout of the folder `root` (see the module doc)."""
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir() and (root / "ImageSets" / "Main").is_dir():
        return "voc"
    if (root / "annotations").is_dir() and any((root / "annotations").glob("instances_*.json")):
        return "coco"
    if (root / "images").is_dir() and len(list(root.glob("*.json"))) == 1:
        return "coco_folder"
    return None


def open_box_folder(root: Path, split: str, class_names: Sequence[str] | None = None) -> Source | None:
    """The detection source of `root` for `split`, or None when `root` is in no detection layout. `class_names` (the
    training split's) must be the split's own classes, in the same order."""
    kind = box_layout(root)
    if kind == "voc":
        return VocBoxSource(root, split, class_names)
    if kind == "coco":
        annotations = root / "annotations" / f"instances_{split}.json"
        if not annotations.is_file():
            have = sorted(p.stem[len("instances_"):] for p in (root / "annotations").glob("instances_*.json"))
            raise DataError(f"{root} has no split '{split}': {annotations} not found (splits: {', '.join(have)})")
        source = CocoSource(annotations, root / split)
    elif box_layout(root / split) == "coco_folder":
        source = CocoSource(next((root / split).glob("*.json")), root / split / "images")
    elif kind == "coco_folder":
        source = CocoSource(next(root.glob("*.json")), root / "images")
    else:
        return None
    if class_names is not None and tuple(class_names) != source.class_names:
        raise DataError(f"{source.name} ({split}) has the classes {', '.join(source.class_names[:10])}, the training "
                        f"data {', '.join(tuple(class_names)[:10])}: the splits must declare the same categories")
    return source


def has_box_split(root: Path, split: str) -> bool | None:
    """Whether a folder in a detection layout has `split` (None: not such a folder)."""
    kind = box_layout(root)
    if kind == "voc":
        return (root / "ImageSets" / "Main" / f"{split}.txt").is_file()
    if kind == "coco":
        return (root / "annotations" / f"instances_{split}.json").is_file()
    if box_layout(root / split) == "coco_folder":
        return True
    return False if kind == "coco_folder" else None


def _record(path: Path, objects: list, size: tuple, counts: Counter) -> tuple[Path, np.ndarray, np.ndarray]:
    """(path, boxes clipped to the image, classes), boxes of no area dropped; the size read from the file when the
    annotation does not give it."""
    w, h = size
    if w is None or h is None:
        with Image.open(path) as im:
            w, h = im.size
    boxes = np.asarray([b for b, _ in objects], np.float32).reshape(-1, 4)
    classes = np.asarray([c for _, c in objects], np.int32)
    clipped = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    counts["boxes clipped to their image"] += int((clipped != boxes).any(axis=1).sum())
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    counts["boxes of no area"] += int((~keep).sum())
    counts["images without boxes (kept as negatives)"] += int(not keep.any())
    return path, clipped[keep], classes[keep]


def _log_counts(where: Path, images: int, counts: Counter) -> None:
    said = ", ".join(f"{n} {what}" for what, n in sorted(counts.items()) if n)
    log.info("%s: %d images%s", where, images, f"; {said}" if said else "")


def write_coco(root: str | os.PathLike, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray],
               classes: Sequence[np.ndarray], class_names: Sequence[str], *, name: str = "instances") -> Path:
    """Write `root/images/<k>.jpg` and `root/<name>.json` (COCO's instances format, category ids 1..K in the order
    of `class_names`, boxes (x1, y1, x2, y2) in pixels stored as COCO's [x, y, w, h]), atomically per file. Returns
    the JSON's path."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    out = {"images": [], "annotations": [],
           "categories": [{"id": k + 1, "name": str(n)} for k, n in enumerate(class_names)]}
    for k, (image, b, c) in enumerate(zip(images, boxes, classes)):
        file = f"{k:06d}.jpg"
        tmp = root / "images" / f".{file}.tmp"
        Image.fromarray(np.asarray(image)).save(tmp, format="JPEG", quality=95)
        os.replace(tmp, root / "images" / file)
        h, w = np.asarray(image).shape[:2]
        out["images"].append({"id": k + 1, "file_name": file, "width": int(w), "height": int(h)})
        for box, cls in zip(np.asarray(b, float).reshape(-1, 4), np.asarray(c).reshape(-1)):
            x1, y1, x2, y2 = (float(v) for v in box)
            out["annotations"].append({"id": len(out["annotations"]) + 1, "image_id": k + 1,
                                       "category_id": int(cls) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                       "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    path = root / f"{name}.json"
    tmp = root / f".{name}.json.tmp"
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)
    return path
