"""MobileNetV3 (Howard et al., "Searching for MobileNetV3", arXiv:1905.02244), timm and torchvision variants.

Stage tables are Table 1 (Large) and Table 2 (Small) of the paper, plus the "minimal" variants of the TF release
(no SE, no hard-swish, 3x3 kernels only). `tf_` variants use TF "SAME" padding and BN eps 1e-3 (weights ported from
TensorFlow); torchvision's use BN eps 1e-3 with symmetric padding.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from zoo.config import INCEPTION_MEAN, INCEPTION_STD, ModelCfg
from zoo.layers.norm import BN_EPS_TF, BN_EPS_TORCH
from zoo.models.mobilenet_base import BlockSpec, MobileNet, feature_info, make_divisible, resolve_stages, stage
from zoo.models._mobile_convert import timm_rename, torchvision_rename
from zoo.models._pretrained import REL, REL_TRESNET, timm_weights, torchvision_weights
from zoo.registry import register_model

# Paper Table 1, 224x224 input (the "exp size" column as `expand` = exp size / input width). `act=None` rows use
# the network activation (hard-swish).
IR = partial(BlockSpec, kind="ir", repeat=1)  # one inverted residual: rows of the stages that mix expansions
LARGE = (
    stage(kind="ds", repeat=1, kernel=3, stride=1, out=16, act="relu"),  # stage 0, 112x112 in
    stage(IR(kernel=3, stride=2, expand=4, out=24, act="relu"),  # stage 1, 112x112 in
          IR(kernel=3, stride=1, expand=3, out=24, act="relu")),
    stage(kind="ir", repeat=3, kernel=5, stride=2, expand=3, out=40, se=0.25, act="relu"),  # stage 2, 56x56 in
    stage(IR(kernel=3, stride=2, expand=6, out=80),  # stage 3, 28x28 in
          IR(kernel=3, stride=1, expand=2.5, out=80),
          IR(kernel=3, stride=1, expand=2.3, out=80, repeat=2)),
    stage(kind="ir", repeat=2, kernel=3, stride=1, expand=6, out=112, se=0.25),  # stage 4, 14x14 in
    stage(kind="ir", repeat=3, kernel=5, stride=2, expand=6, out=160, se=0.25),  # stage 5, 14x14 in
    stage(kind="cn", repeat=1, kernel=1, stride=1, out=960),  # stage 6, 7x7 in
)
# Paper Table 2.
SMALL = (
    stage(kind="ds", repeat=1, kernel=3, stride=2, out=16, se=0.25, act="relu"),  # stage 0, 112x112 in
    stage(IR(kernel=3, stride=2, expand=4.5, out=24, act="relu"),  # stage 1, 56x56 in
          IR(kernel=3, stride=1, expand=3.67, out=24, act="relu")),
    stage(IR(kernel=5, stride=2, expand=4, out=40, se=0.25),  # stage 2, 28x28 in
          IR(kernel=5, stride=1, expand=6, out=40, se=0.25, repeat=2)),
    stage(kind="ir", repeat=2, kernel=5, stride=1, expand=3, out=48, se=0.25),  # stage 3, 14x14 in
    stage(kind="ir", repeat=3, kernel=5, stride=2, expand=6, out=96, se=0.25),  # stage 4, 14x14 in
    stage(kind="cn", repeat=1, kernel=1, stride=1, out=576),  # stage 5, 7x7 in
)


def minimal(table):
    """The TF release's "minimal" variant of a table: no squeeze-excite, 3x3 kernels, the network activation."""
    return tuple(tuple(replace(r, se=0.0, kernel=min(r.kernel, 3), act=None) for r in rows) for rows in table)


LARGE_MINIMAL = minimal(LARGE)
SMALL_MINIMAL = minimal(SMALL)

_TF = dict(interpolation="bilinear", mean=INCEPTION_MEAN, std=INCEPTION_STD)

