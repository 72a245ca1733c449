"""FBNet-C (Wu et al., "FBNet: Hardware-Aware Efficient ConvNet Design via Differentiable Neural Architecture Search",
arXiv:1812.03443) and FBNetV3-B/D/G (Dai et al., "FBNetV3: Joint Architecture-Recipe Search using Predictor
Pretraining", arXiv:2006.02049), as timm builds them.

FBNet-C: ReLU inverted residuals (the first one with expansion 1), a 1x1 head conv to 1984 (conv, BN, ReLU), then
pooling. FBNetV3: hard-swish, squeeze-excite with hard-sigmoid gates sized from the block input and rounded to
multiples of 8 (never more than 5% down), a final 1x1 'cn' stage, and MobileNetV3's head (pool, then a 1x1 conv to
1984 without bias).
"""

from __future__ import annotations

from functools import partial

from zoo.config import ModelCfg
from zoo.models.mobilenet_base import BlockSpec, MobileNet, feature_info, resolve_stages, stage
from zoo.models._mobile_convert import timm_rename
from zoo.models._pretrained import REL, timm_weights
from zoo.registry import register_model

IR = partial(BlockSpec, kind="ir", repeat=1)
# FBNet-C, paper Figure 4 (the searched blocks as rows), 224x224 input.
FBNET_C = (
    stage(IR(kernel=3, stride=1, expand=1, out=16)),  # stage 0, 112x112 in
    stage(IR(kernel=3, stride=2, expand=6, out=24),  # stage 1, 112x112 in
          IR(kernel=3, stride=1, expand=1, out=24, repeat=2)),
    stage(IR(kernel=5, stride=2, expand=6, out=32),  # stage 2, 56x56 in
          IR(kernel=5, stride=1, expand=3, out=32),
          IR(kernel=5, stride=1, expand=6, out=32),
          IR(kernel=3, stride=1, expand=6, out=32)),
    stage(IR(kernel=5, stride=2, expand=6, out=64),  # stage 3, 28x28 in
          IR(kernel=5, stride=1, expand=3, out=64),
          IR(kernel=5, stride=1, expand=6, out=64, repeat=2)),
    stage(IR(kernel=5, stride=1, expand=6, out=112, repeat=3),  # stage 4, 14x14 in
          IR(kernel=5, stride=1, expand=3, out=112)),
    stage(IR(kernel=5, stride=2, expand=6, out=184, repeat=4)),  # stage 5, 14x14 in
    stage(IR(kernel=3, stride=1, expand=6, out=352)),  # stage 6, 7x7 in
)

# FBNetV3 searched architectures (paper appendix), 224x224 input; `se` is relative to the block input.
SE = dict(se=0.25)
FBNETV3_B = (
    stage(kind="ds", repeat=2, kernel=3, stride=1, out=16),  # stage 0, 112x112 in
    stage(IR(kernel=5, stride=2, expand=4, out=24),  # stage 1, 112x112 in
          IR(kernel=5, stride=1, expand=2, out=24, repeat=3)),
    stage(IR(kernel=5, stride=2, expand=5, out=40, **SE),  # stage 2, 56x56 in
          IR(kernel=5, stride=1, expand=3, out=40, repeat=4, **SE)),
    stage(IR(kernel=5, stride=2, expand=5, out=72),  # stage 3, 28x28 in
          IR(kernel=3, stride=1, expand=3, out=72, repeat=4)),
    stage(IR(kernel=3, stride=1, expand=5, out=120, **SE),  # stage 4, 14x14 in
          IR(kernel=5, stride=1, expand=3, out=120, repeat=5, **SE)),
    stage(IR(kernel=3, stride=2, expand=6, out=184, **SE),  # stage 5, 14x14 in
          IR(kernel=5, stride=1, expand=4, out=184, repeat=5, **SE),
          IR(kernel=5, stride=1, expand=6, out=224, **SE)),
    stage(kind="cn", repeat=1, kernel=1, stride=1, out=1344),  # stage 6, 7x7 in
)
FBNETV3_D = (
    stage(kind="ds", repeat=2, kernel=3, stride=1, out=16),  # stage 0, 112x112 in
    stage(IR(kernel=3, stride=2, expand=5, out=24),  # stage 1, 112x112 in
          IR(kernel=3, stride=1, expand=2, out=24, repeat=5)),
    stage(IR(kernel=5, stride=2, expand=4, out=40, **SE),  # stage 2, 56x56 in
          IR(kernel=3, stride=1, expand=3, out=40, repeat=4, **SE)),
    stage(IR(kernel=3, stride=2, expand=5, out=72),  # stage 3, 28x28 in
          IR(kernel=3, stride=1, expand=3, out=72, repeat=4)),
    stage(IR(kernel=3, stride=1, expand=5, out=128, **SE),  # stage 4, 14x14 in
          IR(kernel=5, stride=1, expand=3, out=128, repeat=6, **SE)),
    stage(IR(kernel=3, stride=2, expand=6, out=208, **SE),  # stage 5, 14x14 in
          IR(kernel=5, stride=1, expand=5, out=208, repeat=5, **SE),
          IR(kernel=5, stride=1, expand=6, out=240, **SE)),
    stage(kind="cn", repeat=1, kernel=1, stride=1, out=1440),  # stage 6, 7x7 in
)
FBNETV3_G = (
    stage(kind="ds", repeat=3, kernel=3, stride=1, out=24),  # stage 0, 120x120 in
    stage(IR(kernel=5, stride=2, expand=4, out=40),  # stage 1, 120x120 in
          IR(kernel=5, stride=1, expand=2, out=40, repeat=4)),
    stage(IR(kernel=5, stride=2, expand=4, out=56, **SE),  # stage 2, 60x60 in
          IR(kernel=5, stride=1, expand=3, out=56, repeat=4, **SE)),
    stage(IR(kernel=5, stride=2, expand=5, out=104),  # stage 3, 30x30 in
          IR(kernel=3, stride=1, expand=3, out=104, repeat=4)),
    stage(IR(kernel=3, stride=1, expand=5, out=160, **SE),  # stage 4, 15x15 in
          IR(kernel=5, stride=1, expand=3, out=160, repeat=8, **SE)),
    stage(IR(kernel=3, stride=2, expand=6, out=264, **SE),  # stage 5, 15x15 in
          IR(kernel=5, stride=1, expand=5, out=264, repeat=6, **SE),
          IR(kernel=5, stride=1, expand=6, out=288, repeat=2, **SE)),
    stage(kind="cn", repeat=1, kernel=1, stride=1, out=1728),  # stage 6, 8x8 in
)

