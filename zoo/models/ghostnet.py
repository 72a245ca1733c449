"""GhostNet V1, V2 and V3 as timm builds them (`timm/models/ghostnet.py`).

- GhostNet (Han et al., "GhostNet: More Features from Cheap Operations", arXiv:1911.11907): a 3x3/2 stem, nine stages
  of ghost bottlenecks (`zoo.layers.ghost.GhostBottleneck`), a 1x1 conv + BN + ReLU to 960 x width, then global pool,
  1x1 conv with a bias + ReLU to 1280 (no BN) and the classifier (`MobileNetHead`, MobileNetV3's head).
- GhostNetV2 (Tang et al., arXiv:2211.12905): the first ghost module of every bottleneck after the first two is gated
  by DFC attention.
- GhostNetV3 (Liu et al., arXiv:2404.11202): the same network with re-parameterizable ghost modules and strided
  depthwise convs (three conv branches each, plus 1x1 and identity branches where the paper has them). Its deploy
  form (`compress.deploy`, or `deploy=True` for timm's re-parameterized checkpoints) has one conv per branch sum.

Feature maps (`features=True`): the last output at each stride, as every zoo backbone gives them (`stages_0`,
`stages_2`, `stages_4`, `stages_6` and the final 1x1 conv `stages_9`). timm's GhostNet taps the first block at each
new stride and the stem conv before its BatchNorm instead; the logits are the same.

Parameter names mirror timm's modules (`stem/conv`, `stages_3/block_0/ghost1/cheap_operation/bn`,
`.../ghost1/short_conv/conv_h`, `.../shortcut/conv_pw`, `head/conv`, `head/fc`); GhostNetV3's branches carry the
re-parameterizable layer's names (`primary_conv/conv_kxk_0/conv`, `cheap_operation/identity`, `conv_dw/conv_scale/bn`,
deployed: `.../reparam_conv`), which `timm_rename` maps from timm's (`primary_rpr_conv.0`, `cheap_rpr_skip`, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn

from zoo.config import FeatureInfo, ModelCfg
from zoo.inputs import check_images
from zoo.layers.blocks import ConvNormAct, Stage
from zoo.layers.ghost import GhostBottleneck
from zoo.layers.norm import BN_EPS_TORCH
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import feature_dict, layer_factories, stage_feature_info
from zoo.models.mobilenet_base import MobileNetHead, make_divisible
from zoo.registry import register_model


@dataclass(frozen=True, kw_only=True)
class Row:
    """One row of the paper's table: a ghost bottleneck expanding to `mid` (#exp) and projecting to `out` (#out)
    channels at width 1.0, with a depthwise `kernel` conv of `stride`, and squeeze-excite of ratio `se` (0: none)."""

    kernel: int
    mid: int
    out: int
    se: float = 0.0
    stride: int = 1


# Table 1 of arXiv:1911.11907 (GhostNet, 224x224 input), grouped into stages as timm groups them; GhostNetV2 and V3
# keep it. The final 1x1 conv has #exp of the last row (960) channels.
GHOSTNET = (
    (Row(kernel=3, mid=16, out=16),),  # stage 0, 112x112 in
    (Row(kernel=3, mid=48, out=24, stride=2),),  # stage 1, 112x112 in
    (Row(kernel=3, mid=72, out=24),),  # stage 2, 56x56 in
    (Row(kernel=5, mid=72, out=40, se=0.25, stride=2),),  # stage 3, 56x56 in
    (Row(kernel=5, mid=120, out=40, se=0.25),),  # stage 4, 28x28 in
    (Row(kernel=3, mid=240, out=80, stride=2),),  # stage 5, 28x28 in
    (Row(kernel=3, mid=200, out=80),  # stage 6, 14x14 in
     Row(kernel=3, mid=184, out=80),
     Row(kernel=3, mid=184, out=80),
     Row(kernel=3, mid=480, out=112, se=0.25),
     Row(kernel=3, mid=672, out=112, se=0.25)),
    (Row(kernel=5, mid=672, out=160, se=0.25, stride=2),),  # stage 7, 14x14 in
    (Row(kernel=5, mid=960, out=160),  # stage 8, 7x7 in
     Row(kernel=5, mid=960, out=160, se=0.25),
     Row(kernel=5, mid=960, out=160),
     Row(kernel=5, mid=960, out=160, se=0.25)),
)

Table = tuple[tuple[Row, ...], ...]


@dataclass(frozen=True)
class GhostBlock:
    """One concrete ghost bottleneck (channels rounded for the width)."""

    mid_chs: int
    out_chs: int
    kernel: int
    stride: int
    se_chs: int
    dfc: bool


@dataclass(frozen=True)
class FinalConv:
    """The 1x1 conv + BN + ReLU that ends the stages (timm's last `blocks` entry)."""

    out_chs: int


def resolve(table: Table, width: float, dfc_from: int | None = None, final_mult: float = 1.0):
    """(stem channels, stages of `GhostBlock`s then a `FinalConv` stage) at `width`, rounded as timm rounds: widths to
    multiples of 4, the SE width to a multiple of 4 of `se` x the expanded width. `dfc_from`: DFC attention in every
    block from that index on (None: none). The final conv has `final_mult` x the last row's #exp channels."""
    div4 = partial(make_divisible, divisor=4)
    stages, index = [], 0
    for rows in table:
        blocks = []
        for r in rows:
            mid = div4(r.mid * width)
            blocks.append(GhostBlock(mid, div4(r.out * width), r.kernel, r.stride, div4(mid * r.se) if r.se else 0,
                                     dfc_from is not None and index >= dfc_from))
            index += 1
        stages.append(tuple(blocks))
    stages.append((FinalConv(div4(table[-1][-1].mid * width * final_mult)),))
    return div4(16 * width), tuple(stages)


def feature_info(stem_chs: int, stages) -> tuple[FeatureInfo, ...]:
    return stage_feature_info(stem_chs, [getattr(s[0], "stride", 1) for s in stages], [s[-1].out_chs for s in stages])


def make_block(spec, drop_path_rate: float, *, conv, norm, module: str, num_conv_branches: int, deploy: bool,
               name: str) -> nn.Module:
    del drop_path_rate  # timm's GhostNet has no stochastic depth
    if isinstance(spec, FinalConv):
        return ConvNormAct(spec.out_chs, conv, norm, act="relu", norm_name="bn1", name=name)
    return GhostBottleneck(spec.mid_chs, spec.out_chs, conv, norm, kernel=spec.kernel, stride=spec.stride,
                           se_chs=spec.se_chs, module=module, dfc=spec.dfc, num_conv_branches=num_conv_branches,
                           deploy=deploy, name=name)


class GhostNet(nn.Module):
    """Backbone (stem -> stages of ghost bottlenecks -> 1x1 conv; the pooled head conv: `pre_logits`) + classifier.

    `module`: "ghost" (GhostNet V1/V2/V3) or "repghost" (RepGhostNet, `zoo.models.repghost`). `num_conv_branches > 0`:
    GhostNetV3's re-parameterizable branches; `deploy=True`: their fused form (the variables `compress.deploy` gives).
    """

    stages: tuple[tuple[Any, ...], ...]  # resolved: GhostBlock stages, then one FinalConv stage
    stem_chs: int
    module: str = "ghost"
    num_conv_branches: int = 0
    num_features: int = 1280
    bn_eps: float = BN_EPS_TORCH
    deploy: bool = False
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.2  # timm's default for GhostNet and RepGhostNet
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); parameters stay float32
    # injected layer factories (None: the defaults; see `zoo.models.backbone.layer_factories`)
    conv: Any = None
    norm: Any = None
    dense: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        check_images(x, self.in_chans, type(self).__name__)
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        x = ConvNormAct(self.stem_chs, conv, norm, kernel=3, stride=2, act="relu", norm_name="bn1", name="stem")(
            x, train)
        make = partial(make_block, conv=conv, norm=norm, module=self.module,
                       num_conv_branches=self.num_conv_branches, deploy=self.deploy)
        names = [f.name for f in feature_info(self.stem_chs, self.stages)]
        maps = [x] if "stem" in names else []
        for i, blocks in enumerate(self.stages):
            x = Stage(blocks, make, (0.0,) * len(blocks), name=f"stages_{i}")(x, train)
            if f"stages_{i}" in names:
                maps.append(x)
        head = MobileNetHead(self.num_features, self.num_classes, "mobilenetv3", "relu", conv, norm, dense,
                             self.drop_rate, name="head")
        feats = feature_dict(names, maps, head(x, train, pre_logits=True))
        if features:
            return feats
        return head(feats, train)


