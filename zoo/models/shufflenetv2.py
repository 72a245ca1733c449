"""ShuffleNetV2 (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design",
arXiv:1807.11164), the x0.5-x2.0 models as torchvision builds them (`torchvision.models.shufflenetv2`).

A 3x3/2 conv and a 3x3/2 max-pool stem, three stages of units, a 1x1 conv, global average pooling and a linear
classifier. A unit of stride 1 splits its channels in halves, keeps one and passes the other through 1x1 -> depthwise
3x3 -> 1x1; a unit of stride 2 (each stage's first) feeds the whole input to two branches (depthwise 3x3/2 -> 1x1, and
1x1 -> depthwise 3x3/2 -> 1x1), so the width doubles. Either way the two halves are concatenated and shuffled
(`channel_shuffle`: a reshape, a transpose and a reshape, which TFLite runs as RESHAPE and TRANSPOSE).

Parameter names: `stem/conv`, `stages_0/block_0/branch1_dw/bn`, `stages_1/block_3/branch2_pw1/conv`,
`final_conv/conv`, `head/fc`; stages and blocks count from 0 (torchvision: `stage2.0`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.config import FeatureInfo, ModelCfg
from zoo.inputs import check_images
from zoo.layers.blocks import ConvNormAct
from zoo.layers.blocks import Stage as BlockStage
from zoo.layers.norm import BN_EPS_TORCH
from zoo.models._pretrained import torchvision_weights
from zoo.models.backbone import feature_dict, layer_factories
from zoo.models.heads import ClassifierHead
from zoo.registry import register_model


@dataclass(frozen=True)
class Widths:
    """One column of the paper's Table 5: the stem, the three stages and the final 1x1 conv's output channels."""

    stem: int
    stages: tuple[int, int, int]
    final: int


# arXiv:1807.11164 Table 5, 224x224 input: stage 2 (28x28 out) 4 units, stage 3 (14x14) 8, stage 4 (7x7) 4.
REPEATS = (4, 8, 4)
X0_5 = Widths(stem=24, stages=(48, 96, 192), final=1024)
X1_0 = Widths(stem=24, stages=(116, 232, 464), final=1024)
X1_5 = Widths(stem=24, stages=(176, 352, 704), final=1024)
X2_0 = Widths(stem=24, stages=(244, 488, 976), final=2048)


def channel_shuffle(x, groups: int):
    """Interleave `groups` channel groups of an NHWC map (group g's channel k goes to k * groups + g).

    A reshape to (..., groups, C / groups), a transpose of the last two axes and a reshape back: ops every converter
    maps to its own reshape and transpose (no gather)."""
    *lead, c = x.shape
    if c % groups:
        raise ValueError(f"channel_shuffle: {c} channels do not split into {groups} groups")
    x = x.reshape(*lead, groups, c // groups)
    x = jnp.swapaxes(x, -1, -2)
    return x.reshape(*lead, c)


class ShuffleUnit(nn.Module):
    """One ShuffleNetV2 unit (the paper's Fig. 3 (c) for stride 1, (d) for stride 2), concatenated and shuffled."""

    out_chs: int
    conv: Any
    norm: Any
    stride: int = 1
    act: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_chs, half = x.shape[-1], self.out_chs // 2
        if self.out_chs % 2:
            raise ValueError(f"ShuffleUnit: output width {self.out_chs} is not even")
        if self.stride == 1 and in_chs != self.out_chs:
            raise ValueError(f"ShuffleUnit: a stride-1 unit keeps its width; got {in_chs} -> {self.out_chs}")
        cna = partial(ConvNormAct, conv=self.conv, norm=self.norm)
        if self.stride == 1:
            kept, x = x[..., :half], x[..., half:]
        else:
            kept = cna(in_chs, kernel=3, stride=self.stride, groups=in_chs, act=None, name="branch1_dw")(x, train)
            kept = cna(half, kernel=1, act=self.act, name="branch1_pw")(kept, train)
        x = cna(half, kernel=1, act=self.act, name="branch2_pw1")(x, train)
        x = cna(half, kernel=3, stride=self.stride, groups=half, act=None, name="branch2_dw")(x, train)
        x = cna(half, kernel=1, act=self.act, name="branch2_pw2")(x, train)
        return channel_shuffle(jnp.concatenate([kept, x], axis=-1), 2)


def feature_info(widths: Widths) -> tuple[FeatureInfo, ...]:
    """The stem conv (stride 2), its max-pool (4) and the three stages (8-32)."""
    return (FeatureInfo("stem", 2, widths.stem), FeatureInfo("stem_pool", 4, widths.stem),
            *(FeatureInfo(f"stages_{i}", 8 << i, c) for i, c in enumerate(widths.stages)))


def make_unit(spec: tuple[int, int], drop_path_rate: float, *, conv, norm, name: str) -> ShuffleUnit:
    del drop_path_rate  # the units have no residual branch to drop
    out_chs, stride = spec
    return ShuffleUnit(out_chs, conv, norm, stride=stride, name=name)


class ShuffleNetV2(nn.Module):
    """Backbone (stem conv -> max-pool -> three stages -> 1x1 `final_conv` -> pool: `pre_logits`) + classifier
    (`ClassifierHead`: fc). `features=True`: the backbone's dict (`zoo.models.heads`)."""

    widths: Widths
    repeats: tuple[int, ...] = REPEATS
    bn_eps: float = BN_EPS_TORCH
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); parameters stay float32
    # injected layer factories (None: the defaults; see `zoo.models.backbone.layer_factories`)
    conv: Any = None
    norm: Any = None
    dense: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        check_images(x, self.in_chans, "ShuffleNetV2")
        if len(self.repeats) != len(self.widths.stages):
            raise ValueError(f"ShuffleNetV2: {len(self.repeats)} repeats for {len(self.widths.stages)} stages")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        x = ConvNormAct(self.widths.stem, conv, norm, kernel=3, stride=2, name="stem")(x, train)
        maps = [x]
        # zero padding equals -inf padding after the ReLU, and exports as PAD + MAX_POOL_2D (XNNPACK runs both; a
        # -inf pad is a PADV2 it does not)
        x = nn.max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), (3, 3), strides=(2, 2))
        maps.append(x)
        make = partial(make_unit, conv=conv, norm=norm)
        for i, (n, c) in enumerate(zip(self.repeats, self.widths.stages)):
            units = tuple((c, 2 if j == 0 else 1) for j in range(n))
            x = BlockStage(units, make, (0.0,) * n, name=f"stages_{i}")(x, train)
            maps.append(x)
        x = ConvNormAct(self.widths.final, conv, norm, kernel=1, name="final_conv")(x, train)
        feats = feature_dict([f.name for f in feature_info(self.widths)], maps,
                             jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return ClassifierHead(self.num_classes, self.drop_rate, dense, name="head")(feats, train)


# torchvision's Sequential indices inside a unit's branches: (conv, bn) pairs -> the zoo's layer names
_BRANCH1 = {"0": "branch1_dw/conv", "1": "branch1_dw/bn", "2": "branch1_pw/conv", "3": "branch1_pw/bn"}
_BRANCH2 = {"0": "branch2_pw1/conv", "1": "branch2_pw1/bn", "3": "branch2_dw/conv", "4": "branch2_dw/bn",
            "5": "branch2_pw2/conv", "6": "branch2_pw2/bn"}


def torchvision_rename(module: ShuffleNetV2):
    """torchvision keys: `conv1.{0,1}`, `stage{2,3,4}.{j}.branch{1,2}.{k}`, `conv5.{0,1}`, `fc`."""
    fixed = {"conv1.0": "stem/conv", "conv1.1": "stem/bn", "conv5.0": "final_conv/conv", "conv5.1": "final_conv/bn",
             "fc": "head/fc"}

    def rename(path: str) -> str | None:
        if path in fixed:
            return fixed[path]
        m = re.fullmatch(r"stage(\d)\.(\d+)\.branch([12])\.(\d+)", path)
        if m is None:
            return path.replace(".", "/")  # left unmapped: the strict merge names it
        layers = _BRANCH1 if m[3] == "1" else _BRANCH2
        return f"stages_{int(m[1]) - 2}/block_{m[2]}/" + layers.get(m[4], f"unknown_{m[4]}")

    return rename


_TV = "https://download.pytorch.org/models/"

# name: (widths, torchvision's IMAGENET1K_V1 weights). x0.5 and x1.0: ported from ericsun99/Shufflenet-v2-Pytorch
# (resize 256, crop 224); x1.5 and x2.0: torchvision's own recipe (resize 232, crop 224).
TORCHVISION = {
    "shufflenet_v2_x0_5": (X0_5, torchvision_weights("imagenet1k_v1", _TV + "shufflenetv2_x0.5-f707e7126e.pth",
                                                     top1=60.552, top5=81.746)),
    "shufflenet_v2_x1_0": (X1_0, torchvision_weights("imagenet1k_v1", _TV + "shufflenetv2_x1-5666bf0f80.pth",
                                                     top1=69.362, top5=88.316)),
    "shufflenet_v2_x1_5": (X1_5, torchvision_weights("imagenet1k_v1", _TV + "shufflenetv2_x1_5-3c479a10.pth",
                                                     top1=72.996, top5=91.086, crop_pct=0.9655)),
    "shufflenet_v2_x2_0": (X2_0, torchvision_weights("imagenet1k_v1", _TV + "shufflenetv2_x2_0-8be3c8ee.pth",
                                                     top1=76.23, top5=93.006, crop_pct=0.9655)),
}


def _build(widths: Widths, **overrides) -> ShuffleNetV2:
    return ShuffleNetV2(**{**dict(widths=widths), **overrides})


for _name, (_widths, _weights) in TORCHVISION.items():
    register_model(
        ModelCfg(name=_name, family="shufflenetv2", interpolation="bilinear", crop_pct=_weights.crop_pct or 0.875,
                 feature_info=feature_info(_widths), paper="arXiv:1807.11164 Table 5", twin=f"torchvision:{_name}"),
        (_weights,),
        converters={"torchvision": torchvision_rename},
    )(partial(_build, _widths))
