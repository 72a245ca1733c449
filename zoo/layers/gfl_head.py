"""An anchor-free prediction head in the Generalized Focal Loss form, built light as NanoDet-Plus's.

At every location of every map (FCOS, Tian et al., arXiv:1904.01355): class scores, one sigmoid per class and no
background class, and the four distances to the box's sides. GFL (Li et al., arXiv:2006.04388) trains the class score
as the localization quality itself (Quality Focal Loss: the IoU of the predicted box at positives, Sec. 3.2), so there
is no separate centerness branch to multiply in at inference, and predicts each distance as a distribution over
0..reg_max strides (Sec. 3.3; `zoo.layers.distances`). NanoDet-Plus (RangiLyu, 2021, github.com/RangiLyu/nanodet)
gives each level its own tower of depthwise-separable convs (FCOS and GFL share one tower across levels, with
GroupNorm; BatchNorm's statistics differ between levels), class and box predictions sharing it; here the two
predictors are separate 1x1 convs (`cls_i`, `box_i`), so a new class count re-initializes the class predictors only.

The class logits start at log(p / (1 - p)) with p = 0.01 (RetinaNet's prior, Lin et al., arXiv:1708.02002,
Sec. 4.1), as a constant added to the predictor's output: any injected conv factory builds it, and the exporter folds
the constant into the conv's bias.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers.blocks import DepthwiseSeparable

ModuleDef = Any
PRIOR_PROBABILITY = 0.01
PRIOR_LOGIT = math.log(PRIOR_PROBABILITY / (1 - PRIOR_PROBABILITY))


class Tower(nn.Module):
    """`depth` depthwise-separable blocks (`kernel` depthwise conv, BN, act, 1x1 conv to `width`, BN, act)."""

    width: int
    depth: int
    conv: ModuleDef
    norm: ModuleDef
    act: str = "relu6"
    kernel: int = 5

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j in range(self.depth):
            x = DepthwiseSeparable(self.width, self.conv, self.norm, self.kernel, act=self.act, pw_act=True,
                                   noskip=True, name=f"block_{j}")(x, train)
        return x


class GFLHead(nn.Module):
    """Maps (one per level) -> `{"cls_logits": (N, A, num_classes), "box_regression": (N, A, 4 * (reg_max + 1))}`,
    float32: level by level, row by row within a level (`zoo.layers.points.points`); each location's box values
    are the logits of l's distribution, then t's, r's and b's."""

    num_classes: int
    reg_max: int
    width: int
    conv: ModuleDef
    norm: ModuleDef
    depth: int = 2
    act: str = "relu6"
    kernel: int = 5

    @nn.compact
    def __call__(self, maps: Sequence[Any], train: bool = False) -> dict:
        cls, box = [], []
        for i, m in enumerate(maps):
            x = Tower(self.width, self.depth, self.conv, self.norm, self.act, self.kernel, name=f"tower_{i}")(m, train)
            logits = self.conv(self.num_classes, 1, use_bias=True, name=f"cls_{i}")(x) + PRIOR_LOGIT
            dist = self.conv(4 * (self.reg_max + 1), 1, use_bias=True, name=f"box_{i}")(x)
            cls.append(logits.reshape(x.shape[0], -1, self.num_classes).astype(jnp.float32))
            box.append(dist.reshape(x.shape[0], -1, 4 * (self.reg_max + 1)).astype(jnp.float32))
        return {"cls_logits": jnp.concatenate(cls, 1), "box_regression": jnp.concatenate(box, 1)}
