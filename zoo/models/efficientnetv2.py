"""EfficientNetV2 (Tan & Le, "EfficientNetV2: Smaller Models and Faster Training", arXiv:2104.00298).

Early stages are fused: a 3x3 conv with a residual ('cn' with `skip`), then edge residuals ('er', the fused MBConv:
one 3x3 conv expands), later stages the inverted residuals with squeeze-excite of EfficientNet ('ir').

- B0-B3 (`tf_` ports of the official TF weights: TF "SAME" padding, BN eps 1e-3): the base table of the official
  release, scaled by EfficientNet's compound coefficients; widths round to multiples of 8 without the 10% floor
  (timm's `round_limit=0`).
- `efficientnetv2_rw_t`: timm's own "tiny" size of EfficientNetV2-S (paper Table 4) at width 0.8, depth 0.9.
"""

from __future__ import annotations

from functools import partial

from zoo.config import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD, ModelCfg
from zoo.layers.norm import BN_EPS_TF, BN_EPS_TORCH
from zoo.models.mobilenet_base import MobileNet, feature_info, make_divisible, resolve_stages, stage
from zoo.models._mobile_convert import timm_rename
from zoo.models._pretrained import timm_weights
from zoo.registry import register_model

# The official release's B0 (github.com/google/automl efficientnetv2 "efficientnetv2-b0"), 192x192 input.
BASE = (
    stage(kind="cn", repeat=1, kernel=3, stride=1, out=16, skip=True),  # stage 0, 96x96 in
    stage(kind="er", repeat=2, kernel=3, stride=2, expand=4, out=32),  # stage 1, 96x96 in
    stage(kind="er", repeat=2, kernel=3, stride=2, expand=4, out=48),  # stage 2, 48x48 in
    stage(kind="ir", repeat=3, kernel=3, stride=2, expand=4, out=96, se=0.25),  # stage 3, 24x24 in
    stage(kind="ir", repeat=5, kernel=3, stride=1, expand=6, out=112, se=0.25),  # stage 4, 12x12 in
    stage(kind="ir", repeat=8, kernel=3, stride=2, expand=6, out=192, se=0.25),  # stage 5, 12x12 in
)
# Paper Table 4 (EfficientNetV2-S), 224x224 input.
SMALL = (
    stage(kind="cn", repeat=2, kernel=3, stride=1, out=24, skip=True),  # stage 0, 112x112 in
    stage(kind="er", repeat=4, kernel=3, stride=2, expand=4, out=48),  # stage 1, 112x112 in
    stage(kind="er", repeat=4, kernel=3, stride=2, expand=4, out=64),  # stage 2, 56x56 in
    stage(kind="ir", repeat=6, kernel=3, stride=2, expand=4, out=128, se=0.25),  # stage 3, 28x28 in
    stage(kind="ir", repeat=9, kernel=3, stride=1, expand=6, out=160, se=0.25),  # stage 4, 14x14 in
    stage(kind="ir", repeat=15, kernel=3, stride=2, expand=6, out=256, se=0.25),  # stage 5, 14x14 in
)

_EFFV2 = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-effv2-weights/"
_REL = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/"
_B1 = dict(input_size=(192, 192), crop_pct=0.882)
_B2 = dict(input_size=(208, 208), crop_pct=0.89)
_B3_21K = dict(input_size=(240, 240), crop_pct=0.9, mean=INCEPTION_MEAN, std=INCEPTION_STD)

# name: (table, width, depth, tf_port, stem, head, pretrained weights, model defaults); top-1/5 as timm evaluates
# the weights at their input size.
VARIANTS = {
    "tf_efficientnetv2_b0": (BASE, 1.0, 1.0, True, 32, 1280, (
        timm_weights("tf_efficientnetv2_b0", "in1k", _EFFV2 + "tf_efficientnetv2_b0-c7cc451f.pth", top1=76.876,
                     top5=93.184, input_size=(192, 192)),
    ), dict(input_size=(192, 192))),
    "tf_efficientnetv2_b1": (BASE, 1.0, 1.1, True, 32, 1280, (
        timm_weights("tf_efficientnetv2_b1", "in1k", _EFFV2 + "tf_efficientnetv2_b1-be6e41b0.pth", top1=77.934,
                     top5=93.822, **_B1),
    ), _B1),
    "tf_efficientnetv2_b2": (BASE, 1.1, 1.2, True, 32, 1280, (
        timm_weights("tf_efficientnetv2_b2", "in1k", _EFFV2 + "tf_efficientnetv2_b2-847de54e.pth", top1=79.208,
                     top5=94.602, **_B2),
    ), _B2),
    "tf_efficientnetv2_b3": (BASE, 1.2, 1.4, True, 32, 1280, (
        timm_weights("tf_efficientnetv2_b3", "in21k_ft_in1k", top1=81.078, top5=95.92, **_B3_21K),
        timm_weights("tf_efficientnetv2_b3", "in1k", _EFFV2 + "tf_efficientnetv2_b3-57773f13.pth", top1=80.708,
                     top5=95.178, input_size=(240, 240), crop_pct=0.904, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ), _B3_21K),
    "efficientnetv2_rw_t": (SMALL, 0.8, 0.9, False, 24, 1280, (
        timm_weights("efficientnetv2_rw_t", "ra2_in1k", _REL + "efficientnetv2_t_agc-3620981a.pth", top1=81.37,
                     top5=95.55, crop_pct=1.0),
    ), dict(crop_pct=1.0)),
}


def _build(table, width: float, depth: float, tf_port: bool, stem: int, head: int, **overrides) -> MobileNet:
    # the B0-B3 release rounds every width to a multiple of 8 without the usual 10% floor; -S keeps the floor
    round_limit = 0.0 if table is BASE else 0.9
    stem_chs = make_divisible(stem * width, round_limit=round_limit)
    stages = resolve_stages(table, stem_chs=stem_chs, act="silu", width=width, depth=depth, round_limit=round_limit)
    kwargs = dict(
        stages=stages, stem_chs=stem_chs, num_features=make_divisible(head * width, round_limit=round_limit),
        head_type="efficientnet", act="silu", se_act="silu", se_gate="sigmoid",
        padding="same" if tf_port else "symmetric", bn_eps=BN_EPS_TF if tf_port else BN_EPS_TORCH,
    )
    return MobileNet(**{**kwargs, **overrides})


for _name, (_table, _width, _depth, _tf, _stem, _head, _weights, _defaults) in VARIANTS.items():
    _fn = partial(_build, _table, _width, _depth, _tf, _stem, _head)
    register_model(
        ModelCfg(name=_name, family="efficientnetv2", feature_info=feature_info(_fn().stages),
                 paper="arXiv:2104.00298 Table 4 (-S); B0-B3: the official release's base table",
                 twin=f"timm:{_name}", **_defaults),
        _weights,
        converters={"timm": timm_rename},
    )(_fn)
