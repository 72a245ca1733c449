"""The network shared by MobileNetV2, MobileNetV3 and EfficientNet(-Lite): stem, stages of blocks, head.

Family files describe their variants as tables of `BlockSpec` (one tuple per stage, as in the papers' tables) and call
`resolve_stages` with their width/depth multipliers; the result is a tuple of concrete per-block configs that
`MobileNet` turns into modules. Rounding follows timm's EfficientNet builder exactly, so parameter counts match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from zoo.config import FeatureInfo
from zoo.inputs import check_images
from zoo.layers.activations import get_act
from zoo.layers.blocks import ConvBnAct, DepthwiseSeparable, InvertedResidual
from zoo.layers.conv import Conv2d
from zoo.layers.norm import batch_norm
from zoo.models.heads import classify, feature_dict


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round to the nearest multiple of `divisor`, never dropping more than 10% (the TF MobileNet rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True)
class BlockSpec:
    """One row of a stage table: `repeat` blocks of `kind` ('ds', 'ir' or 'cn')."""

    kind: Literal["ds", "ir", "cn"]
    repeat: int
    kernel: int
    stride: int
    out_chs: int
    exp_ratio: float = 1.0
    se_ratio: float = 0.0
    act: str | None = None  # per-block override of the network activation (e.g. ReLU in MobileNetV3's early stages)


def ds(r, k, s, c, se=0.0, act=None):
    return BlockSpec("ds", r, k, s, c, 1.0, se, act)


def ir(r, k, s, e, c, se=0.0, act=None):
    return BlockSpec("ir", r, k, s, c, e, se, act)


def cn(r, k, s, c, act=None):
    return BlockSpec("cn", r, k, s, c, act=act)


@dataclass(frozen=True)
class Block:
    """A concrete block: channels rounded, stride applied to the first block of a stage only."""

    kind: str
    in_chs: int
    out_chs: int
    mid_chs: int
    kernel: int
    stride: int
    act: str
    se_chs: int


def _scale_depth(specs: tuple[BlockSpec, ...], multiplier: float) -> list[BlockSpec]:
    """Scale the repeats of one stage (EfficientNet's ceil rule, distributed over rows from the last)."""
    repeats = [s.repeat for s in specs]
    total = sum(repeats)
    scaled_total = int(math.ceil(total * multiplier))
    scaled = []
    for r in repeats[::-1]:
        rs = max(1, round(r / total * scaled_total))
        scaled.append(rs)
        total -= r
        scaled_total -= rs
    return [replace(s, repeat=1) for s, n in zip(specs, scaled[::-1]) for _ in range(n)]


def resolve_stages(
    table: tuple[tuple[BlockSpec, ...], ...],
    *,
    stem_chs: int,
    act: str,
    width: float = 1.0,
    depth: float = 1.0,
    fix_first_last: bool = False,
    se_from_exp: bool = False,
    se_round: Literal["round", "divisible"] = "round",
) -> tuple[tuple[Block, ...], ...]:
    """Expand a stage table into concrete blocks (timm's `decode_arch_def` + `EfficientNetBuilder` semantics)."""
    in_chs = stem_chs
    stages = []
    for i, specs in enumerate(table):
        fixed = fix_first_last and i in (0, len(table) - 1)
        blocks = []
        for j, spec in enumerate(_scale_depth(specs, 1.0 if fixed else depth)):
            out_chs = make_divisible(spec.out_chs * width)
            mid_chs = make_divisible(in_chs * spec.exp_ratio) if spec.kind == "ir" else in_chs
            se_chs = 0
            if spec.se_ratio:
                ratio = spec.se_ratio if se_from_exp else spec.se_ratio / spec.exp_ratio
                rd = mid_chs * ratio
                se_chs = make_divisible(rd) if se_round == "divisible" else round(rd)
            blocks.append(
                Block(spec.kind, in_chs, out_chs, mid_chs, spec.kernel, spec.stride if j == 0 else 1,
                      spec.act or act, se_chs)
            )
            in_chs = out_chs
        stages.append(tuple(blocks))
    return tuple(stages)


def feature_info(stages: tuple[tuple[Block, ...], ...], stem_stride: int = 2) -> tuple[FeatureInfo, ...]:
    """The last stage output at each stride: what detection/segmentation heads take (timm's feature_info)."""
    infos, stride = [], stem_stride
    if stages[0][0].stride > 1:  # the stem's output is the only stride-2 map (MobileNetV3-Small)
        infos.append(FeatureInfo("stem", stem_stride, stages[0][0].in_chs))
    for i, blocks in enumerate(stages):
        stride *= blocks[0].stride
        nxt = stages[i + 1][0].stride if i + 1 < len(stages) else 2
        if nxt > 1:
            infos.append(FeatureInfo(f"stages_{i}", stride, blocks[-1].out_chs))
    return tuple(infos)


class Stage(nn.Module):
    blocks: tuple[Block, ...]
    conv: Any
    norm: Any
    se_act: str
    se_gate: str
    drop_path_rates: tuple[float, ...]

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j, (b, dpr) in enumerate(zip(self.blocks, self.drop_path_rates)):
            common = dict(conv=self.conv, norm=self.norm, kernel=b.kernel, stride=b.stride, act=b.act, name=f"block_{j}")
            if b.kind == "cn":
                x = ConvBnAct(b.out_chs, **common)(x, train)
                continue
            se = dict(se_chs=b.se_chs, se_act=self.se_act, se_gate=self.se_gate, drop_path_rate=dpr)
            if b.kind == "ds":
                x = DepthwiseSeparable(b.out_chs, **common, **se)(x, train)
            else:
                x = InvertedResidual(b.out_chs, b.mid_chs, **common, **se)(x, train)
        return x


class MobileNetHead(nn.Module):
    """The family's pre-logits layers and classifier under one scope `head` (`head/conv`, `head/bn`, `head/fc`: the
    names timm's and torchvision's checkpoints map to), called twice: on the last map with `pre_logits=True` (the
    backbone's `pre_logits`), then on the backbone's dict for the logits.

    head_type "efficientnet": 1x1 conv + BN + act, then global pool (MobileNetV2, EfficientNet).
    head_type "mobilenetv3": global pool, then 1x1 conv with bias + act, no BN (MobileNetV3).
    """

    num_features: int
    num_classes: int
    head_type: str
    act: str
    conv: Any
    norm: Any
    dense: Any = nn.Dense
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        if pre_logits:
            act = get_act(self.act)
            if self.head_type == "efficientnet":
                x = self.conv(self.num_features, 1, name="conv")(x)
                x = act(self.norm(use_running_average=not train, name="bn")(x))
                x = jnp.mean(x, axis=(1, 2), keepdims=True)
            else:
                x = jnp.mean(x, axis=(1, 2), keepdims=True)
                x = act(self.conv(self.num_features, 1, use_bias=True, name="conv")(x))
            return x.reshape(x.shape[0], -1)
        return classify(x, self.num_classes, self.drop_rate, self.dense, train)  # `head/fc`


class MobileNet(nn.Module):
    """Backbone (stem conv -> stages -> pre-logits conv and pool) + classifier (`MobileNetHead`).

    `features=True`: the backbone's dict (`feature_info` names and `pre_logits`, see `zoo.models.heads`).
    `num_classes=0` returns the pre-logits.
    """

    stages: tuple[tuple[Block, ...], ...]
    stem_chs: int
    num_features: int
    head_type: Literal["efficientnet", "mobilenetv3"]
    act: str
    se_act: str = "relu"
    se_gate: str = "sigmoid"
    padding: str = "symmetric"  # "same" for weights ported from TensorFlow
    bn_eps: float = 1e-5
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); parameters stay float32

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        check_images(x, self.in_chans, type(self).__name__)
        conv = partial(Conv2d, padding=self.padding, dtype=self.dtype)
        norm = partial(batch_norm(self.bn_eps), dtype=self.dtype)
        x = ConvBnAct(self.stem_chs, conv, norm, kernel=3, stride=2, act=self.act, name="stem")(x, train)
        n_blocks = sum(len(s) for s in self.stages)
        names = [f.name for f in feature_info(self.stages)]
        seen, maps = 0, [x] if "stem" in names else []
        for i, blocks in enumerate(self.stages):
            # stochastic depth grows linearly with block index (EfficientNet)
            rates = tuple(self.drop_path_rate * (seen + j) / n_blocks for j in range(len(blocks)))
            seen += len(blocks)
            x = Stage(blocks, conv, norm, self.se_act, self.se_gate, rates, name=f"stages_{i}")(x, train)
            if f"stages_{i}" in names:
                maps.append(x)
        head = MobileNetHead(self.num_features, self.num_classes, self.head_type, self.act, conv, norm,
                             partial(nn.Dense, dtype=self.dtype), self.drop_rate, name="head")
        feats = feature_dict(names, maps, head(x, train, pre_logits=True))
        if features:
            return feats
        return head(feats, train)
