"""Key maps from torchvision's segmentation checkpoints (LR-ASPP, DeepLabV3 on MobileNetV3) onto `SegmentationModel`.

torchvision keeps the trunk as `backbone.<k>` (its MobileNetV3's `features.<k>`), the main head as `classifier.*` and
DeepLabV3's auxiliary FCN head as `aux_classifier.*`; the zoo names the heads by their output (`out/...`, `aux/...`).
"""

from __future__ import annotations

import re

from zoo.layers.aspp import DeepLabHead
from zoo.layers.fcn_head import FCNHead
from zoo.layers.lraspp import LRASPPHead
from zoo.models._mobile_convert import torchvision_rename
from zoo.models.segmentation import SegmentationModel

# torchvision Sequential indices inside each head -> zoo paths under the head
_LRASPP = {"cbr.0": "cbr/conv", "cbr.1": "cbr/bn", "scale.1": "scale", "low_classifier": "low_classifier",
           "high_classifier": "high_classifier"}
_DEEPLAB = {"1": "cbr/conv", "2": "cbr/bn", "4": "classifier", "0.project.0": "aspp/project/conv",
            "0.project.1": "aspp/project/bn"}
_FCN = {"0": "cbr/conv", "1": "cbr/bn", "4": "classifier"}


def _deeplab(rest: str, n_rates: int) -> str | None:
    m = re.fullmatch(r"0\.convs\.(\d+)\.(\d+)", rest)
    if not m:
        return _DEEPLAB.get(rest)
    i, j = int(m[1]), m[2]
    if i == n_rates + 1:  # the image-pooling branch: AdaptiveAvgPool2d, conv, BN, ReLU
        return {"1": "aspp/pool/conv", "2": "aspp/pool/bn"}.get(j)
    return f"aspp/convs_{i}/" + {"0": "conv", "1": "bn"}.get(j, j)


def torchvision_segmentation_rename(module: SegmentationModel):
    """torchvision's `lraspp_mobilenet_v3_large` / `deeplabv3_mobilenet_v3_large` keys -> zoo paths."""
    # the trunk has no pre-logits conv (head_type "pool"); its blocks are laid out as in the MobileNetV3 classifier
    backbone = torchvision_rename(module.backbone.clone(head_type="mobilenetv3"))
    heads = dict(module.heads)

    def head(h, rest: str) -> str | None:
        if isinstance(h, LRASPPHead):
            return _LRASPP.get(rest)
        if isinstance(h, DeepLabHead):
            return _deeplab(rest, len(h.rates))
        if isinstance(h, FCNHead):
            return _FCN.get(rest)
        return None

    def rename(path: str) -> str | None:
        top, _, rest = path.partition(".")
        if top == "backbone":
            return backbone("features." + rest)
        if top == "aux_classifier" and "aux" not in heads:
            return None  # a model built without the auxiliary head (it only serves training)
        name = {"classifier": "out", "aux_classifier": "aux"}.get(top)
        mapped = head(heads.get(name), rest)
        return f"{name}/{mapped}" if mapped else path.replace(".", "/")  # unknown: reported as unexpected

    return rename
