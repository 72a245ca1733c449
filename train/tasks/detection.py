"""Object detection: trains the zoo's two detector kinds, chosen from the model's family module
(`zoo.models.<family>`), and evaluates them by COCO's protocol on the model's own post-processing.

- **SSD** (a family module with `anchors(image_size)`, e.g. `ssdlite`): torchvision's recipe. Anchors are matched to
  the boxes by `detection_targets.ssd_match` (IoU >= 0.5, each box's best anchor forced), the loss is
  `detection_losses.ssd_loss_terms` (smooth-L1 on the offsets of (10, 10, 5, 5)-weighted box coding at the
  positives, cross-entropy with 3:1 hard negative mining, both over the number of positives). Class 0 is the
  background: a model of K + 1 classes learns the data's classes 0..K-1 as 1..K.
- **Anchor-free GFL** (a family module with `points(image_size)`, e.g. `gfl_lite`): ATSS assignment
  (`detection_targets.atss_assign`), Quality Focal Loss, GIoU loss and Distribution Focal Loss
  (`detection_losses.gfl_loss_terms`) as GFL and NanoDet define them. A model of K classes learns classes 0..K-1.

Examples carry `boxes` (M, 4) x1, y1, x2, y2 in pixels and `classes` (M,) ids from 0 (`train.box_sources`). Batch
format: `image` float32 (B, H, W, C) normalized; `boxes` float32 (B, max_boxes, 4) in input pixels, `classes` int32
(B, max_boxes) and `box_valid` float32 (B, max_boxes), padded by `pad_ragged`; `valid` float32 (B,), 0 for padding;
in evaluation also `orig_size` int32 (B, 2), each image's (height, width) before resizing.

Training resizes (or random-resized-crops) and flips as `data` says; evaluation resizes the whole image to the input
size, as the exported detector sees it. Evaluation decodes and suppresses with the family's `postprocess` at its
`DETECTION` settings (what `export.detection` exports), scales detections and ground truth back to each image's own
pixels, and reports COCO's box metrics (`train.coco_eval`: `map` over IoU 0.50:0.95, `ap50`, `ap75`, `ap_small`,
`ap_medium`, `ap_large` and the average recalls), with the loss (the mean of the evaluation batches' losses). The best
checkpoint is the one of highest `map`.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from dataclasses import dataclass
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from train.data import DataError
from train.tasks.base import HostEvaluator, Task, TaskConfig, pad_ragged, register_task, reset_classifiers
from train.tasks.detection_losses import DFL_WEIGHT, GIOU_WEIGHT, NEG_TO_POS, gfl_loss_terms, ssd_loss_terms
from train.tasks.detection_targets import atss_assign, ssd_match
from train.transforms import Transform, transforms_for
from zoo.models.anchor_free_postprocess import decode as decode_distributions

log = logging.getLogger("train")

CHECKED_BEFORE_TRAINING = 5000  # examples whose boxes and classes are checked before the first step (spread)


@dataclass
class DetectionConfig(TaskConfig):
    kind: str = "detection"
    max_boxes: int = 100  # boxes a batch holds per image (static shape); an image with more is an error
    match_iou: float = 0.5  # SSD: IoU from which an anchor is matched to a box
    neg_to_pos: int = NEG_TO_POS  # SSD: hard negatives per positive
    atss_topk: int = 9  # GFL: ATSS candidates per level and box
    atss_anchor_scale: float = 5.0  # GFL: ATSS measures IoU with squares this many strides wide (NanoDet's 5)


class _Head:
    """What the task needs of a detector kind: its loss and its detections (labels as data classes)."""

    background = False  # whether class 0 is the background (the data's class k is the model's k + 1)

    def __init__(self, family):
        self.family = family

    def detections(self, outputs, image_size) -> dict:
        out = dict(self.family.postprocess(outputs, image_size, self.family.DETECTION))
        out["labels"] = out["labels"] - int(self.background)
        return out


class _SsdHead(_Head):
    background = True

    def loss(self, task, outputs, batch, image_size):
        anchors = self.family.anchors(image_size)
        matches = jax.vmap(ssd_match, (None, 0, 0, None))(anchors, batch["boxes"], batch["box_valid"] > 0,
                                                           task.match_iou)
        box, cls, positives = ssd_loss_terms(outputs["cls_logits"], outputs["bbox_regression"], anchors, matches,
                                             batch["boxes"], batch["classes"] + 1, batch["valid"],
                                             neg_to_pos=task.neg_to_pos)
        n = jnp.maximum(positives, 1.0)
        return (box + cls) / n, {"box_loss": box / n, "cls_loss": cls / n, "positives": positives}


class _GflHead(_Head):
    def loss(self, task, outputs, batch, image_size):
        points, strides = self.family.points(image_size)
        assign = jax.vmap(lambda b, v: atss_assign(points, strides, b, v, topk=task.atss_topk,
                                                   anchor_scale=task.atss_anchor_scale))
        assigned = assign(batch["boxes"], batch["box_valid"] > 0)
        pred_boxes = decode_distributions(outputs["box_regression"].astype(jnp.float32), points, strides)
        qfl, giou, dfl, positives, weights = gfl_loss_terms(
            outputs["cls_logits"], outputs["box_regression"], points, strides, assigned, batch["boxes"],
            batch["classes"], batch["valid"], pred_boxes=pred_boxes)
        qfl = qfl / jnp.maximum(positives, 1.0)
        giou, dfl = (jnp.where(weights > 0, x / jnp.maximum(weights, 1e-12), 0.0) for x in (giou, dfl))
        loss = qfl + GIOU_WEIGHT * giou + DFL_WEIGHT * dfl
        return loss, {"qfl": qfl, "giou_loss": giou, "dfl": dfl, "positives": positives}


def detector_head(model_cfg) -> _Head:
    """The detector kind of a model, from its family module: SSD where it has `anchors`, anchor-free GFL where it
    has `points`; both need `postprocess` and `DETECTION`."""
    try:
        family = importlib.import_module(f"zoo.models.{model_cfg.family}")
    except ModuleNotFoundError:
        family = None
    kind = (None if family is None or not all(hasattr(family, k) for k in ("postprocess", "DETECTION")) else
            _SsdHead if hasattr(family, "anchors") else _GflHead if hasattr(family, "points") else None)
    if kind is None:
        raise ValueError(f"{model_cfg.name}: its family {model_cfg.family!r} has no zoo.models.{model_cfg.family} "
                         "with postprocess, DETECTION and anchors (SSD) or points (anchor-free) to train it with")
    return kind(family)


@dataclass(frozen=True)
class SizedTransform:
    """`transform`, adding each example's `orig_size` (height, width) before it is resized."""

    transform: Transform

    def __call__(self, example, rng):
        if not isinstance(example, Mapping):
            return self.transform(example, rng)
        out = self.transform(example, rng)
        out["orig_size"] = np.asarray(_image_size(example["image"]), np.int32)
        return out


