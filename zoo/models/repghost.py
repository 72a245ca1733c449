"""RepGhostNet (Chen et al., "RepGhost: A Hardware-Efficient Ghost Module via Re-parameterization",
arXiv:2211.06088) as timm builds it (`timm/models/repghost.py`).

GhostNet's network (`zoo.models.ghostnet.GhostNet`, the same stem, stages, SE and head) with RepGhost modules
(`zoo.layers.ghost.RepGhostModule`): the cheap depthwise conv adds a BatchNorm of its input instead of concatenating
it, so the expansion widths are half of GhostNet's and the final 1x1 conv has twice the last expansion width. In the
training form each cheap conv has that BatchNorm branch; the deploy form (`compress.deploy`, or `deploy=True` for
timm's re-parameterized checkpoints) fuses it into the conv, one conv with a bias.

Parameter names mirror timm's modules; the cheap conv and its BatchNorm branch carry the re-parameterizable layer's
names (`ghost1/cheap_operation/conv_kxk_0/conv`, `.../identity`, deployed `.../reparam_conv`), which `timm_rename`
maps from timm's (`cheap_operation.0`, `fusion_bn.0`, deployed `cheap_operation`).
"""

from __future__ import annotations

import re
from functools import partial

from zoo.config import ModelCfg
from zoo.models._pretrained import timm_weights
from zoo.models.ghostnet import GhostNet, Row, feature_info, resolve
from zoo.models.ghostnet import timm_rename as ghostnet_rename
from zoo.registry import register_model

# The RepGhostNet architecture of arXiv:2211.06088 (224x224 input; timm's table): GhostNet's Table 1 with every
# #exp halved, grouped into stages as timm groups them.
REPGHOSTNET = (
    (Row(kernel=3, mid=8, out=16),),  # stage 0, 112x112 in
    (Row(kernel=3, mid=24, out=24, stride=2),),  # stage 1, 112x112 in
    (Row(kernel=3, mid=36, out=24),),  # stage 2, 56x56 in
    (Row(kernel=5, mid=36, out=40, se=0.25, stride=2),),  # stage 3, 56x56 in
    (Row(kernel=5, mid=60, out=40, se=0.25),),  # stage 4, 28x28 in
    (Row(kernel=3, mid=120, out=80, stride=2),),  # stage 5, 28x28 in
    (Row(kernel=3, mid=100, out=80),  # stage 6, 14x14 in
     Row(kernel=3, mid=120, out=80),
     Row(kernel=3, mid=120, out=80),
     Row(kernel=3, mid=240, out=112, se=0.25),
     Row(kernel=3, mid=336, out=112, se=0.25)),
    (Row(kernel=5, mid=336, out=160, se=0.25, stride=2),),  # stage 7, 14x14 in
    (Row(kernel=5, mid=480, out=160),  # stage 8, 7x7 in
     Row(kernel=5, mid=480, out=160, se=0.25),
     Row(kernel=5, mid=480, out=160),
     Row(kernel=5, mid=480, out=160, se=0.25)),
)
FINAL_MULT = 2.0  # the final 1x1 conv: 2 x the last #exp (960 at width 1.0)


def timm_rename(module: GhostNet):
    """GhostNet's key map (`zoo.models.ghostnet.timm_rename`), and for RepGhost modules `cheap_operation.0/1` ->
    `cheap_operation/conv_kxk_0/conv|bn`, `fusion_bn.0` -> `cheap_operation/identity`, the re-parameterized
    `cheap_operation` (a conv with a bias) -> `cheap_operation/reparam_conv`."""
    base = ghostnet_rename(module)

    def rename(path: str) -> str | None:
        path = re.sub(r"\.cheap_operation\.0$", ".cheap_operation.conv_kxk_0.conv", path)
        path = re.sub(r"\.cheap_operation\.1$", ".cheap_operation.conv_kxk_0.bn", path)
        path = re.sub(r"\.cheap_operation$", ".cheap_operation.reparam_conv", path)
        path = re.sub(r"\.fusion_bn\.0$", ".cheap_operation.identity", path)
        return base(path)

    return rename


# ImageNet-1k weights of github.com/ChengpengChen/RepGhost as re-published by timm (MIT license); top-1/top-5 from
# timm's results-imagenet.csv (224x224, crop 0.875, bicubic).
_WEIGHTS = dict(license="mit", origin="https://github.com/ChengpengChen/RepGhost")

# name: (width, top-1, top-5)
VARIANTS = {
    "repghostnet_050": (0.5, 66.978, 86.936),
    "repghostnet_058": (0.58, 68.938, 88.386),
    "repghostnet_080": (0.8, 72.240, 90.492),
    "repghostnet_100": (1.0, 74.208, 91.550),
    "repghostnet_111": (1.11, 75.060, 92.196),
    "repghostnet_130": (1.3, 76.378, 92.898),
    "repghostnet_150": (1.5, 77.474, 93.496),
    "repghostnet_200": (2.0, 78.802, 94.332),
}


def _build(width: float, **overrides) -> GhostNet:
    stem_chs, stages = resolve(REPGHOSTNET, width, final_mult=FINAL_MULT)
    return GhostNet(**{**dict(stages=stages, stem_chs=stem_chs, module="repghost"), **overrides})


for _name, (_width, _top1, _top5) in VARIANTS.items():
    _stem, _stages = resolve(REPGHOSTNET, _width, final_mult=FINAL_MULT)
    register_model(
        ModelCfg(
            name=_name, family="repghost", input_size=(224, 224), interpolation="bicubic", crop_pct=0.875,
            first_conv="stem/conv", classifier="head/fc", feature_info=feature_info(_stem, _stages),
            paper="arXiv:2211.06088 RepGhostNet architecture", twin=f"timm:{_name}",
        ),
        (timm_weights(_name, "in1k", top1=_top1, top5=_top5, **_WEIGHTS),),
        converters={"timm": timm_rename},
    )(partial(_build, _width))
