"""Heads, and how every zoo model is composed of a backbone and heads.

A **backbone** (`zoo.models.backbone`) returns its named outputs as a dict: one entry per `ModelCfg.feature_info`
name (the feature maps, NHWC, at the stride and width the entry states) and `"pre_logits"` (the pooled features the
classifier's last Linear takes, timm's `forward_head(x, pre_logits=True)`). A **head** takes that dict and returns
its task's output. A registered classifier is a backbone plus a classification head in one module, so
`module.apply(v, x)` gives logits (timm's habit) and `module.apply(v, x, features=True)` gives the backbone's dict:
that dict is the one way to read intermediate outputs (distillation, detection and segmentation heads use it).

`TaskModel` composes any backbone (a registered classifier, asked with `features=True`) with named heads, for models
that add their own heads (detection, segmentation, early exits):

    backbone = zoo.create_model("mobilenetv3_large_100", num_classes=0)
    model = TaskModel(backbone, (("seg", MySegHead(21)),))
    out = model.apply(v, x)                    # {"seg": ...}: every head's output, by name
    feats = model.apply(v, x, features=True)   # the backbone's dict

The backbone shares `TaskModel`'s parameter scope (`flax.linen.share_scope`), so its parameters keep the names they
have in the classifier (`stem/...`, `stages_3/...`): a classifier's pretrained weights load into it by name. Each head
is named by its key; a key must not repeat a backbone's top-level name (the MobileNet family keeps its pre-logits
conv under `head`, as timm's and torchvision's checkpoints do).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from zoo.models.backbone import PRE_LOGITS

ModuleDef = Any


class ClassifierHead(nn.Module):
    """`pre_logits` -> dropout -> Linear `fc` (logits in float32). `num_classes=0`: the pre-logits themselves."""

    num_classes: int
    drop_rate: float = 0.0
    dense: ModuleDef = nn.Dense  # injected factory (dtype, quantized or sparse Dense)

    @nn.compact
    def __call__(self, feats: Mapping[str, Any], train: bool = False):
        return classify(feats, self.num_classes, self.drop_rate, self.dense, train)


class HeadPair(nn.Module):
    """A distilled model's two classifiers' Dense layers under one scope (`fc/head`, `fc/head_dist`: LeViT, RepViT)."""

    num_classes: int
    dense: ModuleDef

    @nn.compact
    def __call__(self, x, x_dist):
        return (self.dense(self.num_classes, name="head")(x),
                self.dense(self.num_classes, name="head_dist")(x_dist))


def classify(feats: Mapping[str, Any], num_classes: int, drop_rate: float, dense: ModuleDef, train: bool):
    """The classifier's layers, created in the calling module's scope (call from inside an `nn.compact` method)."""
    x = feats[PRE_LOGITS]
    if num_classes <= 0:
        return x.astype(jnp.float32)
    x = nn.Dropout(drop_rate)(x, deterministic=not train)
    return dense(num_classes, name="fc")(x).astype(jnp.float32)


class TaskModel(nn.Module):
    """A backbone and named heads: `(x) -> {name: head output}` (the output itself when `single` and one head);
    `features=True`: the backbone's dict. See the module docstring."""

    backbone: nn.Module  # called as backbone(x, train=..., features=True) -> dict
    heads: tuple[tuple[str, nn.Module], ...]
    single: bool = False  # one head whose output is returned bare (a classifier's logits)

    def setup(self):
        nn.share_scope(self, self.backbone)
        names = [n for n, _ in self.heads]
        if not names or len(set(names)) != len(names) or PRE_LOGITS in names:
            raise ValueError(f"TaskModel heads need distinct names other than '{PRE_LOGITS}'; got {names}")
        if self.single and len(names) != 1:
            raise ValueError(f"TaskModel(single=True) takes exactly one head; got {names}")
        taken = [n for n in names if n in {f.name for f in dataclasses.fields(self)} or hasattr(type(self), n)]
        if taken:
            raise ValueError(f"TaskModel head names {taken} are taken by the module's own attributes")
        # each head is re-created under its key as its name (the field alone would name them `heads_0`, ...)
        for n, h in self.heads:
            setattr(self, n, h.clone(parent=None, name=None))

    def __call__(self, x, train: bool = False, features: bool = False):
        feats = self.backbone(x, train=train, features=True)
        if features:
            return feats
        return self.apply_heads(feats, train)

    def apply_heads(self, feats: Mapping[str, Any], train: bool = False):
        out = {n: getattr(self, n)(feats, train=train) for n, _ in self.heads}
        return next(iter(out.values())) if self.single else out
