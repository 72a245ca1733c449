"""PP-LCNet (Cui et al., "PP-LCNet: A Lightweight CPU Convolutional Neural Network", arXiv:2109.15099), as timm
builds it: MobileNetV1's depthwise-separable blocks (activated pointwise conv, no residual) with hard-swish, 5x5
kernels and squeeze-excite in the last stage, and MobileNetV3's head (pool, then a 1x1 conv with bias to 1280).
"""

from __future__ import annotations

from functools import partial

from zoo.config import ModelCfg
from zoo.models.mobilenet_base import BlockSpec, MobileNet, feature_info, make_divisible, resolve_stages, stage
from zoo.models._mobile_convert import timm_rename
from zoo.models._pretrained import REL, timm_weights
from zoo.registry import register_model

DSA = partial(BlockSpec, kind="ds", pw_act=True, noskip=True)
# Paper Table 1 (the "DepthSepConv" rows), 224x224 input.
TABLE = (
    stage(DSA(repeat=1, kernel=3, stride=1, out=32)),  # stage 0, 112x112 in
    stage(DSA(repeat=2, kernel=3, stride=2, out=64)),  # stage 1, 112x112 in
    stage(DSA(repeat=2, kernel=3, stride=2, out=128)),  # stage 2, 56x56 in
    stage(DSA(repeat=1, kernel=3, stride=2, out=256),  # stage 3, 28x28 in
          DSA(repeat=1, kernel=5, stride=1, out=256)),
    stage(DSA(repeat=4, kernel=5, stride=1, out=256)),  # stage 4, 14x14 in
    stage(DSA(repeat=2, kernel=5, stride=2, out=512, se=0.25)),  # stage 5, 14x14 in
)

# name: (width multiplier, pretrained weights)
VARIANTS = {
    "lcnet_050": (0.5, (
        timm_weights("lcnet_050", "ra2_in1k", REL + "lcnet_050-f447553b.pth", top1=63.138, top5=84.402),
    )),
    "lcnet_075": (0.75, (
        timm_weights("lcnet_075", "ra2_in1k", REL + "lcnet_075-318cad2c.pth", top1=68.786, top5=88.384),
    )),
    "lcnet_100": (1.0, (
        timm_weights("lcnet_100", "ra2_in1k", REL + "lcnet_100-a929038c.pth", top1=72.13, top5=90.376),
    )),
}


def _build(width: float, **overrides) -> MobileNet:
    stem = make_divisible(16 * width)
    # squeeze-excite width: a quarter of the block input, rounded to the nearest integer; ReLU inside
    stages = resolve_stages(TABLE, stem_chs=stem, act="hard_swish", width=width, se_from_exp=True)
    kwargs = dict(stages=stages, stem_chs=stem, num_features=1280, head_type="mobilenetv3", act="hard_swish",
                  se_act="relu", se_gate="hard_sigmoid")
    return MobileNet(**{**kwargs, **overrides})


for _name, (_width, _weights) in VARIANTS.items():
    _fn = partial(_build, _width)
    register_model(
        ModelCfg(name=_name, family="lcnet", feature_info=feature_info(_fn().stages), paper="arXiv:2109.15099 Table 1",
                 twin=f"timm:{_name}"),
        _weights,
        converters={"timm": timm_rename},
    )(_fn)
