"""MnasNet (Tan et al., "MnasNet: Platform-Aware Neural Architecture Search for Mobile", arXiv:1807.11626), timm and
torchvision variants.

MnasNet-A1 (timm's `semnasnet_*`, squeeze-excite in three stages) is Figure 7(a) of the paper; MnasNet-B1 (timm's
`mnasnet_*`, torchvision's `mnasnet*`) and the small model are the TF release's (tensorflow/tpu mnasnet_models.py).
All use ReLU and a 1x1 head conv to 1280 channels (conv, BN, ReLU) before pooling. torchvision's MNASNet is the same
graph as timm's B1 at every width (same rounding, head fixed at 1280); only its checkpoint layout differs.
"""

from __future__ import annotations

import re
from functools import partial

from zoo.config import ModelCfg
from zoo.models.mobilenet_base import MobileNet, feature_info, make_divisible, resolve_stages, stage
from zoo.models._mobile_convert import timm_rename
from zoo.models._pretrained import REL, timm_weights, torchvision_weights
from zoo.registry import register_model

# Paper Figure 7(a), 224x224 input. The first block never adds its input back (the stem may match its width).
A1 = (
    stage(kind="ds", repeat=1, kernel=3, stride=1, out=16, noskip=True),  # stage 0, 112x112 in
    stage(kind="ir", repeat=2, kernel=3, stride=2, expand=6, out=24),  # stage 1, 112x112 in
    stage(kind="ir", repeat=3, kernel=5, stride=2, expand=3, out=40, se=0.25),  # stage 2, 56x56 in
    stage(kind="ir", repeat=4, kernel=3, stride=2, expand=6, out=80),  # stage 3, 28x28 in
    stage(kind="ir", repeat=2, kernel=3, stride=1, expand=6, out=112, se=0.25),  # stage 4, 14x14 in
    stage(kind="ir", repeat=3, kernel=5, stride=2, expand=6, out=160, se=0.25),  # stage 5, 14x14 in
    stage(kind="ir", repeat=1, kernel=3, stride=1, expand=6, out=320),  # stage 6, 7x7 in
)
# MnasNet-B1 of the TF release, 224x224 input.
B1 = (
    stage(kind="ds", repeat=1, kernel=3, stride=1, out=16, noskip=True),  # stage 0, 112x112 in
    stage(kind="ir", repeat=3, kernel=3, stride=2, expand=3, out=24),  # stage 1, 112x112 in
    stage(kind="ir", repeat=3, kernel=5, stride=2, expand=3, out=40),  # stage 2, 56x56 in
    stage(kind="ir", repeat=3, kernel=5, stride=2, expand=6, out=80),  # stage 3, 28x28 in
    stage(kind="ir", repeat=2, kernel=3, stride=1, expand=6, out=96),  # stage 4, 14x14 in
    stage(kind="ir", repeat=4, kernel=5, stride=2, expand=6, out=192),  # stage 5, 14x14 in
    stage(kind="ir", repeat=1, kernel=3, stride=1, expand=6, out=320, noskip=True),  # stage 6, 7x7 in
)
# The small model of the TF release (stem of 8 channels), 224x224 input.
SMALL = (
    stage(kind="ds", repeat=1, kernel=3, stride=1, out=8),  # stage 0, 112x112 in
    stage(kind="ir", repeat=1, kernel=3, stride=2, expand=3, out=16),  # stage 1, 112x112 in
    stage(kind="ir", repeat=2, kernel=3, stride=2, expand=6, out=16),  # stage 2, 56x56 in
    stage(kind="ir", repeat=4, kernel=5, stride=2, expand=6, out=32, se=0.25),  # stage 3, 28x28 in
    stage(kind="ir", repeat=3, kernel=3, stride=1, expand=6, out=32, se=0.25),  # stage 4, 14x14 in
    stage(kind="ir", repeat=3, kernel=5, stride=2, expand=6, out=88, se=0.25),  # stage 5, 14x14 in
    stage(kind="ir", repeat=1, kernel=3, stride=1, expand=6, out=144),  # stage 6, 7x7 in
)

# name: (table, stem width, width multiplier, pretrained weights)
VARIANTS = {
    "mnasnet_100": (B1, 32, 1.0, (
        timm_weights("mnasnet_100", "rmsp_in1k", REL + "mnasnet_b1-74cb7081.pth", top1=74.672, top5=92.108),
    )),
    "mnasnet_small": (SMALL, 8, 1.0, (
        timm_weights("mnasnet_small", "lamb_in1k", REL + "mnasnet_small_lamb-aff75073.pth", top1=66.204,
                     top5=86.47),
    )),
    "semnasnet_075": (A1, 32, 0.75, (
        timm_weights("semnasnet_075", "rmsp_in1k", REL + "semnasnet_075-18710866.pth", top1=73.0, top5=91.124),
    )),
    "semnasnet_100": (A1, 32, 1.0, (
        timm_weights("semnasnet_100", "rmsp_in1k", REL + "mnasnet_a1-d9418771.pth", top1=75.452, top5=92.608),
    )),
}