def _image_size(image) -> tuple[int, int]:
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:  # reads the header only
            return im.size[::-1]
    if isinstance(image, Image.Image):
        return image.size[::-1]
    return tuple(np.asarray(image).shape[:2])


class CocoEvaluator(HostEvaluator):
    """Every evaluation image's detections and ground truth, in its own pixels, scored by `coco_box_metrics`."""

    keys = ("det_boxes", "det_scores", "det_labels", "det_valid", "gt_boxes", "gt_classes", "gt_valid", "scale",
            "valid")

    def __init__(self):
        self.ground_truth, self.detections = [], []

    def add(self, outputs):
        o = {k: np.asarray(v) for k, v in outputs.items()}
        for i in np.flatnonzero(o["valid"] > 0):
            s = np.tile(o["scale"][i], 2)  # (sx, sy, sx, sy)
            keep = o["gt_valid"][i] > 0
            self.ground_truth.append({"boxes": o["gt_boxes"][i][keep] * s, "classes": o["gt_classes"][i][keep]})
            self.detections.append({"boxes": o["det_boxes"][i] * s, "scores": o["det_scores"][i],
                                    "labels": o["det_labels"][i], "valid": o["det_valid"][i]})

    def summarize(self):
        from train.coco_eval import coco_box_metrics

        if not any(len(g["classes"]) for g in self.ground_truth):
            raise DataError("the evaluation data has no boxes: COCO's mAP is undefined without objects")
        return coco_box_metrics(self.ground_truth, self.detections)


