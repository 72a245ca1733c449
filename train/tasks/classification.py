"""Classification: softmax cross-entropy with optional label smoothing, mixup and cutmix; accuracy and top-5.

Examples carry `label` (int). Batch format: `image` float32 (B, H, W, C) normalized; `label` int32 (B,) or soft float32
(B, K) (mixup/cutmix, smoothing folded in); `valid` float32 (B,), 0 for padding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.augment import mix_batch
from train.data import DataError
from train.state import flatten, unflatten
from train.tasks.base import Task, TaskConfig, check_shapes, model_shapes, register_task

log = logging.getLogger("train")


@dataclass
class ClassificationConfig(TaskConfig):
    kind: str = "classification"
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # probability that a batch is mixed (when mixup or cutmix is on)


@register_task("classification", ClassificationConfig)
class Classification(Task):
    target_keys = ("label",)
    metric_names = ("loss", "accuracy")
    best_metric, best_mode = "accuracy", "max"

    def __init__(self, num_classes: int, *, label_smoothing: float = 0.0, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, mix_prob: float = 1.0):
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mixup_alpha, self.cutmix_alpha, self.mix_prob = mixup_alpha, cutmix_alpha, mix_prob

    @classmethod
    def from_config(cls, cfg: ClassificationConfig, *, num_classes: int) -> "Classification":
        return cls(num_classes, label_smoothing=cfg.label_smoothing, mixup_alpha=cfg.mixup_alpha,
                   cutmix_alpha=cfg.cutmix_alpha, mix_prob=cfg.mix_prob)

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def validate(self, source, model_cfg, *, gray_to_rgb=False, what="training"):
        if model_cfg.num_classes != self.num_classes:
            raise ValueError(f"the model has {model_cfg.num_classes} classes and the task {self.num_classes}")
        super().validate(source, model_cfg, gray_to_rgb=gray_to_rgb, what=what)
        labels = source.values("label")
        if labels is not None:
            bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
            if bad.size:
                raise DataError(
                    f"{what} data ({source.name}): {bad.size} label(s) outside [0, {self.num_classes}), e.g. label "
                    f"{int(labels[bad[0]])} at index {int(bad[0])}; the model has {self.num_classes} classes "
                    "(set model.num_classes, or fix the labels)")
        elif source.num_classes is not None and source.num_classes > self.num_classes:
            raise DataError(f"{what} data ({source.name}) has {source.num_classes} classes but the model only "
                            f"{self.num_classes} (set model.num_classes)")

    def collate(self, examples, valid, rng):
        images = np.stack([ex["image"] for ex in examples])
        labels = np.asarray([ex["label"] for ex in examples], np.int32)
        if rng is not None and self.mixing:
            images, labels = mix_batch(images, labels, self.num_classes, rng, mixup_alpha=self.mixup_alpha,
                                       cutmix_alpha=self.cutmix_alpha, prob=self.mix_prob,
                                       smoothing=self.label_smoothing)
        return {"image": images, "label": labels, "valid": np.asarray(valid, np.float32)}

    def adapt(self, module, base, model_cfg):
        """A loaded model with other classes gets a zero classifier of this task's size; the rest must fit."""
        if base.cfg.num_classes == self.num_classes:
            return base.variables
        flat = flatten(base.variables["params"])
        prefix = base.cfg.classifier + "/"
        for k, shape in model_shapes(module, model_cfg).items():
            if k.startswith(prefix):
                flat[k] = jnp.zeros(shape, flat[k].dtype if k in flat else jnp.float32)
        log.warning("%s: classifier re-initialized for %d classes (the loaded model has %d)", base.cfg.name,
                    self.num_classes, base.cfg.num_classes)
        variables = {**base.variables, "params": unflatten(flat)}
        check_shapes(module, variables, model_cfg)
        return variables

    def targets(self, labels: jax.Array) -> jax.Array:
        if labels.ndim == 2:  # already soft (mixed, smoothing folded in)
            return labels
        onehot = jax.nn.one_hot(labels, self.num_classes)
        return optax.smooth_labels(onehot, self.label_smoothing) if self.label_smoothing else onehot

    def loss(self, forward, batch, *, task_params, consts, rng):
        logits = forward(batch["image"])
        loss = optax.softmax_cross_entropy(logits, self.targets(batch["label"])).mean()
        label = batch["label"] if batch["label"].ndim == 1 else jnp.argmax(batch["label"], -1)
        return loss, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == label)}

    def eval_sums(self, forward, batch):
        logits = forward(batch["image"]).astype(jnp.float32)
        labels, valid = batch["label"], batch["valid"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        sums = {"count": valid.sum(), "loss": (ce * valid).sum(),
                "correct": ((jnp.argmax(logits, -1) == labels) * valid).sum()}
        if self.num_classes > 5:
            top5 = jnp.any(jax.lax.top_k(logits, 5)[1] == labels[:, None], axis=-1)
            sums["correct_top5"] = (top5 * valid).sum()
        return sums

    def summarize(self, sums):
        n = max(float(sums["count"]), 1.0)
        out = {"loss": float(sums["loss"]) / n, "accuracy": float(sums["correct"]) / n}
        if "correct_top5" in sums:
            out["top5"] = float(sums["correct_top5"]) / n
        return out
