"""DeepLabV3+ on registered backbones (Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic
Image Segmentation", arXiv:1802.02611): the backbone dilated to output stride 16 where its family allows (MobileNet:
`mobilenet_base.dilate`), ASPP on its deepest map, the decoder with its stride-4 map (`zoo.layers.deeplabv3plus`),
logits upsampled to the input (`zoo.models.segmentation_backbone`).

Maps are picked from the backbone's `feature_info` by stride: ASPP reads the deepest map at the output stride, the
decoder the one at stride 4. Inputs are 512x512 (the paper's crop is 513; 512 divides by 32, so every map is an
exact fraction of the input). 21 classes (Pascal VOC's 20 and background). The head lives under `out/`.

Parameter and MAC counts per preset: `zoo.model_info(name)`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from zoo.config import ModelCfg
from zoo.layers.deeplabv3plus import DeepLabV3PlusHead, atrous_rates
from zoo.models import mobilenetv2, mobilenetv3  # noqa: F401  (register the backbones before the presets read them)
from zoo.models.detection_backbone import maps_at
from zoo.models.segmentation_backbone import BackboneSegmentationModel, preprocessing, segmentation_trunk
from zoo.registry import register_model

HEAD = "out"
INPUT_SIZE = (512, 512)


def deeplabv3plus(backbone: str, num_classes: int = 21, output_stride: int = 16, in_chans: int = 3,
                  drop_rate: float = 0.1, dtype: Any = None, conv: Any = None,
                  norm: Any = None) -> BackboneSegmentationModel:
    """DeepLabV3+ on the registered classifier `backbone`. `output_stride` 8 or 16 dilates it (families that cannot
    dilate take 32); ASPP's rates follow it (`atrous_rates`). `conv`/`norm`/`dtype`: for the backbone and the head
    alike (None: each one's defaults)."""
    trunk, skip, info = segmentation_trunk(backbone, output_stride, in_chans=in_chans, dtype=dtype, conv=conv,
                                           norm=norm)
    high, low = maps_at(info, (output_stride, 4), backbone)
    head = DeepLabV3PlusHead(num_classes, high, low, atrous_rates(output_stride), drop_rate=drop_rate, dtype=dtype,
                             conv=conv, norm=norm)
    return BackboneSegmentationModel(trunk, ((HEAD, head),), skip=skip)


def _cfg(name: str, backbone: str, output_stride: int) -> ModelCfg:
    return ModelCfg(
        name=name, family="deeplabv3plus", task="segmentation", input_size=INPUT_SIZE, num_classes=21,
        interpolation="bilinear", crop_pct=1.0, classifier=(f"{HEAD}/classifier",),
        feature_info=segmentation_trunk(backbone, output_stride)[2], paper="arXiv:1802.02611",
        **preprocessing(backbone),
    )


# name: (backbone, output stride)
VARIANTS = {
    "deeplabv3plus_mobilenetv2_100": ("mobilenetv2_100", 16),
    "deeplabv3plus_mobilenetv3_large_100": ("mobilenetv3_large_100", 16),
}

for _name, (_backbone, _os) in VARIANTS.items():
    register_model(_cfg(_name, _backbone, _os))(partial(deeplabv3plus, _backbone, output_stride=_os))
