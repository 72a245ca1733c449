"""SSDLite on MobileNetV3-Large: torchvision's `ssdlite320_mobilenet_v3_large`.

SSD (Liu et al., "SSD: Single Shot MultiBox Detector", arXiv:1512.02325) predicts classes and box offsets for a set of
default boxes at every location of several feature maps. SSDLite (Sandler et al., "MobileNetV2", arXiv:1801.04381,
Sec. 6.2) makes every 3x3 conv of its extra layers and prediction layers depthwise-separable. On MobileNetV3 (Howard
et al., "Searching for MobileNetV3", arXiv:1905.02244, Sec. 6.2) the first map is the expansion (1x1 conv, BN,
hard-swish) of the first stride-32 block, at stride 16, the second the end of the trunk, and the last stage is built
with halved widths (the "reduced tail"); four extra blocks then halve the map each, to stride 512.

`module.apply(v, x)` returns the raw outputs (`{"cls_logits": (N, A, 91), "bbox_regression": (N, A, 4)}`, in the
order of `default_boxes`); `postprocess` turns them into boxes under jit. Backbone parameters keep the names of the
`mobilenet_v3_large` classifier (`stem/...`, `stages_N/...`), the heads and extra blocks live under `ssd/`.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from zoo.config import FeatureInfo, ModelCfg
from zoo.layers.anchors import boxes_per_location, default_boxes
from zoo.layers.blocks import ConvNormAct
from zoo.layers.norm import BN_EPS_TF
from zoo.models._mobile_convert import torchvision_rename
from zoo.models._pretrained import torchvision_weights
from zoo.models.backbone import layer_factories
from zoo.models.detection_postprocess import DetectionSettings, detections
from zoo.models.heads import TaskModel
from zoo.models.mobilenet_base import MobileNet, feature_info, resolve_stages
from zoo.models.mobilenetv3 import LARGE
from zoo.registry import register_model

# Howard et al. Sec. 6.2: the channels of the last stage halved (160 -> 80, its expansions 960 -> 480, last conv 480)
LARGE_REDUCED_TAIL = (*LARGE[:5], *(tuple(replace(r, out=r.out // 2) for r in rows) for rows in LARGE[5:]))
C4_STAGE_INDEX = 5  # the stage whose first block's expansion is the stride-16 map
C4_STAGE = f"stages_{C4_STAGE_INDEX}"
C4 = f"{C4_STAGE}.expansion"
C5 = "stages_6"
EXTRA_WIDTHS = (512, 256, 256, 128)  # the extra blocks' outputs, strides 64 to 512
# torchvision's `DefaultBoxGenerator([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)`: 6 boxes per location
ASPECT_RATIOS = ((2, 3),) * 6
MIN_RATIO, MAX_RATIO = 0.2, 0.95
DETECTION = DetectionSettings(score_threshold=0.001, candidates_per_class=300, iou_threshold=0.55,
                              max_detections=300)
# torchvision builds SSDLite's BatchNorms with eps 1e-3 and momentum 0.03 (flax's 0.97)
NORM = partial(nn.BatchNorm, momentum=0.97, epsilon=BN_EPS_TF)
ModuleDef = Any


class ExtraBlock(nn.Module):
    """1x1 conv to half the width, 3x3 depthwise conv at stride 2, 1x1 conv to `out_chs`, each with BN and ReLU6."""

    out_chs: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        mid = self.out_chs // 2
        x = ConvNormAct(mid, self.conv, self.norm, 1, act="relu6", name="reduce")(x, train)
        x = ConvNormAct(mid, self.conv, self.norm, 3, 2, groups=mid, act="relu6", name="dw")(x, train)
        return ConvNormAct(self.out_chs, self.conv, self.norm, 1, act="relu6", name="expand")(x, train)


class PredictionBlock(nn.Module):
    """3x3 depthwise conv with BN and ReLU6, then a 1x1 conv with bias to `boxes * values` outputs per location,
    returned as (N, H * W * boxes, values)."""

    boxes: int
    values: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = ConvNormAct(c, self.conv, self.norm, 3, groups=c, act="relu6", name="dw")(x, train)
        x = self.conv(self.boxes * self.values, 1, use_bias=True, name="conv")(x)
        return x.reshape(x.shape[0], -1, self.values).astype(jnp.float32)


class SSDLiteHead(nn.Module):
    """The extra blocks on the backbone's last map, and class and box predictions on every map (`extra_i`,
    `cls_i`, `box_i`): `{"cls_logits": (N, A, num_classes), "bbox_regression": (N, A, 4)}`."""

    num_classes: int
    taps: tuple[str, ...] = (C4, C5)  # the backbone's maps predicted from, the last one extended
    extra_widths: tuple[int, ...] = EXTRA_WIDTHS
    aspect_ratios: tuple[tuple[float, ...], ...] = ASPECT_RATIOS
    dtype: Any = None
    conv: Any = None
    norm: Any = NORM

    @nn.compact
    def __call__(self, feats, train: bool = False):
        conv, norm, _ = layer_factories(self.conv, self.norm, None, bn_eps=BN_EPS_TF, dtype=self.dtype)
        maps = [feats[t] for t in self.taps]
        for i, width in enumerate(self.extra_widths):
            maps.append(ExtraBlock(width, conv, norm, name=f"extra_{i}")(maps[-1], train))
        boxes = boxes_per_location(self.aspect_ratios)
        if len(boxes) != len(maps):
            raise ValueError(f"{len(maps)} feature maps for {len(boxes)} sets of aspect ratios")
        cls = [PredictionBlock(b, self.num_classes, conv, norm, name=f"cls_{i}")(m, train)
               for i, (m, b) in enumerate(zip(maps, boxes))]
        box = [PredictionBlock(b, 4, conv, norm, name=f"box_{i}")(m, train)
               for i, (m, b) in enumerate(zip(maps, boxes))]
        return {"cls_logits": jnp.concatenate(cls, 1), "bbox_regression": jnp.concatenate(box, 1)}


def feature_grids(image_size: tuple[int, int], maps: int = 2 + len(EXTRA_WIDTHS)) -> list[tuple[int, int]]:
    """(rows, cols) of the predicted maps for an input of `image_size`: every downsampling in this network is a
    stride-2 conv padded by (kernel - 1) / 2 on both sides, which gives ceil(size / 2); the first map is at
    stride 16."""
    size, grids = tuple(image_size), []
    for i in range(3 + maps):
        size = tuple(math.ceil(s / 2) for s in size)
        if i >= 3:
            grids.append(size)
    return grids


def anchors(image_size: tuple[int, int] = (320, 320)) -> np.ndarray:
    """The (A, 4) default boxes in input pixels, in the order of the raw outputs."""
    return default_boxes(feature_grids(image_size), image_size, ASPECT_RATIOS, MIN_RATIO, MAX_RATIO)


def postprocess(outputs, image_size: tuple[int, int] = (320, 320), settings: DetectionSettings = DETECTION) -> dict:
    """Detections of the raw outputs for inputs of `image_size` (jit-able; see `detection_postprocess.detections`):
    `boxes` (N, 300, 4) in input pixels, `scores`, `labels` (1-90, COCO's category ids), `valid`."""
    return detections(outputs, anchors(image_size), image_size, settings)


def _backbone(in_chans: int, **overrides) -> MobileNet:
    stages = resolve_stages(LARGE_REDUCED_TAIL, stem_chs=16, act="hard_swish", se_from_exp=True, se_round="divisible")
    # head_type "pool": the classifier's pre-logits conv is no part of the detector
    kwargs = dict(stages=stages, stem_chs=16, num_features=stages[-1][-1].out_chs, head_type="pool",
                  act="hard_swish", se_act="relu", se_gate="hard_sigmoid", num_classes=0, in_chans=in_chans,
                  norm=NORM, expansion_taps=(C4_STAGE,))
    return MobileNet(**{**kwargs, **overrides})


def _build(num_classes: int = 91, in_chans: int = 3, **overrides) -> TaskModel:
    """`overrides` go to the backbone; the injected factories and dtype to the head too."""
    head_keys = {k: overrides[k] for k in ("conv", "norm", "dtype") if k in overrides}
    backbone = _backbone(in_chans, **overrides)
    return TaskModel(backbone, (("ssd", SSDLiteHead(num_classes, **head_keys)),), single=True)


def _block_path(c4: int, part: int, index: int, rest: list[str]) -> str:
    """torchvision's SSDLite splits the MobileNetV3 trunk at block `c4` (features.0: up to its expansion, features.1:
    the rest); the same module's path in the classifier's `features`."""
    if part == 0:
        return ".".join(["features", str(index), *rest] if index < c4 else ["features", str(c4), "block", "0", *rest])
    if index == 0:  # the split block's layers after the expansion (a slice of its Sequential keeps their keys)
        return ".".join(["features", str(c4), "block", *rest])
    return ".".join(["features", str(c4 + index), *rest])


def torchvision_ssdlite_rename(module: TaskModel):
    """torchvision: `backbone.features.{0,1}.*` (the trunk, see `_block_path`), `backbone.extra.{i}.{j}.{0,1}`,
    `head.{classification,regression}_head.module_list.{i}.{0.0, 0.1, 1}`."""
    backbone = module.backbone
    c4 = 1 + sum(len(s) for s in backbone.stages[:C4_STAGE_INDEX])  # features.0 is the stem
    # the classifier's key map reads the stage layout (its head is not in this checkpoint)
    trunk = torchvision_rename(backbone.clone(parent=None, head_type="mobilenetv3"))
    head = {"classification_head": "cls", "regression_head": "box"}

    def rename(path: str) -> str | None:
        m = re.fullmatch(r"backbone\.features\.([01])\.(\d+)((?:\.\w+)*)", path)
        if m:
            return trunk(_block_path(c4, int(m[1]), int(m[2]), m[3].split(".")[1:]))
        m = re.fullmatch(r"backbone\.extra\.(\d+)\.([012])\.([01])", path)
        if m:
            return f"ssd/extra_{m[1]}/{('reduce', 'dw', 'expand')[int(m[2])]}/{('conv', 'bn')[int(m[3])]}"
        m = re.fullmatch(r"head\.(classification_head|regression_head)\.module_list\.(\d+)\.(0\.[01]|1)", path)
        if m:
            layer = {"0.0": "dw/conv", "0.1": "dw/bn", "1": "conv"}[m[3]]
            return f"ssd/{head[m[1]]}_{m[2]}/{layer}"
        return path.replace(".", "/")  # unknown: reported as unexpected by the converter

    return rename


def _cfg() -> ModelCfg:
    stages = _backbone(3).stages
    c4 = FeatureInfo(C4, 16, stages[C4_STAGE_INDEX][0].mid_chs)
    return ModelCfg(
        name="ssdlite320_mobilenet_v3_large", family="ssdlite", task="detection", input_size=(320, 320),
        num_classes=91, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0,
        classifier=tuple(f"ssd/cls_{i}/conv" for i in range(len(ASPECT_RATIOS))),
        feature_info=(c4, *feature_info(stages)), paper="arXiv:1801.04381 Sec. 6.2, arXiv:1905.02244 Sec. 6.2",
        twin="torchvision:ssdlite320_mobilenet_v3_large",
    )


_URL = "https://download.pytorch.org/models/ssdlite320_mobilenet_v3_large_coco-a79551df.pth"
register_model(
    _cfg(),
    # torchvision's COCO_V1 record: trained on COCO train2017, box mAP on val2017
    (torchvision_weights("coco_v1", _URL, dataset="coco-2017", num_classes=91, extra={"box_map": 21.3}),),
    converters={"torchvision": torchvision_ssdlite_rename},
)(_build)