_TV = "https://download.pytorch.org/models/"
_TV_NEW_RECIPE = dict(crop_pct=0.9655)  # torchvision's retrained weights: resize to 232, crop 224
# name: (width multiplier, pretrained weights)
TORCHVISION = {
    "mnasnet0_5": (0.5, (
        torchvision_weights("imagenet1k_v1", _TV + "mnasnet0.5_top1_67.823-3ffadce67e.pth", top1=67.734, top5=87.49),
    )),
    "mnasnet0_75": (0.75, (
        torchvision_weights("imagenet1k_v1", _TV + "mnasnet0_75-7090bc5f.pth", top1=71.18, top5=90.496,
                            **_TV_NEW_RECIPE),
    )),
    "mnasnet1_0": (1.0, (
        torchvision_weights("imagenet1k_v1", _TV + "mnasnet1.0_top1_73.512-f206786ef8.pth", top1=73.456,
                            top5=91.51),
    )),
    "mnasnet1_3": (1.3, (
        torchvision_weights("imagenet1k_v1", _TV + "mnasnet1_3-a4c69d6f.pth", top1=76.506, top5=93.522,
                            **_TV_NEW_RECIPE),
    )),
}


def _build(table, stem: int, width: float, **overrides) -> MobileNet:
    stem_chs = make_divisible(stem * width)
    # squeeze-excite width: a quarter of the block input, rounded to the nearest integer; ReLU inside
    stages = resolve_stages(table, stem_chs=stem_chs, act="relu", width=width)
    kwargs = dict(stages=stages, stem_chs=stem_chs, num_features=1280, head_type="efficientnet", act="relu",
                  se_act="relu", se_gate="sigmoid")
    return MobileNet(**{**kwargs, **overrides})


# torchvision's MNASNet: one Sequential `layers` (stem conv/bn at 0/1, the depthwise-separable block's convs and
# norms at 3/4 and 6/7, one Sequential of inverted residuals per later stage, the head conv/bn), `classifier.1`.
_TV_DS = {"0": "stem/conv", "1": "stem/bn1", "3": "stages_0/block_0/conv_dw", "4": "stages_0/block_0/bn1",
          "6": "stages_0/block_0/conv_pw", "7": "stages_0/block_0/bn2"}
_TV_IR = {"0": "conv_pw", "1": "bn1", "3": "conv_dw", "4": "bn2", "6": "conv_pwl", "7": "bn3"}
_TV_FIRST_STACK = 8


def torchvision_rename(module: MobileNet):
    """torchvision `MNASNet` keys -> zoo paths (unknown keys pass through, to be reported as unexpected)."""
    head = _TV_FIRST_STACK + len(module.stages) - 1
    top = {**_TV_DS, str(head): "head/conv", str(head + 1): "head/bn"}

    def rename(path: str) -> str | None:
        if path == "classifier.1":
            return "head/fc"
        m = re.fullmatch(r"layers\.(\d+)", path)
        if m and m[1] in top:
            return top[m[1]]
        m = re.fullmatch(r"layers\.(\d+)\.(\d+)\.layers\.(\d+)", path)
        if m and _TV_FIRST_STACK <= int(m[1]) < head and m[3] in _TV_IR:
            return f"stages_{int(m[1]) - _TV_FIRST_STACK + 1}/block_{m[2]}/{_TV_IR[m[3]]}"
        return path.replace(".", "/")

    return rename


def _cfg(name: str, fn, twin: str, paper: str, **fields) -> ModelCfg:
    return ModelCfg(name=name, family="mnasnet", feature_info=feature_info(fn().stages), paper=paper, twin=twin,
                    **fields)


for _name, (_table, _stem, _width, _weights) in VARIANTS.items():
    _fn = partial(_build, _table, _stem, _width)
    _paper = "arXiv:1807.11626 Figure 7(a)" if _table is A1 else "tensorflow/tpu mnasnet_models.py (MnasNet-B1, small)"
    register_model(_cfg(_name, _fn, f"timm:{_name}", _paper), _weights, converters={"timm": timm_rename})(_fn)

for _name, (_width, _weights) in TORCHVISION.items():
    _fn = partial(_build, B1, 32, _width)
    register_model(
        _cfg(_name, _fn, f"torchvision:{_name}", "tensorflow/tpu mnasnet_models.py (MnasNet-B1)",
             interpolation="bilinear"),
        _weights,
        converters={"torchvision": torchvision_rename},
    )(_fn)
