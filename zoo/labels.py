"""Class names of the datasets pretrained weights come from, by the `dataset` of their `PretrainedCfg`.

A model's outputs are class indices; these lists name them for the command line, the exported sidecar and
visualisations. Detection weights trained on COCO by torchvision predict COCO's category ids (1-90, with gaps where
the 2014 paper's 91 categories lost 11 in the released annotations) plus the background at 0: their names list has
91 entries, "N/A" at the ids no category has, as torchvision's own metadata lists them.
"""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    text = resources.files("zoo").joinpath("data/imagenet_classes.txt").read_text()
    return tuple(line for line in text.splitlines() if line)


# torchvision's `_VOC_CATEGORIES`: the classes of its COCO-trained segmentation weights (Pascal VOC's 20 and background)
VOC_CATEGORIES = ("__background__", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                  "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
                  "tvmonitor")

# COCO 2017's category names at their category ids (index = id), the background at 0 and "N/A" at the 11 unused ids
COCO_CATEGORIES = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush")

_BY_DATASET = {"imagenet-1k": imagenet_labels, "coco-voc-labels": lambda: VOC_CATEGORIES,
               "coco-2017": lambda: COCO_CATEGORIES}


def dataset_labels(pretrained, num_classes: int | None = None) -> tuple[str, ...] | None:
    """The class names of a checkpoint's dataset (a `PretrainedCfg`), or None when unknown or when the names do not
    fit its class count (a checkpoint fine-tuned to other classes). Without a checkpoint, a 1000-class model is
    taken to be an ImageNet classifier (`num_classes` given)."""
    if pretrained is None:
        return imagenet_labels() if num_classes == 1000 else None
    names = _BY_DATASET.get(getattr(pretrained, "dataset", None))
    labels = names() if names is not None else None
    return labels if labels is not None and len(labels) == pretrained.num_classes else None
