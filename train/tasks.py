"""Tasks: what differs between classification, detection and segmentation, so the loop never branches on it.

A task owns the batch format (`collate` on the host), the checks of the data before training (`validate`), the training
loss and its metrics (`loss`), and evaluation (`eval_sums` per batch, reduced by `summarize`). It calls the network
through `Forward`, which binds the variables, the train flag and the dropout rng, records the updated model state
(BatchNorm statistics), and can capture named intermediate outputs (the feature maps of `ModelCfg.feature_info`).

Batch format of `Classification`: `image` float32 (B, H, W, C) normalized; `label` int (B,) or soft float (B, K)
(mixup/cutmix); `mask` float32 (B,) in eval batches, 0 for padding.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.augment import mix_batch
from train.data import Source, check_source
from train.forward import Forward


class Task:
    """The interface the loop uses. Subclasses implement every method; see `Classification`."""

    metric_names: tuple[str, ...] = ("loss",)
    best_metric: str = "loss"  # what "best checkpoint" means by default, with `best_mode`
    best_mode: str = "min"

    def validate(self, source: Source, model_cfg, *, gray_to_rgb: bool = False, what: str = "training") -> None:
        """Raise a clear error, before training, on data this task and model cannot use."""

    def collate(self, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> dict:
        """Host side: transformed images and their targets -> a training batch (numpy)."""
        raise NotImplementedError

    def init_params(self, rng: jax.Array) -> dict:
        """Trainable parameters the task owns besides the model's (e.g. distillation adapters)."""
        return {}

    def consts(self) -> dict:
        """Arrays the loss reads but never trains (e.g. a teacher's variables), passed into the jitted step."""
        return {}

    def loss(self, forward: Forward, batch: dict, *, task_params: dict, consts: dict,
             rng: jax.Array) -> tuple[jax.Array, dict]:
        """Scalar training loss and per-batch metrics (scalars), calling `forward` on the batch."""
        raise NotImplementedError

    def eval_sums(self, forward: Forward, batch: dict) -> dict:
        """Per-batch sums (over examples with mask 1) that `summarize` turns into metrics."""
        raise NotImplementedError

    def summarize(self, sums: Mapping[str, float]) -> dict:
        raise NotImplementedError


class Classification(Task):
    """Softmax cross-entropy with optional label smoothing, mixup and cutmix; accuracy and top-5."""

    metric_names = ("loss", "accuracy")
    best_metric, best_mode = "accuracy", "max"

    def __init__(self, num_classes: int, *, label_smoothing: float = 0.0, mixup_alpha: float = 0.0,
                 cutmix_alpha: float = 0.0, mix_prob: float = 1.0):
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self.mixup_alpha, self.cutmix_alpha, self.mix_prob = mixup_alpha, cutmix_alpha, mix_prob

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def validate(self, source, model_cfg, *, gray_to_rgb=False, what="training"):
        if model_cfg.num_classes != self.num_classes:
            raise ValueError(f"the model has {model_cfg.num_classes} classes and the task {self.num_classes}")
        check_source(source, self.num_classes, model_cfg.in_chans, gray_to_rgb, what)

    def collate(self, images, labels, rng):
        if not self.mixing:
            return {"image": images, "label": labels.astype(np.int32)}
        images, soft = mix_batch(images, labels, self.num_classes, rng, mixup_alpha=self.mixup_alpha,
                                 cutmix_alpha=self.cutmix_alpha, prob=self.mix_prob, smoothing=self.label_smoothing)
        return {"image": images, "label": soft}

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
        labels, mask = batch["label"], batch["mask"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        sums = {"count": mask.sum(), "loss": (ce * mask).sum(),
                "correct": ((jnp.argmax(logits, -1) == labels) * mask).sum()}
        if self.num_classes > 5:
            top5 = jnp.any(jax.lax.top_k(logits, 5)[1] == labels[:, None], axis=-1)
            sums["correct_top5"] = (top5 * mask).sum()
        return sums

    def summarize(self, sums):
        n = max(float(sums["count"]), 1.0)
        out = {"loss": float(sums["loss"]) / n, "accuracy": float(sums["correct"]) / n}
        if "correct_top5" in sums:
            out["top5"] = float(sums["correct_top5"]) / n
        return out