_V3 = dict(interpolation="bilinear", crop_pct=0.95)
# name: (table, stem width, model defaults, pretrained weights)
VARIANTS = {
    "fbnetc_100": (FBNET_C, 16, dict(interpolation="bilinear"), (
        timm_weights("fbnetc_100", "rmsp_in1k", REL + "fbnetc_100-c345b898.pth", top1=75.12, top5=92.384,
                     interpolation="bilinear"),
    )),
    "fbnetv3_b": (FBNETV3_B, 16, _V3, (
        timm_weights("fbnetv3_b", "ra2_in1k", REL + "fbnetv3_b_224-ead5d2a1.pth", top1=78.184, top5=94.238, **_V3),
    )),
    "fbnetv3_d": (FBNETV3_D, 24, _V3, (
        timm_weights("fbnetv3_d", "ra2_in1k", REL + "fbnetv3_d_224-c98bce42.pth", top1=78.658, top5=94.454, **_V3),
    )),
    "fbnetv3_g": (FBNETV3_G, 32, {**_V3, "input_size": (240, 240)}, (
        timm_weights("fbnetv3_g", "ra2_in1k", REL + "fbnetv3_g_240-0b1df83b.pth", top1=81.246, top5=95.686,
                     input_size=(240, 240), **_V3),
    )),
}


def _build(table, stem: int, **overrides) -> MobileNet:
    if table is FBNET_C:
        kwargs = dict(stages=resolve_stages(table, stem_chs=stem, act="relu"), num_features=1984,
                      head_type="efficientnet", act="relu")
    else:
        # timm rounds FBNetV3's widths (squeeze-excite included) with a 0.95 limit instead of 0.9
        stages = resolve_stages(table, stem_chs=stem, act="hard_swish", se_round="divisible", round_limit=0.95)
        kwargs = dict(stages=stages, num_features=1984, head_type="mobilenetv3", head_bias=False, act="hard_swish",
                      se_act="hard_swish", se_gate="hard_sigmoid")
    return MobileNet(**{**kwargs, "stem_chs": stem, **overrides})


for _name, (_table, _stem, _defaults, _weights) in VARIANTS.items():
    _fn = partial(_build, _table, _stem)
    register_model(
        ModelCfg(name=_name, family="fbnet", feature_info=feature_info(_fn().stages),
                 paper="arXiv:1812.03443 Figure 4" if _table is FBNET_C else "arXiv:2006.02049 (searched models)",
                 twin=f"timm:{_name}", **_defaults),
        _weights,
        converters={"timm": timm_rename},
    )(_fn)