_TOP = {"conv_stem": "stem/conv", "bn1": "stem/bn1", "conv_head": "head/conv", "classifier": "head/fc"}
_SEQUENTIALS = {
    "short_conv": ("conv", "bn", "conv_h", "bn_h", "conv_v", "bn_v"),
    "shortcut": ("conv_dw", "bn_dw", "conv_pw", "bn_pw"),
}
_V3_BRANCHES = {"primary": "primary_conv", "cheap": "cheap_operation", "dw": "conv_dw"}


def timm_rename(module: GhostNet):
    """timm keys: `conv_stem`/`bn1`, `blocks.{i}.{j}.` -> `stages_{i}/block_{j}/`, `conv_head`, `classifier`; inside a
    block `primary_conv.0/1` and `cheap_operation.0/1` -> `conv`/`bn`, the DFC `short_conv.{n}` and `shortcut.{n}`
    Sequentials by layer name. GhostNetV3: `{primary,cheap,dw}_rpr_conv.{i}` -> `.../conv_kxk_{i}` and `bn1` -> `bn`,
    `*_rpr_scale` -> `conv_scale`, `cheap_rpr_skip` -> `identity`; its re-parameterized convs (`primary_conv.0`,
    `cheap_operation.0`, `conv_dw` with a bias) -> `reparam_conv`."""
    v3 = module.num_conv_branches > 0

    def rename(path: str) -> str | None:
        if path in _TOP:
            return _TOP[path]
        m = re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)", path)
        if not m:
            return path.replace(".", "/")  # unknown: reported as unexpected by the converter
        prefix, rest = f"stages_{m[1]}/block_{m[2]}/", m[3]
        if v3 and rest == "conv_dw":
            return prefix + "conv_dw/reparam_conv"
        rest = re.sub(r"(primary_conv|cheap_operation)\.0$", r"\1." + ("reparam_conv" if v3 else "conv"), rest)
        rest = re.sub(r"(primary_conv|cheap_operation)\.1$", r"\1.bn", rest)
        rest = re.sub(r"(short_conv|shortcut)\.(\d)$", lambda s: f"{s[1]}.{_SEQUENTIALS[s[1]][int(s[2])]}", rest)
        rest = re.sub(r"(primary|cheap|dw)_rpr_conv\.(\d+)\.", lambda s: f"{_V3_BRANCHES[s[1]]}.conv_kxk_{s[2]}.",
                      rest)
        rest = re.sub(r"(cheap|dw)_rpr_scale\.", lambda s: f"{_V3_BRANCHES[s[1]]}.conv_scale.", rest)
        rest = re.sub(r"cheap_rpr_skip$", "cheap_operation.identity", rest)
        rest = re.sub(r"(conv_kxk_\d+|conv_scale)\.bn1$", r"\1.bn", rest)
        return prefix + rest.replace(".", "/")

    return rename


