"""COCO's box detection protocol: mAP over IoU 0.50:0.95, AP50, AP75, AP by object size and the average recalls,
computed by `faster-coco-eval` (a maintained C++ port of pycocotools' COCOeval that gives its numbers), not by a
hand-written mAP.

    metrics = coco_box_metrics(ground_truth, detections)
    metrics["map"], metrics["ap50"]

`ground_truth`: one dict per image, `{"boxes": (M, 4) x1, y1, x2, y2 in pixels, "classes": (M,) category ids}` and
optionally `"iscrowd"` (M,) (crowd regions neither count as misses nor as false positives, as in COCO). `detections`:
one dict per image, in the same order, `{"boxes": (D, 4), "scores": (D,), "labels": (D,)}` and optionally `"valid"`
(D,) (the padded rows of a static-shape post-processing are dropped). Category ids are whatever both use (SSD's 1..90
with 0 the background, an anchor-free head's 0..C-1). Object size is the box area, as COCO's annotation area for boxes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

INSTALL = "pip install faster-coco-eval (or the project's extra: pip install 'jax-vision-zoo[detection]')"

# COCOeval's `stats`, in its order
STATS = ("map", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
         "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


def coco_box_metrics(ground_truth: Sequence[Mapping], detections: Sequence[Mapping],
                     categories: Sequence[int] | None = None) -> dict[str, float]:
    """COCO's 12 box metrics (`STATS`) by name. A metric COCO leaves undefined (no ground truth of that size) is NaN,
    where COCOeval writes -1. `categories`: the category ids evaluated (default: those in the ground truth and the
    detections); AP is averaged over the categories that have ground truth, as COCO does."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        raise ImportError(f"COCO evaluation needs faster-coco-eval: {INSTALL}") from None
    if len(ground_truth) != len(detections):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(detections)} detection entries: give one "
                         "detections dict per image, in the same order (an empty one where nothing was found)")
    gt, dt = _ground_truth(ground_truth), _detections(detections)
    ids = sorted({a["category_id"] for a in gt["annotations"]} | {d["category_id"] for d in dt}
                 if categories is None else {int(c) for c in categories})
    gt["categories"] = [{"id": c, "name": str(c)} for c in ids]
    if not gt["annotations"]:
        raise ValueError("no ground-truth boxes in any image: COCO's AP is undefined without objects")
    if not dt:  # COCOeval cannot load an empty result list; nothing detected is AP 0 wherever there are objects
        return {name: 0.0 for name in STATS} | _undefined_sizes(gt)
    coco_gt = COCO(gt)
    coco_dt = coco_gt.loadRes(dt)
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=lambda *a, **k: None)
    evaluator.params.catIds = ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {name: (float("nan") if v < 0 else float(v)) for name, v in zip(STATS, evaluator.stats)}


def _xywh(boxes) -> np.ndarray:
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def _ground_truth(images: Sequence[Mapping]) -> dict:
    annotations, out_images = [], []
    for i, im in enumerate(images):
        out_images.append({"id": i + 1})
        boxes, classes = _xywh(im["boxes"]), np.asarray(im["classes"]).reshape(-1)
        crowd = np.asarray(im.get("iscrowd", np.zeros(len(classes))), bool).reshape(-1)
        if len(classes) != len(boxes) or len(crowd) != len(boxes):
            raise ValueError(f"ground-truth image {i}: {len(boxes)} boxes, {len(classes)} classes, {len(crowd)} "
                             "crowd flags")
        for b, c, cr in zip(boxes, classes, crowd):
            if b[2] <= 0 or b[3] <= 0:
                raise ValueError(f"ground-truth image {i}: box {b.tolist()} (x, y, w, h) has no area")
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(c),
                                "bbox": b.tolist(), "area": float(b[2] * b[3]), "iscrowd": int(cr)})
    return {"images": out_images, "annotations": annotations}


def _detections(images: Sequence[Mapping]) -> list[dict]:
    out = []
    for i, det in enumerate(images):
        boxes, scores = _xywh(det["boxes"]), np.asarray(det["scores"], np.float64).reshape(-1)
        labels = np.asarray(det["labels"]).reshape(-1)
        valid = np.asarray(det.get("valid", np.ones(len(scores))), bool).reshape(-1)
        if not len(boxes) == len(scores) == len(labels) == len(valid):
            raise ValueError(f"detections of image {i}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} "
                             f"labels, {len(valid)} valid flags")
        for b, s, c in zip(boxes[valid], scores[valid], labels[valid]):
            out.append({"image_id": i + 1, "category_id": int(c), "bbox": b.tolist(), "score": float(s)})
    return out


def _undefined_sizes(gt: dict) -> dict[str, float]:
    """The size metrics COCO leaves undefined where no ground-truth box has that size (its area ranges, bounds
    included: small up to 32^2, medium 32^2 to 96^2, large from 96^2)."""
    areas = np.array([a["area"] for a in gt["annotations"]])
    present = {"small": (areas <= 32 ** 2).any(), "medium": ((areas >= 32 ** 2) & (areas <= 96 ** 2)).any(),
               "large": (areas >= 96 ** 2).any()}
    return {f"{kind}_{size}": float("nan") for size, has in present.items() if not has for kind in ("ap", "ar")}
