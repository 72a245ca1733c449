"""MobileViT v1 (Mehta & Rastegari, "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision
Transformer", arXiv:2110.02178), the XXS / XS / S variants as timm builds them (`timm/models/mobilevit.py`).

The network is MobileNetV2 inverted residuals (`zoo.layers.blocks.InvertedResidual`, the expansion applied to the
input width) and MobileViT blocks (`zoo.layers.transformer.MobileViTBlock`: a ViT encoder run across 2x2 patches of a
feature map), all from the shared block library.

Parameter names mirror timm's module names (`stem/conv`, `stages_2/block_1/transformer_0/attn/qkv`, `final_conv/bn`,
`head/fc`), except inside the inverted residuals, which carry the block library's names (`conv_pw`, `bn1`, `conv_dw`,
`bn2`, `conv_pwl`, `bn3` for timm's `conv1_1x1`, `conv2_kxk`, `conv3_1x1`); the timm key map is a few substitutions
(`timm_rename` below).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from zoo.config import FeatureInfo, ModelCfg
from zoo.inputs import check_images
from zoo.layers.blocks import ConvNormAct, InvertedResidual, Stage
from zoo.layers.norm import BN_EPS_TORCH
from zoo.layers.transformer import MobileViTBlock
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import feature_dict, layer_factories, stage_feature_info
from zoo.models.heads import ClassifierHead
from zoo.models.mobilenet_base import make_divisible
from zoo.registry import register_model

@dataclass(frozen=True, kw_only=True)
class StageSpec:
    """One row of the paper's table, one stage.

    kind "ir": `repeat` inverted residuals to width `out` (the first with `stride`), expanding by `expand`.
    kind "mobilevit": one inverted residual to `out` with `stride`, then a MobileViT block whose transformer has
    `depth` layers of width `transformer_dim` (`num_heads` heads, MLP ratio `mlp_ratio`) over `patch_size` patches.
    """

    kind: Literal["ir", "mobilevit"]
    out: int
    stride: int
    expand: float
    repeat: int = 1
    kernel: int = 3
    transformer_dim: int = 0
    depth: int = 0
    patch_size: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0


# arXiv:2110.02178 Table 4 (Appendix A), 256x256 input. XXS expands by 2, XS and S by 4 (timm's `br`).
XXS = (
    StageSpec(kind="ir", repeat=1, stride=1, expand=2, out=16),  # stage 0, 128x128 in
    StageSpec(kind="ir", repeat=3, stride=2, expand=2, out=24),  # stage 1, 128x128 in
    StageSpec(kind="mobilevit", stride=2, expand=2, out=48, transformer_dim=64, depth=2),  # stage 2, 64x64 in
    StageSpec(kind="mobilevit", stride=2, expand=2, out=64, transformer_dim=80, depth=4),  # stage 3, 32x32 in
    StageSpec(kind="mobilevit", stride=2, expand=2, out=80, transformer_dim=96, depth=3),  # stage 4, 16x16 in
)
XS = (
    StageSpec(kind="ir", repeat=1, stride=1, expand=4, out=32),  # stage 0, 128x128 in
    StageSpec(kind="ir", repeat=3, stride=2, expand=4, out=48),  # stage 1, 128x128 in
    StageSpec(kind="mobilevit", stride=2, expand=4, out=64, transformer_dim=96, depth=2),  # stage 2, 64x64 in
    StageSpec(kind="mobilevit", stride=2, expand=4, out=80, transformer_dim=120, depth=4),  # stage 3, 32x32 in
    StageSpec(kind="mobilevit", stride=2, expand=4, out=96, transformer_dim=144, depth=3),  # stage 4, 16x16 in
)
S = (
    StageSpec(kind="ir", repeat=1, stride=1, expand=4, out=32),  # stage 0, 128x128 in
    StageSpec(kind="ir", repeat=3, stride=2, expand=4, out=64),  # stage 1, 128x128 in
    StageSpec(kind="mobilevit", stride=2, expand=4, out=96, transformer_dim=144, depth=2),  # stage 2, 64x64 in
    StageSpec(kind="mobilevit", stride=2, expand=4, out=128, transformer_dim=192, depth=4),  # stage 3, 32x32 in
    StageSpec(kind="mobilevit", stride=2, expand=4, out=160, transformer_dim=240, depth=3),  # stage 4, 16x16 in
)

Stages = tuple[StageSpec, ...]


@dataclass(frozen=True)
class BlockCfg:
    """One concrete block of a stage: an inverted residual ("ir", `mid_chs` wide) or a MobileViT block."""

    kind: Literal["ir", "mobilevit"]
    spec: StageSpec
    stride: int
    mid_chs: int = 0


def resolve_stage(spec: StageSpec, in_chs: int) -> tuple[BlockCfg, ...]:
    """The blocks of one stage row, given the width entering it."""
    blocks = []
    for i in range(spec.repeat):
        blocks.append(BlockCfg("ir", spec, spec.stride if i == 0 else 1, make_divisible(in_chs * spec.expand)))
        in_chs = spec.out
    if spec.kind == "mobilevit":
        blocks.append(BlockCfg("mobilevit", spec, 1))
    return tuple(blocks)


def feature_info(stages: Stages, stem_chs: int = 16) -> tuple[FeatureInfo, ...]:
    """The last stage output at each stride.

    timm's `features_only` MobileViT returns `final_conv` (the 1x1 expansion to `num_features`) at stride 32; this
    returns the last stage there instead, as ml-cvnets' segmentation and detection heads use it.
    """
    return stage_feature_info(stem_chs, [s.stride for s in stages], [s.out for s in stages])


def make_block(b: BlockCfg, drop_path_rate: float, *, conv, norm, dense, act: str, dtype, name: str) -> nn.Module:
    """The module of one resolved block, from the shared block library."""
    s = b.spec
    if b.kind == "ir":
        return InvertedResidual(s.out, b.mid_chs, conv, norm, kernel=s.kernel, stride=b.stride, act=act,
                                drop_path_rate=drop_path_rate, name=name)
    return MobileViTBlock(s.out, s.transformer_dim, s.depth, conv, norm, patch_size=s.patch_size,
                          num_heads=s.num_heads, mlp_ratio=s.mlp_ratio, kernel=s.kernel, act=act,
                          drop_path_rate=drop_path_rate, dtype=dtype, dense=dense, name=name)


def stem_and_stages(x, stages, stem_chs: int, resolve, make, conv, norm, act: str, drop_path_rate: float,
                    names: list[str], train: bool):
    """The 3x3/2 stem and the stages of MobileViT v1 and v2, built as children of the module calling it (`stem`,
    `stages_{i}`): `resolve(spec, in_chs)` gives a stage's blocks, `make` builds one. Stochastic depth grows linearly
    over all blocks (a MobileViT block counts as one, its transformer layers share its rate), as timm's ByobNet.
    Returns the last stage's output and the outputs of the stages in `names`."""
    x = ConvNormAct(stem_chs, conv, norm, 3, 2, act=act, name="stem")(x, train)
    resolved, in_chs = [], stem_chs
    for spec in stages:
        resolved.append(resolve(spec, in_chs))
        in_chs = spec.out
    n_blocks = sum(len(b) for b in resolved)
    rates = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
    seen, maps = 0, []
    for i, blocks in enumerate(resolved):
        stage_rates = tuple(rates[seen:seen + len(blocks)])
        seen += len(blocks)
        x = Stage(blocks, make, stage_rates, name=f"stages_{i}")(x, train)
        if f"stages_{i}" in names:
            maps.append(x)
    return x, maps


