"""GFL-Lite: an anchor-free detector on registered backbones, built as NanoDet-Plus builds its (RangiLyu, 2021,
github.com/RangiLyu/nanodet) - a light PAN neck and a GFL head - with injected layer factories and only ops that
TFLite runs in int8.

- **Maps**: the backbone's maps at strides 8, 16 and 32, picked from its `feature_info` by stride.
- **Neck** (`zoo.layers.pan.LitePAN`; PAN, Liu et al., arXiv:1803.01534): 1x1 convs to `width` channels, a top-down
  then a bottom-up path, depthwise-separable 5x5 fusions.
- **Head** (`zoo.layers.gfl_head.GFLHead`; FCOS, Tian et al., arXiv:1904.01355; GFL, Li et al., arXiv:2006.04388):
  per level a tower of two depthwise-separable 5x5 blocks, then per location sigmoid class scores (no background
  class; trained as the box's IoU by Quality Focal Loss, so no centerness branch) and per side a distribution over
  0..reg_max strides (trained by Distribution Focal Loss).

`module.apply(v, x)` returns the raw outputs `{"cls_logits": (N, A, C), "box_regression": (N, A, 4 * (reg_max + 1))}`
at the A locations of `points(image_size)` (stride 8, then 16, then 32; row by row within a level); `postprocess`
turns them into boxes under jit (labels 0..C-1). The backbone keeps its classifier's parameter names
(`zoo.models.detection_backbone`), the neck and head live under `det/`. What training brings: the assignment of
boxes to locations (NanoDet-Plus: dynamic soft-label assignment, guided early by an auxiliary head; GFL: ATSS) and
the losses (QFL on `cls_logits`, DFL on `box_regression` with `encode`'s targets, GIoU on `decode`'s boxes).

Parameter and MAC counts per preset: `zoo.model_info(name)`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import numpy as np

from zoo.config import ModelCfg
from zoo.layers import points as location_grid
from zoo.layers.distances import distribution_targets, encode_distances
from zoo.layers.gfl_head import GFLHead
from zoo.layers.norm import BN_EPS_TORCH
from zoo.layers.pan import LitePAN
from zoo.models import anchor_free_postprocess
# the backbones' families register their classifiers before the presets below read them
from zoo.models import efficientnet, mobilenetv2, mobilenetv3, mobilevit  # noqa: F401
from zoo.models.anchor_free_postprocess import AnchorFreeSettings
from zoo.models.backbone import layer_factories
from zoo.models.detection_backbone import DetectionModel, detection_trunk, maps_at
from zoo.registry import get_entry, register_model

STRIDES = (8, 16, 32)
WIDTH = 96  # NanoDet-Plus-m's neck and head width
REG_MAX = 7  # NanoDet-Plus: distances up to 7 strides (224 px at stride 32), ample for 320-416 inputs
DEPTH = 2  # depthwise-separable blocks per level's tower (NanoDet-Plus)
KERNEL = 5  # NanoDet-Plus's depthwise kernel in neck and head
DETECTION = AnchorFreeSettings()
HEAD = "det"


class GFLLiteHead(nn.Module):
    """The backbone's maps at `taps` (strides 8, 16, 32) -> neck (`neck`) -> head (`head`): the raw outputs."""

    num_classes: int
    taps: tuple[str, ...]
    width: int = WIDTH
    reg_max: int = REG_MAX
    depth: int = DEPTH
    kernel: int = KERNEL
    act: str = "relu6"
    dtype: Any = None
    # injected layer factories (None: `Conv2d`, BatchNorm with PyTorch's conventions), as the backbone's
    conv: Any = None
    norm: Any = None

    @nn.compact
    def __call__(self, feats, train: bool = False):
        conv, norm, _ = layer_factories(self.conv, self.norm, None, bn_eps=BN_EPS_TORCH, dtype=self.dtype)
        maps = LitePAN(self.width, conv, norm, self.act, self.kernel, name="neck")([feats[t] for t in self.taps], train)
        return GFLHead(self.num_classes, self.reg_max, self.width, conv, norm, self.depth, self.act, self.kernel,
                       name="head")(maps, train)


