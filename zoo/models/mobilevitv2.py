"""MobileViTv2 (Mehta & Rastegari, "Separable Self-attention for Mobile Vision Transformers", arXiv:2206.02680),
width multipliers 0.5-2.0 as timm builds them (`timm/models/mobilevit.py`, `mobilevitv2_*`).

The layout is MobileViT v1's (`zoo.models.mobilevit`): a 3x3/2 stem, two stages of MobileNetV2 inverted residuals
(`zoo.layers.blocks.InvertedResidual`, expansion 2 of the input width), then three stages of one strided inverted
residual and one MobileViTv2 block. The block differs from v1's: a depthwise 3x3 conv+BN+SiLU and a 1x1 conv to the
transformer width (half the block width), unfold into 2x2 patches (`zoo.layers.patches`), `depth` transformer layers
of separable linear attention (`zoo.layers.linear_attention`: a single context score per patch, softmax over the
patches, no N x N matrix), a final GroupNorm, fold, and a 1x1 conv+BN back to the block width; no fusion with the
block input, no shortcut. Every norm inside the transformer is timm's GroupNorm1 (one group, eps 1e-5), computed on the
4-D (B, P, N, C) tensor (`GroupNorm1` of `zoo.layers.single_head_attention`; flax's 5-D form exported to BROADCAST_TO
ops that split the XNNPACK graph). There is no 1x1 expansion before the pool: `pre_logits` is the last stage pooled.

The width multiplier scales every stage width and the stem (`int(width * multiplier)`, timm's rule); expansion and
transformer widths follow by `make_divisible`. A map whose size is not a multiple of the patch size is resized up to
the next multiple (bilinear, corners aligned, `zoo.layers.resize_aligned`) at the block's input and stays that size,
as timm does: at 224x224 the last stage runs on 8x8, not 7x7.

The deploy form is `compress.deploy`'s BatchNorm folding (every BatchNorm follows a conv); the GroupNorms stay.

Parameter names mirror timm's module names (`stem/conv`, `stages_2/block_1/conv_kxk/bn`,
`stages_2/block_1/transformer_0/attn/qkv_proj`, `stages_4/block_1/norm`, `head/fc`), the inverted residuals carry the
block library's names; the timm key map is MobileViT v1's (`zoo.models.mobilevit.timm_rename`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zoo.config import FeatureInfo, ModelCfg
from zoo.inputs import check_images
from zoo.layers.blocks import ConvNormAct, InvertedResidual
from zoo.layers.linear_attention import LinearTransformerBlock
from zoo.layers.norm import BN_EPS_TORCH
from zoo.layers.patches import fold, unfold
from zoo.layers.resize_aligned import resize_bilinear_aligned
from zoo.layers.single_head_attention import GroupNorm1
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import feature_dict, layer_factories, stage_feature_info
from zoo.models.heads import ClassifierHead
from zoo.models.mobilenet_base import make_divisible
from zoo.models.mobilevit import stem_and_stages, timm_rename
from zoo.registry import register_model

ModuleDef = Any


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One stage: `repeat` inverted residuals to width `out` (the first with `stride`), expanding their input width
    by `expand`; then, where `depth` > 0, one MobileViTv2 block whose transformer has `depth` layers of width
    `transformer_ratio` x `out` over `patch_size` patches, MLP ratio `mlp_ratio`."""

    out: int
    stride: int
    expand: float = 2.0
    repeat: int = 1
    kernel: int = 3
    depth: int = 0
    transformer_ratio: float = 0.5
    patch_size: int = 2
    mlp_ratio: float = 2.0


# The MobileViTv2 architecture of arXiv:2206.02680 (ml-cvnets' and timm's configuration) at width multiplier 1.0,
# 256x256 input
BASE = (
    StageSpec(out=64, stride=1),  # stage 0, 128x128 in
    StageSpec(out=128, stride=2, repeat=2),  # stage 1, 128x128 in
    StageSpec(out=256, stride=2, depth=2),  # stage 2, 64x64 in
    StageSpec(out=384, stride=2, depth=4),  # stage 3, 32x32 in
    StageSpec(out=512, stride=2, depth=3),  # stage 4, 16x16 in
)
BASE_STEM = 32

Stages = tuple[StageSpec, ...]


def scaled(multiplier: float, table: Stages = BASE) -> Stages:
    """The table at a width multiplier: every stage width truncated to int (timm's rule, not `make_divisible`)."""
    return tuple(replace(s, out=int(s.out * multiplier)) for s in table)


def stem_width(multiplier: float) -> int:
    return int(BASE_STEM * multiplier)


def transformer_width(spec: StageSpec) -> int:
    return make_divisible(spec.transformer_ratio * spec.out)


def feature_info(stages: Stages, stem_chs: int) -> tuple[FeatureInfo, ...]:
    """The last stage output at each stride (2-32); the stem shares stride 2 with stage 0 and is left out."""
    return stage_feature_info(stem_chs, [s.stride for s in stages], [s.out for s in stages])