@register_task("detection", DetectionConfig)
class Detection(Task):
    target_keys = ("boxes", "classes")
    metric_names = ("loss", "positives")
    best_metric, best_mode = "map", "max"

    def __init__(self, num_classes: int, *, max_boxes: int = 100, match_iou: float = 0.5,
                 neg_to_pos: int = NEG_TO_POS, atss_topk: int = 9, atss_anchor_scale: float = 5.0,
                 model_cfg=None):
        self.num_classes, self.max_boxes = num_classes, max_boxes
        self.match_iou, self.neg_to_pos = match_iou, neg_to_pos
        self.atss_topk, self.atss_anchor_scale = atss_topk, atss_anchor_scale
        self.head: _Head | None = None
        if model_cfg is not None:
            self.bind(model_cfg)

    @classmethod
    def from_config(cls, cfg: DetectionConfig, *, num_classes: int) -> "Detection":
        return cls(num_classes, max_boxes=cfg.max_boxes, match_iou=cfg.match_iou, neg_to_pos=cfg.neg_to_pos,
                   atss_topk=cfg.atss_topk, atss_anchor_scale=cfg.atss_anchor_scale)

    def bind(self, model_cfg) -> "Detection":
        """Pick the detector kind of the model this task trains (`validate` and `transforms` do, before any step)."""
        self.head = detector_head(model_cfg)
        return self

    @property
    def data_classes(self) -> int:
        """How many classes the data may have: the model's, less the background of an SSD."""
        return self.num_classes - int(self.head.background)

    # ---- data ----

    def transforms(self, data, model_cfg):
        self.bind(model_cfg)
        train, evaluation = transforms_for(data, model_cfg, required=self.target_keys)
        # the whole image resized to the input, whatever the crop settings: a crop would cut the boxes evaluated
        return train, SizedTransform(dataclasses.replace(evaluation, crop_pct=1.0))

    def validate(self, source, model_cfg, *, gray_to_rgb=False, what="training"):
        if getattr(model_cfg, "task", "detection") != "detection":
            raise ValueError(f"{model_cfg.name} is a {model_cfg.task} model; the detection task trains detectors "
                             "(zoo.list_models(task='detection'))")
        if model_cfg.num_classes != self.num_classes:
            raise ValueError(f"the model has {model_cfg.num_classes} classes and the task {self.num_classes}")
        self.bind(model_cfg)
        super().validate(source, model_cfg, gray_to_rgb=gray_to_rgb, what=what)
        background = " (class 0 of an SSD is the background: set model.num_classes to the data's classes + 1)" \
            if self.head.background else " (set model.num_classes)"
        if source.num_classes is not None and source.num_classes > self.data_classes:
            raise DataError(f"{what} data ({source.name}) has {source.num_classes} classes but the model learns "
                            f"{self.data_classes}{background}")
        ids = tuple(getattr(source, "category_ids", ()))
        if self.head.background and ids and ids != tuple(range(1, len(ids) + 1)) and max(ids) < self.num_classes:
            log.warning("%s: the model's class k + 1 is the data's k-th category (in id order), not COCO category id "
                        "k + 1 as in torchvision's COCO-trained SSD (category ids %s...)", source.name, ids[:5])
        n = min(len(source), CHECKED_BEFORE_TRAINING)
        for i in np.unique(np.linspace(0, len(source) - 1, n).astype(int)):
            try:
                self._check(source.example(int(i)), background)
            except DataError as e:
                raise DataError(f"{what} data ({source.name}), example {i}: {e}") from None

    def _check(self, ex: dict, background: str) -> None:
        boxes, classes = np.asarray(ex["boxes"]), np.asarray(ex["classes"])
        if not (boxes.ndim == 2 and boxes.shape[1] == 4) and boxes.size:
            raise DataError(f"boxes of shape {boxes.shape}: expected (M, 4) x1, y1, x2, y2 in pixels")
        m = len(boxes.reshape(-1, 4))
        if classes.shape != (m,) or (m and not np.issubdtype(classes.dtype, np.integer)):
            raise DataError(f"{m} boxes but classes of {classes.dtype} {classes.shape}: expected ({m},) integer ids")
        bad = (classes < 0) | (classes >= self.data_classes)
        if bad.any():
            raise DataError(f"class id {int(classes[bad][0])} outside [0, {self.data_classes}){background}")
        if m > self.max_boxes:
            raise DataError(f"{m} boxes, more than task.max_boxes={self.max_boxes} (raise it)")
        b = boxes.reshape(-1, 4).astype(np.float64)
        if not np.isfinite(b).all() or np.any(b[:, 2:] <= b[:, :2]):
            raise DataError("a box that is not finite or has x2 <= x1 or y2 <= y1 (boxes are x1, y1, x2, y2)")

    def collate(self, examples, valid, rng):
        boxes, box_valid = pad_ragged([np.asarray(ex["boxes"], np.float32).reshape(-1, 4) for ex in examples],
                                      self.max_boxes, 0.0, np.float32)
        classes, _ = pad_ragged([np.asarray(ex["classes"], np.int32).reshape(-1) for ex in examples],
                                self.max_boxes, 0, np.int32)
        batch = {"image": np.stack([ex["image"] for ex in examples]), "boxes": boxes, "classes": classes,
                 "box_valid": box_valid.astype(np.float32), "valid": np.asarray(valid, np.float32)}
        if "orig_size" in examples[0]:
            batch["orig_size"] = np.stack([ex["orig_size"] for ex in examples]).astype(np.int32)
        return batch

    def adapt(self, module, base, model_cfg):
        """A loaded detector with other classes gets zero class predictors (every path of `ModelCfg.classifier`) of
        this task's size; the rest must fit."""
        if base.cfg.num_classes == self.num_classes:
            return base.variables
        log.warning("%s: class predictors %s re-initialized for %d classes (the loaded model has %d)", base.cfg.name,
                    base.cfg.classifier, self.num_classes, base.cfg.num_classes)
        return reset_classifiers(module, base, model_cfg)

    # ---- loss and metrics ----

    def _head(self) -> _Head:
        if self.head is None:
            raise RuntimeError("the detection task is not bound to a model yet: Detection(..., model_cfg=cfg) or "
                               "task.bind(model_cfg)")
        return self.head

    def loss(self, forward, batch, *, task_params, consts, rng):
        loss, metrics = self._head().loss(self, forward(batch["image"]), batch, batch["image"].shape[1:3])
        return loss, {"loss": loss, **metrics}

    def eval_sums(self, forward, batch):
        head, image_size = self._head(), batch["image"].shape[1:3]
        outputs = forward(batch["image"])
        loss, _ = head.loss(self, outputs, batch, image_size)
        found = head.detections(outputs, image_size)
        size = batch.get("orig_size", jnp.broadcast_to(jnp.asarray(image_size), (batch["image"].shape[0], 2)))
        scale = size[:, ::-1].astype(jnp.float32) / jnp.asarray(image_size[::-1], jnp.float32)  # (sx, sy)
        return {"loss": loss, "batches": jnp.ones(()),
                "det_boxes": found["boxes"], "det_scores": found["scores"], "det_labels": found["labels"],
                "det_valid": found["valid"], "gt_boxes": batch["boxes"], "gt_classes": batch["classes"],
                "gt_valid": batch["box_valid"], "scale": scale, "valid": batch["valid"]}

    def summarize(self, sums):
        return {"loss": float(sums["loss"]) / max(float(sums["batches"]), 1.0)}

    def host_evaluator(self) -> CocoEvaluator:
        return CocoEvaluator()

