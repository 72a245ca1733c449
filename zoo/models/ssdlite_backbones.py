"""SSDLite's extra blocks and depthwise heads (`zoo.models.ssdlite.SSDLiteHead`) on other registered backbones.

SSDLite (Sandler et al., "MobileNetV2", arXiv:1801.04381, Sec. 6.2) predicts from a stride-16 and a stride-32 map of
its backbone, then from four extra blocks on the last, each halving it. Here the two maps are the backbone's named
ones at strides 16 and 32 (`feature_info`, picked by stride), so the head builds on any backbone; the paper's
MobileNetV2 version reads the expansion of the first stride-32 block and the 1280-wide pre-logits conv instead, and
torchvision's MobileNetV3 version (`ssdlite320_mobilenet_v3_large`) a trunk with a halved last stage. The default
boxes, box coding and post-processing are `zoo.models.ssdlite`'s (`postprocess`): the same six maps at strides 16 to
512 on a 320x320 input. 91 classes by default, class 0 the background, as torchvision's COCO models (labels are
COCO's category ids). No weights: the backbone takes its classifier's by name
(`zoo.models.detection_backbone.with_backbone_weights`), the head (`ssd/`) trains from scratch.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from zoo.config import ModelCfg
from zoo.models import efficientnet, mobilenetv2  # noqa: F401  (register the backbones read below)
from zoo.models.detection_backbone import DetectionModel, detection_trunk, maps_at
from zoo.models.ssdlite import ASPECT_RATIOS, NORM, SSDLiteHead
from zoo.models.ssdlite import postprocess  # noqa: F401  (the same default boxes: the presets' post-processing)
from zoo.registry import get_entry, register_model

STRIDES = (16, 32)
HEAD = "ssd"


def _build(backbone: str, num_classes: int = 91, in_chans: int = 3, dtype: Any = None, conv: Any = None,
           norm: Any = None) -> DetectionModel:
    """`conv`/`norm`/`dtype`: for the backbone and the head alike (None: each one's defaults, torchvision's
    BatchNorm of eps 1e-3 and momentum 0.03 in the head)."""
    trunk, skip = detection_trunk(backbone, in_chans=in_chans, dtype=dtype, conv=conv, norm=norm)
    head = SSDLiteHead(num_classes, taps=maps_at(get_entry(backbone).cfg.feature_info, STRIDES, backbone), dtype=dtype,
                       conv=conv, norm=norm or NORM)
    return DetectionModel(trunk, ((HEAD, head),), single=True, skip=skip)


def _cfg(name: str, backbone: str) -> ModelCfg:
    entry = get_entry(backbone)
    cfg = entry.pretrained_cfg(None).apply_to(entry.cfg) if entry.pretrained else entry.cfg  # its weights' inputs
    return ModelCfg(
        name=name, family="ssdlite", task="detection", input_size=(320, 320), num_classes=91, mean=cfg.mean,
        std=cfg.std, interpolation="bilinear", crop_pct=1.0, first_conv=cfg.first_conv,
        classifier=tuple(f"{HEAD}/cls_{i}/conv" for i in range(len(ASPECT_RATIOS))), feature_info=cfg.feature_info,
        paper="arXiv:1801.04381 Sec. 6.2",
    )


VARIANTS = {"ssdlite320_mobilenetv2_100": "mobilenetv2_100",
            "ssdlite320_tf_efficientnet_lite0": "tf_efficientnet_lite0"}

for _name, _backbone in VARIANTS.items():
    register_model(_cfg(_name, _backbone))(partial(_build, _backbone))
