"""LR-ASPP on MobileNetV3-Large (Howard et al., "Searching for MobileNetV3", arXiv:1905.02244 Sec. 6.4), as
torchvision's `lraspp_mobilenet_v3_large`: the dilated trunk (output stride 16) and the Lite R-ASPP head
(`zoo.layers.lraspp`) on its stride-8 and last maps, logits upsampled to the input (`SegmentationModel`).
"""

from __future__ import annotations

from typing import Any

from zoo.config import FeatureInfo, ModelCfg
from zoo.layers.lraspp import LRASPPHead
from zoo.models._pretrained import torchvision_weights
from zoo.models._segmentation_convert import torchvision_segmentation_rename
from zoo.models.segmentation import (MOBILENET_V3_LARGE_STRIDE8, SegmentationModel, mobilenet_v3_large_trunk,
                                     trunk_feature_info)
from zoo.registry import register_model

NAME = "lraspp_mobilenet_v3_large"
# torchvision's LRASPP_MobileNet_V3_Large_Weights: trained on COCO train2017 restricted to the 20 Pascal VOC
# categories (and background); mIoU and pixel accuracy on COCO val2017 with those labels
WEIGHTS = (
    torchvision_weights("coco_with_voc_labels_v1",
                        "https://download.pytorch.org/models/lraspp_mobilenet_v3_large-d234d4ea.pth",
                        dataset="coco-voc-labels", num_classes=21, extra={"miou": 57.9, "pixel_acc": 91.2}),
)


def lraspp_mobilenet_v3_large(num_classes: int = 21, in_chans: int = 3, inter_chs: int = 128, dtype: Any = None,
                              conv: Any = None, norm: Any = None) -> SegmentationModel:
    """`conv`/`norm`: injected factories for the trunk and the head alike (None: each one's defaults, BatchNorm eps
    1e-3 in the trunk and 1e-5 in the head, as torchvision's)."""
    trunk = mobilenet_v3_large_trunk(in_chans=in_chans, dtype=dtype, conv=conv, norm=norm)
    head = LRASPPHead(num_classes, low=MOBILENET_V3_LARGE_STRIDE8, high="stages_6", inter_chs=inter_chs,
                      dtype=dtype, conv=conv, norm=norm)
    return SegmentationModel(trunk, (("out", head),), taps=(MOBILENET_V3_LARGE_STRIDE8,))


register_model(
    ModelCfg(name=NAME, family="lraspp", input_size=(520, 520), num_classes=21, interpolation="bilinear",
             crop_pct=1.0, classifier=("out/low_classifier", "out/high_classifier"),
             feature_info=trunk_feature_info(mobilenet_v3_large_trunk(),
                                             (FeatureInfo(MOBILENET_V3_LARGE_STRIDE8, 8, 40),)),
             paper="arXiv:1905.02244 Sec. 6.4", twin=f"torchvision:{NAME}", task="segmentation"),
    WEIGHTS,
    converters={"torchvision": torchvision_segmentation_rename},
)(lraspp_mobilenet_v3_large)
