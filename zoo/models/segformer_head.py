"""SegFormer's all-MLP decoder on registered backbones (Xie et al., "SegFormer: Simple and Efficient Design for
Semantic Segmentation with Transformers", arXiv:2105.15203 Sec. 3.2): the backbone's maps at strides 4, 8, 16 and 32
(picked from its `feature_info` by stride, so CNNs and the hybrid attention families alike), the decoder of
`zoo.layers.mlp_decoder`, logits upsampled to the input (`zoo.models.segmentation_backbone`).

The decoder width is 128, half of the paper's 256 for MiT-B0: these backbones are about half as wide as MiT-B0
(32-256 channels; EfficientViT-B0 16-128, MobileViT-XS 48-96), and the fusion at stride 4 dominates the head's
MACs. Inputs are 512x512 (the paper's ADE20K crop), 21 classes (Pascal VOC's 20 and background). The head lives
under `out/`.

Parameter and MAC counts per preset: `zoo.model_info(name)`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from zoo.config import ModelCfg
from zoo.layers.mlp_decoder import MLPDecoderHead
from zoo.models import efficientvit_mit, mobilevit  # noqa: F401  (register the backbones before the presets read them)
from zoo.models.detection_backbone import maps_at
from zoo.models.segmentation_backbone import BackboneSegmentationModel, preprocessing, segmentation_trunk
from zoo.registry import register_model

HEAD = "out"
STRIDES = (4, 8, 16, 32)
WIDTH = 128
INPUT_SIZE = (512, 512)


def segformer_head(backbone: str, num_classes: int = 21, width: int = WIDTH, in_chans: int = 3,
                   drop_rate: float = 0.1, dtype: Any = None, conv: Any = None,
                   norm: Any = None) -> BackboneSegmentationModel:
    """The all-MLP decoder on the registered classifier `backbone`. `conv`/`norm`/`dtype`: for the backbone and the
    head alike (None: each one's defaults)."""
    trunk, skip, info = segmentation_trunk(backbone, in_chans=in_chans, dtype=dtype, conv=conv, norm=norm)
    head = MLPDecoderHead(num_classes, maps_at(info, STRIDES, backbone), width, drop_rate, dtype=dtype, conv=conv,
                          norm=norm)
    return BackboneSegmentationModel(trunk, ((HEAD, head),), skip=skip)


def _cfg(name: str, backbone: str) -> ModelCfg:
    return ModelCfg(
        name=name, family="segformer_head", task="segmentation", input_size=INPUT_SIZE, num_classes=21,
        interpolation="bilinear", crop_pct=1.0, classifier=(f"{HEAD}/linear_pred",),
        feature_info=segmentation_trunk(backbone)[2], paper="arXiv:2105.15203", **preprocessing(backbone),
    )


# name: backbone (each has maps at strides 4-32 in its feature_info)
VARIANTS = {
    "segformer_head_mobilevit_xs": "mobilevit_xs",
    "segformer_head_efficientvit_b0": "efficientvit_b0",
}

for _name, _backbone in VARIANTS.items():
    register_model(_cfg(_name, _backbone))(partial(segformer_head, _backbone))
