"""RegNetX and RegNetY (Radosavovic et al., "Designing Network Design Spaces", arXiv:2003.13678), the 200MF-1.6GF
models as timm (`timm/models/regnet.py`) and torchvision (`torchvision.models.regnet`) build them.

A RegNet is given by five numbers of the paper (Sec. 3.3; its appendix figures of the top REGNETX/REGNETY models give
them per model, as pycls's model zoo releases them): initial width w0, slope wa, multiplier wm, depth d and group
width g; RegNetY is RegNetX with squeeze-excite. The per-block widths follow the
paper's quantized linear rule (`block_widths`), consecutive equal widths form a stage (four here), and each stage's
width is rounded to a multiple of its group width (`stage_specs`). That last rounding is where the two sources
differ: the original pycls code (timm) rounds to the nearest multiple, torchvision never rounds down by more than 10%
(`regnet_x_400mf` and `regnet_y_800mf` then have wider stages than timm's `regnetx_004` and `regnety_008`; for the
other models here both agree).

The network: a 3x3/2 conv stem (32 channels), four stages of residual bottlenecks (1x1 -> grouped 3x3, stride 2 in a
stage's first block -> [SE] -> 1x1, added to the identity or a 1x1 projection, then ReLU), global average pooling and
a linear classifier. Parameter names mirror timm's modules (`stem/conv`, `stages_1/block_0/conv2/bn`,
`stages_2/block_3/se/conv_reduce`, `stages_0/block_0/downsample/conv`, `head/fc`), with stages and blocks counted
from 0 as in every zoo family (timm: `s2.b1`); torchvision's `trunk_output.block{i}.block{i}-{j}.f.{a,b,se,c}` keys
map onto the same names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from zoo.config import FeatureInfo, ModelCfg
from zoo.inputs import check_images
from zoo.layers.blocks import ConvNormAct, SqueezeExcite, drop_path
from zoo.layers.blocks import Stage as BlockStage
from zoo.layers.norm import BN_EPS_TORCH
from zoo.models._pretrained import timm_weights, torchvision_weights
from zoo.models.backbone import feature_dict, layer_factories, stage_feature_info
from zoo.models.heads import ClassifierHead
from zoo.models.mobilenet_base import make_divisible
from zoo.registry import register_model


@dataclass(frozen=True)
class RegNetParams:
    """The paper's parameters of one model (arXiv:2003.13678, appendix; pycls's model zoo).

    w0: initial width; wa: width slope; wm: width multiplier (one stage per power of wm); depth: blocks in all;
    group_w: channels per group of the 3x3 conv; se: RegNetY's squeeze-excite (reduced to 1/4 of a block's input).
    """

    w0: int
    wa: float
    wm: float
    depth: int
    group_w: int
    se: bool = False


# arXiv:2003.13678, the appendix's top REGNETX/REGNETY models (the names count multiply-adds at 224x224: 002 = 200M).
REGNETX_002 = RegNetParams(w0=24, wa=36.44, wm=2.49, depth=13, group_w=8)
REGNETX_004 = RegNetParams(w0=24, wa=24.48, wm=2.54, depth=22, group_w=16)
REGNETX_006 = RegNetParams(w0=48, wa=36.97, wm=2.24, depth=16, group_w=24)
REGNETX_008 = RegNetParams(w0=56, wa=35.73, wm=2.28, depth=16, group_w=16)
REGNETX_016 = RegNetParams(w0=80, wa=34.01, wm=2.25, depth=18, group_w=24)
REGNETY_002 = RegNetParams(w0=24, wa=36.44, wm=2.49, depth=13, group_w=8, se=True)
REGNETY_004 = RegNetParams(w0=48, wa=27.89, wm=2.09, depth=16, group_w=8, se=True)
REGNETY_006 = RegNetParams(w0=48, wa=32.54, wm=2.32, depth=15, group_w=16, se=True)
REGNETY_008 = RegNetParams(w0=56, wa=38.84, wm=2.4, depth=14, group_w=16, se=True)
REGNETY_016 = RegNetParams(w0=48, wa=20.71, wm=2.65, depth=27, group_w=24, se=True)

STEM_CHS = 32  # the paper's fixed stem (Sec. 3.1)
SE_RATIO = 0.25  # RegNetY's SE width relative to the block's input width
WIDTH_QUANTUM = 8  # block widths are multiples of 8 (Sec. 3.3)


def block_widths(p: RegNetParams, quantum: int = WIDTH_QUANTUM) -> list[int]:
    """The quantized linear rule of Sec. 3.3: u_j = w0 + wa*j for block j, s_j = round(log(u_j / w0) / log(wm)),
    w_j = w0 * wm^s_j rounded to a multiple of `quantum`.

    Computed in float32 with round-half-to-even, the arithmetic of both reference implementations, so a value that
    lands on a rounding boundary goes the same way as theirs.
    """
    if p.wa < 0 or p.w0 <= 0 or p.wm <= 1 or p.w0 % quantum:
        raise ValueError(f"invalid RegNet parameters {p}: need wa >= 0, w0 > 0 a multiple of {quantum}, wm > 1")
    f32 = np.float32
    u = np.arange(p.depth, dtype=f32) * f32(p.wa) + f32(p.w0)
    s = np.round(np.log(u / f32(p.w0)) / f32(np.log(p.wm)))
    w = np.round(f32(p.w0) * np.power(f32(p.wm), s) / f32(quantum)) * f32(quantum)
    return [int(v) for v in w]


@dataclass(frozen=True)
class StageSpec:
    """One stage after rounding: `depth` blocks of width `out_chs`, 3x3 conv groups of `group_w` channels."""

    out_chs: int
    depth: int
    group_w: int


def stage_specs(p: RegNetParams, rounding: str) -> tuple[StageSpec, ...]:
    """Stages of equal block width, each width made a multiple of its group width (the group width capped at the
    stage width). `rounding`: "pycls" (nearest multiple; timm) or "torchvision" (never 10% below; torchvision)."""
    if rounding not in ("pycls", "torchvision"):
        raise ValueError(f"rounding must be 'pycls' or 'torchvision', got {rounding!r}")
    widths, depths = [], []
    for w in block_widths(p):
        if widths and widths[-1] == w:
            depths[-1] += 1
        else:
            widths.append(w)
            depths.append(1)
    specs = []
    for w, d in zip(widths, depths):
        g = min(p.group_w, w)
        w = int(round(w / g) * g) if rounding == "pycls" else make_divisible(w, g)
        specs.append(StageSpec(w, d, g))
    return tuple(specs)


@dataclass(frozen=True)
class BlockCfg:
    """One resolved bottleneck block."""

    out_chs: int
    stride: int
    groups: int
    se_chs: int


def resolve_blocks(spec: StageSpec, in_chs: int, se: bool) -> tuple[BlockCfg, ...]:
    blocks = []
    for j in range(spec.depth):
        se_chs = int(round(in_chs * SE_RATIO)) if se else 0  # relative to the block's input width
        blocks.append(BlockCfg(spec.out_chs, 2 if j == 0 else 1, spec.out_chs // spec.group_w, se_chs))
        in_chs = spec.out_chs
    return tuple(blocks)


def feature_info(stages: tuple[StageSpec, ...]) -> tuple[FeatureInfo, ...]:
    """The stem (stride 2) and the four stages (strides 4-32): every stage starts with a stride-2 block."""
    return stage_feature_info(STEM_CHS, [2] * len(stages), [s.out_chs for s in stages])


class Bottleneck(nn.Module):
    """1x1 -> BN -> ReLU -> grouped 3x3 (stride) -> BN -> ReLU -> [SE] -> 1x1 -> BN, + shortcut, ReLU.

    The shortcut is the identity, or a 1x1 conv + BN (`downsample`) where width or resolution changes.
    """

    out_chs: int
    conv: Any
    norm: Any
    stride: int = 1
    groups: int = 1
    se_chs: int = 0
    act: str = "relu"
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        cna = partial(ConvNormAct, conv=self.conv, norm=self.norm)
        shortcut = x
        if x.shape[-1] != self.out_chs or self.stride != 1:
            shortcut = cna(self.out_chs, kernel=1, stride=self.stride, act=None, name="downsample")(x, train)
        x = cna(self.out_chs, kernel=1, act=self.act, name="conv1")(x, train)
        x = cna(self.out_chs, kernel=3, stride=self.stride, groups=self.groups, act=self.act, name="conv2")(x, train)
        if self.se_chs:
            x = SqueezeExcite(self.se_chs, self.conv, act=self.act, name="se")(x)
        x = cna(self.out_chs, kernel=1, act=None, name="conv3")(x, train)
        x = drop_path(x, self.drop_path_rate, train, self) + shortcut
        return nn.relu(x)


def make_block(b: BlockCfg, drop_path_rate: float, *, conv, norm, name: str) -> Bottleneck:
    return Bottleneck(b.out_chs, conv, norm, stride=b.stride, groups=b.groups, se_chs=b.se_chs,
                      drop_path_rate=drop_path_rate, name=name)


class RegNet(nn.Module):
    """Backbone (stem -> four stages of bottlenecks -> pool: `pre_logits`) + classifier (`ClassifierHead`: fc).
    `features=True`: the backbone's dict (`zoo.models.heads`)."""

    stages: tuple[StageSpec, ...]
    se: bool = False
    bn_eps: float = BN_EPS_TORCH
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); parameters stay float32
    # injected layer factories (None: the defaults; see `zoo.models.backbone.layer_factories`)
    conv: Any = None
    norm: Any = None
    dense: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        check_images(x, self.in_chans, "RegNet")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        x = ConvNormAct(STEM_CHS, conv, norm, kernel=3, stride=2, name="stem")(x, train)
        maps = [x]
        resolved, in_chs = [], STEM_CHS
        for s in self.stages:
            resolved.append(resolve_blocks(s, in_chs, self.se))
            in_chs = s.out_chs
        # stochastic depth grows linearly over all blocks (timm's RegNet)
        n_blocks = sum(len(b) for b in resolved)
        rates = [self.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        make, seen = partial(make_block, conv=conv, norm=norm), 0
        for i, blocks in enumerate(resolved):
            x = BlockStage(blocks, make, tuple(rates[seen:seen + len(blocks)]), name=f"stages_{i}")(x, train)
            seen += len(blocks)
            maps.append(x)
        feats = feature_dict([f.name for f in feature_info(self.stages)], maps,
                             jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return ClassifierHead(self.num_classes, self.drop_rate, dense, name="head")(feats, train)


def timm_rename(module: RegNet):
    """timm keys: `s{i}.b{j}.` (from 1) -> `stages_{i-1}/block_{j-1}/`, SE `fc1/fc2` -> `se/conv_reduce/conv_expand`;
    the rest 1:1 (`stem.conv`, `conv2.bn`, `downsample.conv`, `head.fc`)."""

    def rename(path: str) -> str | None:
        path = re.sub(r"^s(\d+)\.b(\d+)\.", lambda m: f"stages_{int(m[1]) - 1}/block_{int(m[2]) - 1}/", path)
        path = re.sub(r"(^|/)se\.fc1$", r"\1se/conv_reduce", path)
        path = re.sub(r"(^|/)se\.fc2$", r"\1se/conv_expand", path)
        return path.replace(".", "/")

    return rename


# torchvision's block layers (`f.a` ...) and their zoo names; `.0` is a layer's conv, `.1` its BatchNorm
_TV_LAYERS = {"f.a": "conv1", "f.b": "conv2", "f.c": "conv3", "proj": "downsample"}


def torchvision_rename(module: RegNet):
    """torchvision keys: `stem.{0,1}`, `trunk_output.block{i}.block{i}-{j}.` (stage from 1, block from 0) with
    `f.{a,b,c}.{0,1}`, `f.se.fc{1,2}` and the projection `proj.{0,1}`, then `fc`."""

    def rename(path: str) -> str | None:
        if path == "fc":
            return "head/fc"
        if path.startswith("stem."):
            return "stem/" + {"0": "conv", "1": "bn"}[path[5:]]
        m = re.fullmatch(r"trunk_output\.block(\d+)\.block\d+-(\d+)\.(.+)", path)
        if m is None:
            return path.replace(".", "/")  # left unmapped: the strict merge names it
        prefix, rest = f"stages_{int(m[1]) - 1}/block_{m[2]}/", m[3]
        if rest.startswith("f.se."):
            return prefix + {"fc1": "se/conv_reduce", "fc2": "se/conv_expand"}[rest[5:]]
        layer, _, idx = rest.rpartition(".")
        return prefix + _TV_LAYERS[layer] + "/" + {"0": "conv", "1": "bn"}[idx]

    return rename


_CONVERTERS = {"timm": timm_rename, "torchvision": torchvision_rename}
_TV = "https://download.pytorch.org/models/"
# pycls weights (facebookresearch/pycls) as re-published by timm; top-1/top-5: timm's results-imagenet.csv.
_PYCLS = dict(license="mit", origin="https://github.com/facebookresearch/pycls")
# torchvision's IMAGENET1K_V2 files as timm publishes them (`tv2_in1k`): timm's crop and its bicubic resize.
_TV2 = dict(license="bsd-3-clause", origin="https://github.com/pytorch/vision", crop_pct=0.965)


def _pycls(name: str, top1: float, top5: float):
    return timm_weights(name, "pycls_in1k", top1=top1, top5=top5, **_PYCLS)


def _tv2(name: str, url: str, top1: float, top5: float):
    return timm_weights(name, "tv2_in1k", _TV + url, top1=top1, top5=top5, **_TV2)


# name: (paper parameters, pretrained weights)
VARIANTS = {
    "regnetx_002": (REGNETX_002, (_pycls("regnetx_002", 68.758, 88.568),)),
    "regnetx_004": (REGNETX_004, (_pycls("regnetx_004", 72.482, 90.84),)),
    "regnetx_006": (REGNETX_006, (_pycls("regnetx_006", 73.904, 91.64),)),
    "regnetx_008": (REGNETX_008, (_pycls("regnetx_008", 75.054, 92.338),
                                  _tv2("regnetx_008", "regnet_x_800mf-94a99ebd.pth", 77.294, 93.664))),
    "regnetx_016": (REGNETX_016, (_pycls("regnetx_016", 76.936, 93.432),
                                  _tv2("regnetx_016", "regnet_x_1_6gf-a12f2b72.pth", 79.44, 94.768))),
    "regnety_002": (REGNETY_002, (_pycls("regnety_002", 70.288, 89.544),)),
    "regnety_004": (REGNETY_004, (_pycls("regnety_004", 74.004, 91.756),
                                  _tv2("regnety_004", "regnet_y_400mf-e6988f5f.pth", 75.594, 92.706))),
    "regnety_006": (REGNETY_006, (_pycls("regnety_006", 75.274, 92.532),)),
    "regnety_008": (REGNETY_008, (_pycls("regnety_008", 76.334, 93.06),)),
    "regnety_016": (REGNETY_016, (_pycls("regnety_016", 77.88, 93.726),
                                  _tv2("regnety_016", "regnet_y_1_6gf-0d7bc02a.pth", 80.668, 95.336))),
}


def _tv(v1: str, v1_acc: tuple[float, float], v2: str, v2_acc: tuple[float, float]):
    """torchvision's IMAGENET1K_V1 (resize 256, crop 224) and IMAGENET1K_V2 (resize 232, crop 224) weights."""
    return (torchvision_weights("imagenet1k_v1", _TV + v1, top1=v1_acc[0], top5=v1_acc[1]),
            torchvision_weights("imagenet1k_v2", _TV + v2, top1=v2_acc[0], top5=v2_acc[1], crop_pct=0.9655))


TORCHVISION = {
    "regnet_x_400mf": (REGNETX_004, _tv("regnet_x_400mf-adf1edd5.pth", (72.834, 90.95),
                                        "regnet_x_400mf-62229a5f.pth", (74.864, 92.322))),
    "regnet_y_400mf": (REGNETY_004, _tv("regnet_y_400mf-c65dace8.pth", (74.046, 91.716),
                                        "regnet_y_400mf-e6988f5f.pth", (75.804, 92.742))),
    "regnet_x_800mf": (REGNETX_008, _tv("regnet_x_800mf-ad17e45c.pth", (75.212, 92.348),
                                        "regnet_x_800mf-94a99ebd.pth", (77.522, 93.826))),
    "regnet_y_800mf": (REGNETY_008, _tv("regnet_y_800mf-1b27b58c.pth", (76.42, 93.136),
                                        "regnet_y_800mf-58fc7688.pth", (78.828, 94.502))),
    "regnet_x_1_6gf": (REGNETX_016, _tv("regnet_x_1_6gf-e3633e7f.pth", (77.04, 93.44),
                                        "regnet_x_1_6gf-a12f2b72.pth", (79.668, 94.922))),
    "regnet_y_1_6gf": (REGNETY_016, _tv("regnet_y_1_6gf-b11a554e.pth", (77.95, 93.966),
                                        "regnet_y_1_6gf-0d7bc02a.pth", (80.876, 95.444))),
}


def _build(p: RegNetParams, rounding: str, **overrides) -> RegNet:
    return RegNet(**{**dict(stages=stage_specs(p, rounding), se=p.se), **overrides})


def _cfg(name: str, p: RegNetParams, rounding: str, twin: str, **fields) -> ModelCfg:
    return ModelCfg(name=name, family="regnet", feature_info=feature_info(stage_specs(p, rounding)),
                    paper="arXiv:2003.13678 Sec. 3.3 (width rule), appendix (top REGNETX/REGNETY models)", twin=twin, **fields)


# timm's names read both layouts: the `tv2_in1k` tags' release files are torchvision's own checkpoints.
for _name, (_p, _weights) in VARIANTS.items():
    register_model(_cfg(_name, _p, "pycls", f"timm:{_name}"), _weights, converters=_CONVERTERS)(
        partial(_build, _p, "pycls"))

for _name, (_p, _weights) in TORCHVISION.items():
    register_model(_cfg(_name, _p, "torchvision", f"torchvision:{_name}", interpolation="bilinear"), _weights,
                   converters=_CONVERTERS)(partial(_build, _p, "torchvision"))