# name: (table, width, tf_port, pretrained weights)
VARIANTS = {
    "mobilenetv3_large_075": (LARGE, 0.75, False, ()),
    "mobilenetv3_large_100": (LARGE, 1.0, False, (
        timm_weights("mobilenetv3_large_100", "ra_in1k", REL + "mobilenetv3_large_100_ra-f55367f5.pth",
                     top1=75.784, top5=92.528),
        timm_weights("mobilenetv3_large_100", "miil_in21k_ft_in1k",
                     REL_TRESNET + "mobilenetv3_large_100_1k_miil_78_0-66471c13.pth", top1=77.92, top5=92.894,
                     interpolation="bilinear", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)),
        timm_weights("mobilenetv3_large_100", "ra4_e3600_r224_in1k", top1=76.31, top5=92.842, crop_pct=0.95,
                     mean=INCEPTION_MEAN, std=INCEPTION_STD),
    )),
    "mobilenetv3_small_050": (SMALL, 0.5, False, (
        timm_weights("mobilenetv3_small_050", "lamb_in1k", REL + "mobilenetv3_small_050_lambc-4b7bbe87.pth",
                     top1=57.918, top5=80.144),
    )),
    "mobilenetv3_small_075": (SMALL, 0.75, False, (
        timm_weights("mobilenetv3_small_075", "lamb_in1k", REL + "mobilenetv3_small_075_lambc-384766db.pth",
                     top1=65.284, top5=85.462),
    )),
    "mobilenetv3_small_100": (SMALL, 1.0, False, (
        timm_weights("mobilenetv3_small_100", "lamb_in1k", REL + "mobilenetv3_small_100_lamb-266a294c.pth",
                     top1=67.636, top5=87.638),
    )),
    "tf_mobilenetv3_large_075": (LARGE, 0.75, True, (
        timm_weights("tf_mobilenetv3_large_075", "in1k", REL + "tf_mobilenetv3_large_075-150ee8b0.pth",
                     top1=73.442, top5=91.332, **_TF),
    )),
    "tf_mobilenetv3_large_100": (LARGE, 1.0, True, (
        timm_weights("tf_mobilenetv3_large_100", "in1k", REL + "tf_mobilenetv3_large_100-427764d5.pth",
                     top1=75.51, top5=92.6, **_TF),
    )),
    "tf_mobilenetv3_large_minimal_100": (LARGE_MINIMAL, 1.0, True, (
        timm_weights("tf_mobilenetv3_large_minimal_100", "in1k",
                     REL + "tf_mobilenetv3_large_minimal_100-8596ae28.pth", top1=72.27, top5=90.664, **_TF),
    )),
    "tf_mobilenetv3_small_075": (SMALL, 0.75, True, (
        timm_weights("tf_mobilenetv3_small_075", "in1k", REL + "tf_mobilenetv3_small_075-da427f52.pth",
                     top1=65.706, top5=86.13, **_TF),
    )),
    "tf_mobilenetv3_small_100": (SMALL, 1.0, True, (
        timm_weights("tf_mobilenetv3_small_100", "in1k", REL + "tf_mobilenetv3_small_100-37f49e2b.pth",
                     top1=67.922, top5=87.686, **_TF),
    )),
    "tf_mobilenetv3_small_minimal_100": (SMALL_MINIMAL, 1.0, True, (
        timm_weights("tf_mobilenetv3_small_minimal_100", "in1k",
                     REL + "tf_mobilenetv3_small_minimal_100-922a7843.pth", top1=62.892, top5=84.27, **_TF),
    )),
}

_TV = "https://download.pytorch.org/models/"
TORCHVISION = {
    "mobilenet_v3_large": (LARGE, (
        torchvision_weights("imagenet1k_v1", _TV + "mobilenet_v3_large-8738ca79.pth", top1=74.042, top5=91.34),
        torchvision_weights("imagenet1k_v2", _TV + "mobilenet_v3_large-5c1a4163.pth", top1=75.274, top5=92.566,
                            crop_pct=0.9655),
    )),
    "mobilenet_v3_small": (SMALL, (
        torchvision_weights("imagenet1k_v1", _TV + "mobilenet_v3_small-047dcff4.pth", top1=67.668, top5=87.402),
    )),
}


def _build(table, width: float, tf_port: bool, minimal: bool, **overrides) -> MobileNet:
    small = table in (SMALL, SMALL_MINIMAL)
    act = "relu" if minimal else "hard_swish"
    stem = 16 if width < 0.75 else make_divisible(16 * width)  # timm keeps the stem fixed below 0.75
    stages = resolve_stages(table, stem_chs=stem, act=act, width=width, se_from_exp=True, se_round="divisible")
    kwargs = dict(
        stages=stages, stem_chs=stem, num_features=1024 if small else 1280, head_type="mobilenetv3", act=act,
        se_act="relu", se_gate="hard_sigmoid", padding="same" if tf_port else "symmetric",
        bn_eps=BN_EPS_TF if tf_port else BN_EPS_TORCH, drop_rate=0.2,
    )
    return MobileNet(**{**kwargs, **overrides})


def _cfg(name: str, module: MobileNet, twin: str, **fields) -> ModelCfg:
    return ModelCfg(name=name, family="mobilenetv3", feature_info=feature_info(module.stages),
                    paper="arXiv:1905.02244 Tables 1-2", twin=twin, **fields)


for _name, (_table, _width, _tf, _weights) in VARIANTS.items():
    _fn = partial(_build, _table, _width, _tf, "minimal" in _name)
    register_model(
        _cfg(_name, _fn(), f"timm:{_name}", **(_TF if _tf else {})),
        _weights,
        converters={"timm": timm_rename},
    )(_fn)

for _name, (_table, _weights) in TORCHVISION.items():
    # Same graph as timm's (squeeze channels, head order), but BN eps 1e-3 and torchvision's key layout.
    _fn = partial(_build, _table, 1.0, False, False, bn_eps=BN_EPS_TF)
    register_model(
        _cfg(_name, _fn(), f"torchvision:{_name}", interpolation="bilinear"),
        _weights,
        converters={"torchvision": torchvision_rename},
    )(_fn)