def points(image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The (A, 2) locations (x, y) in input pixels and their (A,) strides, in the order of the raw outputs."""
    return location_grid.points(image_size, STRIDES)


def decode(box_regression, image_size: tuple[int, int]):
    """Raw box outputs (N, A, 4 * (reg_max + 1)) -> boxes (N, A, 4) (x1, y1, x2, y2) in input pixels, unclipped
    (what a training loss compares with the assigned boxes)."""
    return anchor_free_postprocess.decode(box_regression, *points(image_size))


def encode(boxes, image_size: tuple[int, int], reg_max: int = REG_MAX):
    """Boxes (N, A, 4) assigned to the A locations -> the distributions (N, A, 4, reg_max + 1) over 0..reg_max
    strides of l, t, r, b that Distribution Focal Loss trains towards (two-hot, `zoo.layers.distances`); distances
    beyond reg_max strides are clipped to it. Only the locations a box is assigned to take part in the loss."""
    return distribution_targets(encode_distances(boxes, *points(image_size)), reg_max)


def postprocess(outputs, image_size: tuple[int, int] = (320, 320), settings: AnchorFreeSettings = DETECTION) -> dict:
    """Detections of the raw outputs for inputs of `image_size` (jit-able; `anchor_free_postprocess.detections`):
    `boxes` (N, 100, 4) in input pixels, `scores`, `labels` (0..C-1), `valid`."""
    return anchor_free_postprocess.detections(outputs, *points(image_size), image_size, settings)


def _build(backbone: str, act: str, num_classes: int = 80, in_chans: int = 3, width: int = WIDTH,
           reg_max: int = REG_MAX, dtype: Any = None, conv: Any = None, norm: Any = None) -> DetectionModel:
    """`conv`/`norm`/`dtype`: for the backbone and the neck and head alike (None: each one's defaults)."""
    trunk, skip = detection_trunk(backbone, in_chans=in_chans, dtype=dtype, conv=conv, norm=norm)
    head = GFLLiteHead(num_classes, maps_at(get_entry(backbone).cfg.feature_info, STRIDES, backbone), width, reg_max,
                       act=act, dtype=dtype, conv=conv, norm=norm)
    return DetectionModel(trunk, ((HEAD, head),), single=True, skip=skip)


def _cfg(name: str, backbone: str, input_size: tuple[int, int]) -> ModelCfg:
    entry = get_entry(backbone)
    cfg = entry.pretrained_cfg(None).apply_to(entry.cfg) if entry.pretrained else entry.cfg  # its weights' inputs
    return ModelCfg(
        name=name, family="gfl_lite", task="detection", input_size=input_size, num_classes=80, mean=cfg.mean,
        std=cfg.std, interpolation="bilinear", crop_pct=1.0, first_conv=cfg.first_conv,
        classifier=tuple(f"{HEAD}/head/cls_{i}" for i in range(len(STRIDES))), feature_info=cfg.feature_info,
        paper="arXiv:2006.04388, arXiv:1803.01534, arXiv:1904.01355",
    )


# name: (backbone, activation of neck and head, input size). The activation follows the backbone's (hard-swish for
# MobileNetV3 and, in place of SiLU, MobileViT: both have int8 TFLite kernels).
VARIANTS = {
    "gfl_lite320_mobilenetv2_100": ("mobilenetv2_100", "relu6", (320, 320)),
    "gfl_lite320_mobilenetv3_large_100": ("mobilenetv3_large_100", "hard_swish", (320, 320)),
    "gfl_lite320_tf_efficientnet_lite0": ("tf_efficientnet_lite0", "relu6", (320, 320)),
    "gfl_lite320_mobilevit_xs": ("mobilevit_xs", "hard_swish", (320, 320)),
}

for _name, (_backbone, _act, _size) in VARIANTS.items():
    register_model(_cfg(_name, _backbone, _size))(partial(_build, _backbone, _act))