class MobileViT(nn.Module):
    """Backbone (stem 3x3/2 conv -> stages -> 1x1 `final_conv` to `num_features` -> pool: `pre_logits`) + classifier
    (`ClassifierHead`: fc). `features=True`: the backbone's dict (`zoo.models.heads`)."""

    stages: Stages
    num_features: int
    stem_chs: int = 16
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
        check_images(x, self.in_chans, "MobileViT")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        make = partial(make_block, conv=conv, norm=norm, dense=self.dense or nn.Dense, act=self.act, dtype=self.dtype)
        names = [f.name for f in feature_info(self.stages, self.stem_chs)]
        x, maps = stem_and_stages(x, self.stages, self.stem_chs, resolve_stage, make, conv, norm, self.act,
                                  self.drop_path_rate, names, train)
        x = ConvNormAct(self.num_features, conv, norm, 1, act=self.act, name="final_conv")(x, train)
        feats = feature_dict(names, maps, jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return ClassifierHead(self.num_classes, self.drop_rate, dense, name="head")(feats, train)


_TIMM_IR = {"conv1_1x1/conv": "conv_pw", "conv1_1x1/bn": "bn1", "conv2_kxk/conv": "conv_dw", "conv2_kxk/bn": "bn2",
            "conv3_1x1/conv": "conv_pwl", "conv3_1x1/bn": "bn3"}


def timm_rename(module: MobileViT):
    """timm ByobNet keys: `stages.{i}.{j}.` -> `stages_{i}/block_{j}/`, `transformer.{k}` -> `transformer_{k}`, the
    inverted residuals' `conv1_1x1.conv` ... `conv3_1x1.bn` -> the block library's names (`_TIMM_IR`); the rest 1:1."""

    def rename(path: str) -> str | None:
        path = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages_\1/block_\2/", path)
        path = re.sub(r"(^|/)transformer\.(\d+)\.", r"\1transformer_\2/", path)
        path = path.replace(".", "/")
        for old, new in _TIMM_IR.items():
            if path.endswith("/" + old):
                return path[:-len(old)] + new
        return path

    return rename


_CVNETS = dict(input_size=(256, 256), crop_pct=0.9, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
               license="cvnets-license")

# name: (table, num_features, pretrained weights)
VARIANTS = {
    "mobilevit_xxs": (XXS, 320, (
        timm_weights("mobilevit_xxs", "cvnets_in1k", top1=68.936, top5=88.942, **_CVNETS),
    )),
    "mobilevit_xs": (XS, 384, (
        timm_weights("mobilevit_xs", "cvnets_in1k", top1=74.618, top5=92.35, **_CVNETS),
    )),
    "mobilevit_s": (S, 640, (
        timm_weights("mobilevit_s", "cvnets_in1k", top1=78.298, top5=94.168, **_CVNETS),
    )),
}


def _build(table: Stages, num_features: int, **overrides) -> MobileViT:
    return MobileViT(**{**dict(stages=table, num_features=num_features), **overrides})


for _name, (_table, _nf, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="mobilevit", input_size=(256, 256), crop_pct=0.9, mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0), interpolation="bicubic", first_conv="stem/conv", classifier="head/fc",
            feature_info=feature_info(_table), paper="arXiv:2110.02178 Table 4", twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _table, _nf))