# Huawei's ImageNet-1k weights (github.com/huawei-noah/Efficient-AI-Backbones) as re-published by timm; top-1/top-5
# from timm's results-imagenet.csv (224x224, crop 0.875, bicubic).
_HUAWEI = dict(origin="https://github.com/huawei-noah/Efficient-AI-Backbones")

# name: (width, version, pretrained weights)
VARIANTS = {
    "ghostnet_100": (1.0, "v1", (timm_weights("ghostnet_100", "in1k", top1=73.958, top5=91.542, **_HUAWEI),)),
    "ghostnetv2_100": (1.0, "v2", (timm_weights("ghostnetv2_100", "in1k", top1=75.186, top5=92.334, **_HUAWEI),)),
    "ghostnetv2_130": (1.3, "v2", (timm_weights("ghostnetv2_130", "in1k", top1=76.746, top5=93.364, **_HUAWEI),)),
    "ghostnetv2_160": (1.6, "v2", (timm_weights("ghostnetv2_160", "in1k", top1=77.836, top5=93.948, **_HUAWEI),)),
    "ghostnetv3_100": (1.0, "v3", (timm_weights("ghostnetv3_100", "in1k", top1=76.936, top5=93.124, **_HUAWEI),)),
}
# GhostNetV2 and V3: DFC attention from the third bottleneck on (timm's `layer_idx > 1`); V3: three conv branches
_VERSIONS = {"v1": dict(dfc_from=None, branches=0), "v2": dict(dfc_from=2, branches=0),
             "v3": dict(dfc_from=2, branches=3)}
_PAPERS = {"v1": "arXiv:1911.11907 Table 1", "v2": "arXiv:2211.12905 (GhostNet's Table 1 with DFC attention)",
           "v3": "arXiv:2404.11202 (GhostNet's Table 1, re-parameterizable)"}


def _build(width: float, version: str, **overrides) -> GhostNet:
    v = _VERSIONS[version]
    stem_chs, stages = resolve(GHOSTNET, width, v["dfc_from"])
    return GhostNet(**{**dict(stages=stages, stem_chs=stem_chs, num_conv_branches=v["branches"]), **overrides})


for _name, (_width, _version, _weights) in VARIANTS.items():
    _stem, _stages = resolve(GHOSTNET, _width, _VERSIONS[_version]["dfc_from"])
    register_model(
        ModelCfg(
            name=_name, family="ghostnet", input_size=(224, 224), interpolation="bicubic", crop_pct=0.875,
            first_conv="stem/conv", classifier="head/fc", feature_info=feature_info(_stem, _stages),
            paper=_PAPERS[_version], twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _width, _version))