class MobileViTV2Block(nn.Module):
    """[resize to a multiple of the patch] -> dw kxk conv+BN+act `conv_kxk` -> 1x1 `conv_1x1` to `transformer_dim` ->
    unfold -> `depth` separable-attention transformer layers -> GroupNorm `norm` -> fold -> 1x1 conv+BN `conv_proj`."""

    out_chs: int
    transformer_dim: int
    depth: int
    conv: ModuleDef
    norm: ModuleDef
    patch_size: int = 2
    mlp_ratio: float = 2.0
    kernel: int = 3
    act: str = "silu"
    drop_path_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, h, w, c = x.shape
        p = self.patch_size
        hp, wp = math.ceil(h / p) * p, math.ceil(w / p) * p
        x = resize_bilinear_aligned(x, (hp, wp))  # the identity at multiples of the patch
        x = ConvNormAct(c, self.conv, self.norm, self.kernel, groups=c, act=self.act, name="conv_kxk")(x, train)
        x = self.conv(self.transformer_dim, 1, name="conv_1x1")(x)
        n = (hp // p) * (wp // p)
        x = unfold(x, p).reshape(b, p * p, n, self.transformer_dim)  # (B, P, N, C): a map with H = P, W = N
        for k in range(self.depth):
            x = LinearTransformerBlock(self.conv, self.mlp_ratio, self.act, self.drop_path_rate, dtype=self.dtype,
                                       name=f"transformer_{k}")(x, train)
        x = GroupNorm1(dtype=self.dtype, name="norm")(x)
        x = fold(x.reshape(b * p * p, n, self.transformer_dim), b, (hp, wp), p)
        return ConvNormAct(self.out_chs, self.conv, self.norm, 1, act=None, name="conv_proj")(x, train)


@dataclass(frozen=True)
class BlockCfg:
    """One concrete block of a stage: an inverted residual ("ir", `mid_chs` wide) or a MobileViTv2 block."""

    kind: str
    spec: StageSpec
    stride: int
    mid_chs: int = 0


def resolve_stage(spec: StageSpec, in_chs: int) -> tuple[BlockCfg, ...]:
    """The blocks of one stage row, given the width entering it."""
    blocks = []
    for i in range(spec.repeat):
        blocks.append(BlockCfg("ir", spec, spec.stride if i == 0 else 1, make_divisible(in_chs * spec.expand)))
        in_chs = spec.out
    if spec.depth:
        blocks.append(BlockCfg("mobilevitv2", spec, 1))
    return tuple(blocks)


def make_block(b: BlockCfg, drop_path_rate: float, *, conv, norm, act: str, dtype, name: str) -> nn.Module:
    s = b.spec
    if b.kind == "ir":
        return InvertedResidual(s.out, b.mid_chs, conv, norm, kernel=s.kernel, stride=b.stride, act=act,
                                drop_path_rate=drop_path_rate, name=name)
    return MobileViTV2Block(s.out, transformer_width(s), s.depth, conv, norm, patch_size=s.patch_size,
                            mlp_ratio=s.mlp_ratio, kernel=s.kernel, act=act, drop_path_rate=drop_path_rate,
                            dtype=dtype, name=name)


class MobileViTV2(nn.Module):
    """Backbone (stem 3x3/2 conv -> stages -> mean over positions: `pre_logits`) + classifier (`ClassifierHead`: fc).
    `features=True`: the backbone's dict (`zoo.models.heads`)."""

    stages: Stages
    stem_chs: int
    act: str = "silu"
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
        check_images(x, self.in_chans, "MobileViTV2")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        make = partial(make_block, conv=conv, norm=norm, act=self.act, dtype=self.dtype)
        names = [f.name for f in feature_info(self.stages, self.stem_chs)]
        x, maps = stem_and_stages(x, self.stages, self.stem_chs, resolve_stage, make, conv, norm, self.act,
                                  self.drop_path_rate, names, train)
        feats = feature_dict(names, maps, jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return ClassifierHead(self.num_classes, self.drop_rate, dense, name="head")(feats, train)


_CVNETS = dict(crop_pct=0.888, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), license="cvnets-license")
# the ImageNet-21k pre-trained model fine-tuned on ImageNet-1k at 384x384
_IN22K_384 = dict(_CVNETS, input_size=(384, 384), crop_pct=1.0)


def _weights(name: str, in22k: bool = False) -> tuple:
    """timm's re-published ml-cvnets checkpoints: ImageNet-1k for every width, the ImageNet-21k fine-tunes (256 and
    384) for 1.5-2.0. timm's default_cfgs record no accuracy, and none is stated here."""
    weights = [timm_weights(name, "cvnets_in1k", **_CVNETS)]
    if in22k:
        weights += [timm_weights(name, "cvnets_in22k_ft_in1k", **_CVNETS),
                    timm_weights(name, "cvnets_in22k_ft_in1k_384", **_IN22K_384)]
    return tuple(weights)


# name: (width multiplier, pretrained weights)
VARIANTS = {
    "mobilevitv2_050": (0.50, _weights("mobilevitv2_050")),
    "mobilevitv2_075": (0.75, _weights("mobilevitv2_075")),
    "mobilevitv2_100": (1.00, _weights("mobilevitv2_100")),
    "mobilevitv2_125": (1.25, _weights("mobilevitv2_125")),
    "mobilevitv2_150": (1.50, _weights("mobilevitv2_150", in22k=True)),
    "mobilevitv2_175": (1.75, _weights("mobilevitv2_175", in22k=True)),
    "mobilevitv2_200": (2.00, _weights("mobilevitv2_200", in22k=True)),
}


def _build(multiplier: float, **overrides) -> MobileViTV2:
    return MobileViTV2(**{**dict(stages=scaled(multiplier), stem_chs=stem_width(multiplier)), **overrides})


for _name, (_mult, _pretrained) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="mobilevitv2", input_size=(256, 256), crop_pct=0.888, mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0), interpolation="bicubic", first_conv="stem/conv", classifier="head/fc",
            feature_info=feature_info(scaled(_mult), stem_width(_mult)), paper="arXiv:2206.02680 (architecture)",
            twin=f"timm:{_name}",
        ),
        _pretrained,
        converters={"timm": timm_rename},
    )(partial(_build, _mult))
