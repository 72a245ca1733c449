"""MobileNetV1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications",
arXiv:1704.04861), as timm builds it: depthwise-separable blocks with an activated pointwise conv and no residual.

The stage table is Table 1 of the paper. timm's `mobilenetv1_100`/`_125` pool the last stage straight into the
classifier; `mobilenetv1_100h` adds a 1x1 head conv to 1024 channels (conv, BN, act) before pooling.
"""

from __future__ import annotations

from functools import partial

from zoo.config import INCEPTION_MEAN, INCEPTION_STD, ModelCfg
from zoo.models.mobilenet_base import MobileNet, feature_info, make_divisible, resolve_stages, stage
from zoo.models._mobile_convert import timm_rename
from zoo.models._pretrained import timm_weights
from zoo.registry import register_model

# Paper Table 1 ("Conv dw / s" + "Conv / s1" pairs as one block each), 224x224 input.
DSA = dict(kind="ds", kernel=3, pw_act=True, noskip=True)
TABLE = (
    stage(**DSA, repeat=1, stride=1, out=64),  # stage 0, 112x112 in
    stage(**DSA, repeat=2, stride=2, out=128),  # stage 1, 112x112 in
    stage(**DSA, repeat=2, stride=2, out=256),  # stage 2, 56x56 in
    stage(**DSA, repeat=6, stride=2, out=512),  # stage 3, 28x28 in
    stage(**DSA, repeat=2, stride=2, out=1024),  # stage 4, 14x14 in
)

_RA4 = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD)

# name: (width multiplier, head conv, model defaults, pretrained weights)
VARIANTS = {
    "mobilenetv1_100": (1.0, False, _RA4, (
        timm_weights("mobilenetv1_100", "ra4_e3600_r224_in1k", top1=75.388, top5=92.31, **_RA4),
    )),
    "mobilenetv1_100h": (1.0, True, _RA4, (
        timm_weights("mobilenetv1_100h", "ra4_e3600_r224_in1k", top1=75.664, top5=92.522, **_RA4),
    )),
    "mobilenetv1_125": (1.25, False, {**_RA4, "crop_pct": 0.9}, (
        timm_weights("mobilenetv1_125", "ra4_e3600_r224_in1k", top1=76.92, top5=93.232, crop_pct=0.9, **_RA4),
    )),
}


def _build(width: float, head_conv: bool, **overrides) -> MobileNet:
    stem = make_divisible(32 * width)
    stages = resolve_stages(TABLE, stem_chs=stem, act="relu6", width=width)
    if head_conv:
        head = dict(num_features=max(1024, make_divisible(1024 * width)), head_type="efficientnet")
    else:  # no head conv: the classifier reads the pooled last stage
        head = dict(num_features=stages[-1][-1].out_chs, head_type="pool")
    return MobileNet(**{**dict(stages=stages, stem_chs=stem, act="relu6", **head), **overrides})


for _name, (_width, _head_conv, _defaults, _weights) in VARIANTS.items():
    _fn = partial(_build, _width, _head_conv)
    register_model(
        ModelCfg(name=_name, family="mobilenetv1", feature_info=feature_info(_fn().stages),
                 paper="arXiv:1704.04861 Table 1", twin=f"timm:{_name}", **_defaults),
        _weights,
        converters={"timm": timm_rename},
    )(_fn)
