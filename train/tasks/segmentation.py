"""Semantic segmentation: per-pixel softmax cross-entropy with an ignore index, an optional auxiliary loss, and
evaluation by a confusion matrix over the whole evaluation set (mIoU, pixel accuracy, per-class IoU).

As torchvision's reference (`references/segmentation/train.py`): the loss is `cross_entropy(..., ignore_index=255)`
averaged over the pixels that are not ignored, plus 0.5 times the same loss of the `"aux"` output when the model has
one; `ConfusionMatrix` accumulates (target, prediction) counts of every non-ignored pixel, and IoU per class is
diag / (row sum + column sum - diag), "global correct" (pixel accuracy) diag.sum() / total. Unlike torchvision's mean,
which is NaN when a class is absent from both the targets and the predictions, mIoU here averages the classes that
occur in either.

Examples carry `mask` ((H, W) class ids, `ignore_index` where unlabelled). Batch format: `image` float32 (B, H, W, C)
normalized; `mask` int32 (B, H, W); `valid` float32 (B,), 0 for padding. The model returns `{"out": logits}` (plus
`"aux"`), each (B, H, W, K) at the input size, as the zoo's segmentation models do (a bare logits array is taken as
`"out"`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from train.data import DataError
from train.mask_transforms import SegmentationTransform, check_example
from train.state import flatten, unflatten
from train.tasks.base import Task, TaskConfig, check_shapes, model_shapes, register_task
from train.transforms import MASK_IGNORE

log = logging.getLogger("train")

CHECKED_BEFORE_TRAINING = 64  # examples checked before the first step (and every mask held in one array)


@dataclass
class SegmentationConfig(TaskConfig):
    kind: str = "segmentation"
    aux_weight: float = 0.5  # weight of the auxiliary head's loss (torchvision's reference: 0.5); 0: ignored
    ignore_index: int = MASK_IGNORE  # mask value of unlabelled pixels (VOC: 255 on object boundaries)
    label_smoothing: float = 0.0
    crop_size: int | None = None  # square training crop; None: the model's input size (data.image_size)
    scale_range: tuple[float, float] = (0.5, 2.0)  # random resize of the shorter side, times the input size


@register_task("segmentation", SegmentationConfig)
class Segmentation(Task):
    target_keys = ("mask",)
    metric_names = ("loss", "pixel_accuracy")
    best_metric, best_mode = "miou", "max"

    def __init__(self, num_classes: int, *, aux_weight: float = 0.5, ignore_index: int = MASK_IGNORE,
                 label_smoothing: float = 0.0, crop_size: int | None = None,
                 scale_range: tuple[float, float] = (0.5, 2.0)):
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id (the task has {num_classes} classes)")
        self.num_classes, self.aux_weight, self.ignore_index = num_classes, aux_weight, ignore_index
        self.label_smoothing, self.crop_size, self.scale_range = label_smoothing, crop_size, tuple(scale_range)

    @classmethod
    def from_config(cls, cfg: SegmentationConfig, *, num_classes: int) -> "Segmentation":
        return cls(num_classes, aux_weight=cfg.aux_weight, ignore_index=cfg.ignore_index,
                   label_smoothing=cfg.label_smoothing, crop_size=cfg.crop_size, scale_range=cfg.scale_range)

    # ---- data ----

    def transforms(self, data, model_cfg):
        crop = (self.crop_size, self.crop_size) if self.crop_size else None
        train = SegmentationTransform(
            size=tuple(model_cfg.input_size), mean=tuple(model_cfg.mean), std=tuple(model_cfg.std),
            channels=model_cfg.in_chans, train=True, crop_size=crop, scale_range=self.scale_range,
            interpolation=data.interpolation or model_cfg.interpolation, gray_to_rgb=data.gray_to_rgb,
            hflip=data.hflip, randaugment_ops=data.randaugment_ops, randaugment_magnitude=data.randaugment_magnitude,
            num_classes=self.num_classes, ignore_index=self.ignore_index)
        return train, dataclasses.replace(train, train=False)

    def validate(self, source, model_cfg, *, gray_to_rgb=False, what="training"):
        if getattr(model_cfg, "task", "segmentation") != "segmentation":
            raise ValueError(f"{model_cfg.name} is a {model_cfg.task} model; the segmentation task trains models "
                             "that give per-pixel logits (zoo.list_models(task='segmentation'))")
        if model_cfg.num_classes != self.num_classes:
            raise ValueError(f"the model has {model_cfg.num_classes} classes and the task {self.num_classes}")
        super().validate(source, model_cfg, gray_to_rgb=gray_to_rgb, what=what)
        if source.num_classes is not None and source.num_classes > self.num_classes:
            raise DataError(f"{what} data ({source.name}) has {source.num_classes} classes but the model only "
                            f"{self.num_classes} (set model.num_classes)")
        column = getattr(source, "targets", {}).get("mask")  # masks held in one array: all checked at once
        if isinstance(column, np.ndarray) and column.ndim == 3:
            bad = np.flatnonzero((((column < 0) | (column >= self.num_classes)) & (column != self.ignore_index))
                                 .any(axis=(1, 2)))
            first = bad[:1]
        else:
            first = np.zeros(0, int)
        n = min(len(source), CHECKED_BEFORE_TRAINING)
        for i in (*first, *np.unique(np.linspace(0, len(source) - 1, n).astype(int))):  # spread over the source
            try:
                check_example(source.example(int(i)), self.num_classes, self.ignore_index)
            except DataError as e:
                raise DataError(f"{what} data ({source.name}), example {i}: {e}") from None

    def collate(self, examples, valid, rng):
        return {"image": np.stack([ex["image"] for ex in examples]),
                "mask": np.stack([ex["mask"] for ex in examples]).astype(np.int32),
                "valid": np.asarray(valid, np.float32)}

    def adapt(self, module, base, model_cfg):
        """A loaded model with other classes gets zero classifiers (every path of `ModelCfg.classifier`, as
        `zoo.load` re-initializes them) of this task's size; the rest must fit."""
        if base.cfg.num_classes == self.num_classes:
            return base.variables
        paths = (base.cfg.classifier,) if isinstance(base.cfg.classifier, str) else tuple(base.cfg.classifier)
        flat = flatten(base.variables["params"])
        for k, shape in model_shapes(module, model_cfg).items():
            if any(k.startswith(p + "/") for p in paths):
                flat[k] = jnp.zeros(shape, flat[k].dtype if k in flat else jnp.float32)
        log.warning("%s: classifiers %s re-initialized for %d classes (the loaded model has %d)", base.cfg.name,
                    ", ".join(paths), self.num_classes, base.cfg.num_classes)
        variables = {**base.variables, "params": unflatten(flat)}
        check_shapes(module, variables, model_cfg)
        return variables

    # ---- loss and metrics ----

    def pixel_losses(self, logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(per-pixel cross-entropy, 1 where the pixel counts): ignored pixels count 0 and add 0."""
        counted = (mask != self.ignore_index).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target = jnp.where(mask == self.ignore_index, 0, mask)
        nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        if self.label_smoothing:
            nll = (1.0 - self.label_smoothing) * nll - self.label_smoothing * logp.mean(-1)
        return nll * counted, counted

    def mean_loss(self, logits, mask, weight):
        losses, counted = self.pixel_losses(logits, mask)
        counted = counted * weight
        return (losses * weight).sum() / jnp.maximum(counted.sum(), 1.0)

    def loss(self, forward, batch, *, task_params, consts, rng):
        out = _outputs(forward(batch["image"]))
        mask, weight = batch["mask"], batch["valid"][:, None, None]
        loss = main = self.mean_loss(out["out"], mask, weight)
        metrics = {}
        if "aux" in out and self.aux_weight:
            aux = self.mean_loss(out["aux"], mask, weight)
            loss = main + self.aux_weight * aux
            metrics = {"out_loss": main, "aux_loss": aux}
        counted = (mask != self.ignore_index) * weight
        correct = ((jnp.argmax(out["out"], -1) == mask) * counted).sum()
        return loss, {"loss": loss, "pixel_accuracy": correct / jnp.maximum(counted.sum(), 1.0), **metrics}

    def eval_sums(self, forward, batch):
        logits = _outputs(forward(batch["image"]))["out"]
        mask = batch["mask"]
        losses, counted = self.pixel_losses(logits, mask)
        counted = counted * batch["valid"][:, None, None]  # the padded examples of the last batch count nothing
        return {"loss": (losses * counted).sum(), "pixels": counted.sum(),
                "confusion": confusion_matrix(mask, jnp.argmax(logits, -1), self.num_classes, counted > 0)}

    def summarize(self, sums):
        return {"loss": float(sums["loss"]) / max(float(sums["pixels"]), 1.0),
                **segmentation_metrics(np.asarray(sums["confusion"]))}


def _outputs(out) -> dict:
    return dict(out) if isinstance(out, Mapping) else {"out": out}


def confusion_matrix(target: jax.Array, prediction: jax.Array, num_classes: int, counted: jax.Array) -> jax.Array:
    """(K, K) int32 counts of the `counted` pixels: row = target class, column = predicted class."""
    index = jnp.where(counted, target * num_classes + prediction, 0).reshape(-1)
    weight = counted.reshape(-1).astype(jnp.int32)
    return jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(weight).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray) -> dict:
    """mIoU, pixel accuracy and per-class IoU (`iou_<k>`, for the classes in the targets or the predictions) of a
    confusion matrix (rows: targets, columns: predictions)."""
    cm = np.asarray(confusion, np.float64)
    diag, union = np.diag(cm), cm.sum(0) + cm.sum(1) - np.diag(cm)
    present = union > 0
    iou = np.where(present, diag / np.maximum(union, 1.0), np.nan)
    return {"miou": float(iou[present].mean()) if present.any() else 0.0,
            "pixel_accuracy": float(diag.sum() / max(cm.sum(), 1.0)),
            **{f"iou_{k}": float(iou[k]) for k in np.flatnonzero(present)}}
