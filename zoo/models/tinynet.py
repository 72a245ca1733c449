"""TinyNet A-E (Han et al., "Model Rubik's Cube: Twisting Resolution, Depth and Width for TinyNets", arXiv:2010.14819).

EfficientNet-B0's stage table (`zoo.models.efficientnet.B0`) shrunk by the paper's "tiny formula": each variant's
resolution, width and depth multipliers are the paper's TinyNet-A..E (as timm's `_gen_tinynet` sets them). Unlike
EfficientNet, repeats are rounded (not ceiled) after scaling, the stem stays 32 wide and the head never narrows below
1280 channels.
"""

from __future__ import annotations

from functools import partial

from zoo.config import ModelCfg
from zoo.layers.norm import BN_EPS_TORCH
from zoo.models.efficientnet import B0
from zoo.models.mobilenet_base import MobileNet, feature_info, make_divisible, resolve_stages
from zoo.models._mobile_convert import timm_rename
from zoo.models._pretrained import timm_weights
from zoo.registry import register_model

# name: (resolution, width, depth, top-1, top-5): the paper's TinyNet-A..E; accuracies as timm evaluates the weights.
# Weights come from the hub only: the authors' release files publish no checksum to verify them by.
VARIANTS = {
    "tinynet_a": (192, 1.0, 1.2, 77.666, 93.532),
    "tinynet_b": (188, 0.75, 1.1, 74.946, 92.194),
    "tinynet_c": (184, 0.54, 0.85, 71.214, 89.746),
    "tinynet_d": (152, 0.54, 0.695, 66.936, 87.078),
    "tinynet_e": (106, 0.51, 0.6, 59.874, 81.774),
}


def _build(width: float, depth: float, **overrides) -> MobileNet:
    stages = resolve_stages(B0, stem_chs=32, act="silu", width=width, depth=depth, depth_trunc="round")
    kwargs = dict(
        stages=stages, stem_chs=32, num_features=max(1280, make_divisible(1280 * width)), head_type="efficientnet",
        act="silu", se_act="silu", se_gate="sigmoid", bn_eps=BN_EPS_TORCH, drop_rate=0.2,
    )
    return MobileNet(**{**kwargs, **overrides})


for _name, (_res, _width, _depth, _top1, _top5) in VARIANTS.items():
    _fn = partial(_build, _width, _depth)
    register_model(
        ModelCfg(name=_name, family="tinynet", input_size=(_res, _res), feature_info=feature_info(_fn().stages),
                 paper="arXiv:2010.14819 (TinyNet-A..E; table: arXiv:1905.11946 Table 1)",
                 twin=f"timm:{_name}"),
        (timm_weights(_name, "in1k", top1=_top1, top5=_top5, input_size=(_res, _res)),),
        converters={"timm": timm_rename},
    )(_fn)
