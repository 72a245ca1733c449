"""DeepLabV3 on MobileNetV3-Large (Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation",
arXiv:1706.05587), as torchvision's `deeplabv3_mobilenet_v3_large`: the dilated trunk (output stride 16), the
ASPP head (`zoo.layers.aspp`) on its last map and the auxiliary FCN head (`zoo.layers.fcn_head`) on its stride-8 map,
both upsampled to the input (`SegmentationModel`): `{"out": ..., "aux": ...}`.

torchvision's weights were trained with the auxiliary head (`aux_loss=True`), so it is built by default: the
parameter count is theirs with it. `aux=False` leaves it out (it only serves training); loading torchvision's weights
then skips its keys.
"""

from __future__ import annotations

from typing import Any

from zoo.config import FeatureInfo, ModelCfg
from zoo.layers.aspp import DeepLabHead
from zoo.layers.fcn_head import FCNHead
from zoo.models._pretrained import torchvision_weights
from zoo.models._segmentation_convert import torchvision_segmentation_rename
from zoo.models.segmentation import (MOBILENET_V3_LARGE_STRIDE8, SegmentationModel, mobilenet_v3_large_trunk,
                                     trunk_feature_info)
from zoo.registry import register_model

NAME = "deeplabv3_mobilenet_v3_large"
# torchvision's DeepLabV3_MobileNet_V3_Large_Weights: trained on COCO train2017 restricted to the 20 Pascal VOC
# categories (and background); mIoU and pixel accuracy on COCO val2017 with those labels
WEIGHTS = (
    torchvision_weights("coco_with_voc_labels_v1",
                        "https://download.pytorch.org/models/deeplabv3_mobilenet_v3_large-fc3c493d.pth",
                        dataset="coco-voc-labels", num_classes=21, extra={"miou": 60.3, "pixel_acc": 91.2}),
)


def deeplabv3_mobilenet_v3_large(num_classes: int = 21, in_chans: int = 3, aux: bool = True,
                                 rates: tuple[int, ...] = (12, 24, 36), dtype: Any = None, conv: Any = None,
                                 norm: Any = None) -> SegmentationModel:
    """`rates`: ASPP's atrous rates (torchvision's for output stride 16). `conv`/`norm`: injected factories for the
    trunk and the heads alike (None: each one's defaults, BatchNorm eps 1e-3 in the trunk and 1e-5 in the heads, as
    torchvision's)."""
    trunk = mobilenet_v3_large_trunk(in_chans=in_chans, dtype=dtype, conv=conv, norm=norm)
    factories = dict(dtype=dtype, conv=conv, norm=norm)
    heads = (("out", DeepLabHead(num_classes, key="stages_6", rates=tuple(rates), **factories)),)
    if aux:
        heads += (("aux", FCNHead(num_classes, key=MOBILENET_V3_LARGE_STRIDE8, **factories)),)
    return SegmentationModel(trunk, heads, taps=(MOBILENET_V3_LARGE_STRIDE8,) if aux else ())


register_model(
    ModelCfg(name=NAME, family="deeplabv3", input_size=(520, 520), num_classes=21, interpolation="bilinear",
             crop_pct=1.0, classifier=("out/classifier", "aux/classifier"),
             feature_info=trunk_feature_info(mobilenet_v3_large_trunk(),
                                             (FeatureInfo(MOBILENET_V3_LARGE_STRIDE8, 8, 40),)),
             paper="arXiv:1706.05587", twin=f"torchvision:{NAME}", task="segmentation"),
    WEIGHTS,
    converters={"torchvision": torchvision_segmentation_rename},
)(deeplabv3_mobilenet_v3_large)
