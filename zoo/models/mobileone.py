"""MobileOne (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", arXiv:2206.04040), S0-S4 as
timm builds them (`timm/models/byobnet.py`, `mobileone_s*`).

Every layer is a `MobileOneBlock` (zoo/layers/reparam.py): a 3x3/2 stem block, then stages of units, each unit a
depthwise 3x3 block (stride 2 in a stage's first unit) followed by a pointwise 1x1 block to the stage width. In the
training form each block sums `num_conv_branches` conv+BN branches (4 in S0, the paper's over-parameterization factor
k), a 1x1 conv+BN branch (3x3 blocks only) and a BatchNorm skip (where width and resolution are kept); with
`deploy=True` each block is one convolution with a bias (`compress.deploy` / `MobileOneBlock.reparameterize`).
Global average pool and a linear classifier follow; there is no final 1x1 conv.

Parameter names mirror timm's module names (`stem/conv_kxk_0/conv`, `stages_2/block_7/conv_scale/bn`,
`stages_3/block_1/se/conv_reduce`, `head/fc`), so the timm key map is a few substitutions; it maps timm's
re-parameterized checkpoints (`reparam_conv`) onto `deploy=True` the same way.
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
from zoo.layers.blocks import Stage as BlockStage  # `Stage` here is a row of the variant table
from zoo.layers.norm import BN_EPS_TORCH
from zoo.layers.reparam import MobileOneBlock
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import feature_dict, layer_factories, stage_feature_info
from zoo.models.heads import ClassifierHead
from zoo.registry import register_model


@dataclass(frozen=True)
class Stage:
    """One row of the paper's table: `units` x (depthwise 3x3 block, pointwise 1x1 block to `out_chs`).

    The first unit's depthwise block has stride 2. `se_units`: the last `se_units` units have squeeze-excite in both
    of their blocks (MobileOne-S4 only).
    """

    units: int
    out_chs: int
    se_units: int = 0


# The network-specification table of arXiv:2206.04040, 224x224 input: stage widths 64, 128, 256, 512 times the
# variant's multipliers alpha_1..alpha_4; the paper's 5 + 5 blocks of 256 * alpha_3 (the second five with SE in S4)
# are one stage of 10 here, as in timm. The stem has min(64, 64 * alpha_1) channels.
S0 = (  # alpha (0.75, 1.0, 1.0, 2.0), k = 4
    Stage(units=2, out_chs=48),  # stage 0, 112x112 in
    Stage(units=8, out_chs=128),  # stage 1, 56x56 in
    Stage(units=10, out_chs=256),  # stage 2, 28x28 in
    Stage(units=1, out_chs=1024),  # stage 3, 14x14 in
)
S1 = (  # alpha (1.5, 1.5, 2.0, 2.5)
    Stage(units=2, out_chs=96),  # stage 0, 112x112 in
    Stage(units=8, out_chs=192),  # stage 1, 56x56 in
    Stage(units=10, out_chs=512),  # stage 2, 28x28 in
    Stage(units=1, out_chs=1280),  # stage 3, 14x14 in
)
S2 = (  # alpha (1.5, 2.0, 2.5, 4.0)
    Stage(units=2, out_chs=96),  # stage 0, 112x112 in
    Stage(units=8, out_chs=256),  # stage 1, 56x56 in
    Stage(units=10, out_chs=640),  # stage 2, 28x28 in
    Stage(units=1, out_chs=2048),  # stage 3, 14x14 in
)
S3 = (  # alpha (2.0, 2.5, 3.0, 4.0)
    Stage(units=2, out_chs=128),  # stage 0, 112x112 in
    Stage(units=8, out_chs=320),  # stage 1, 56x56 in
    Stage(units=10, out_chs=768),  # stage 2, 28x28 in
    Stage(units=1, out_chs=2048),  # stage 3, 14x14 in
)
S4 = (  # alpha (3.0, 3.5, 3.5, 4.0), SE in the last 5 units of stage 2 and in stage 3
    Stage(units=2, out_chs=192),  # stage 0, 112x112 in
    Stage(units=8, out_chs=448),  # stage 1, 56x56 in
    Stage(units=10, out_chs=896, se_units=5),  # stage 2, 28x28 in
    Stage(units=1, out_chs=2048, se_units=1),  # stage 3, 14x14 in
)

Stages = tuple[Stage, ...]


def se_channels(channels: int) -> int:
    """timm's SEModule default: channels / 16 rounded to a multiple of 8 (never rounded up for being too small)."""
    v = channels / 16
    return max(8, int(v + 4) // 8 * 8)


@dataclass(frozen=True)
class BlockCfg:
    """One concrete `MobileOneBlock` of a stage."""

    out_chs: int
    kernel: int
    stride: int
    depthwise: bool
    se_chs: int


def resolve_stage(stage: Stage, in_chs: int) -> tuple[BlockCfg, ...]:
    blocks = []
    for u in range(stage.units):
        se = u >= stage.units - stage.se_units
        blocks.append(BlockCfg(in_chs, 3, 2 if u == 0 else 1, True, se_channels(in_chs) if se else 0))
        blocks.append(BlockCfg(stage.out_chs, 1, 1, False, se_channels(stage.out_chs) if se else 0))
        in_chs = stage.out_chs
    return tuple(blocks)


def feature_info(stages: Stages, stem_chs: int) -> tuple[FeatureInfo, ...]:
    """The stem (stride 2) and every stage output (strides 4-32): each stage starts with a stride-2 block."""
    return stage_feature_info(stem_chs, [2] * len(stages), [s.out_chs for s in stages])


def make_block(b: BlockCfg, drop_path_rate: float, *, block, num_conv_branches: int, name: str) -> nn.Module:
    """The `MobileOneBlock` of one resolved block (`block`: the class with the network's conv, norm, act, form)."""
    return block(b.out_chs, b.kernel, b.stride, groups=b.out_chs if b.depthwise else 1,
                 num_conv_branches=num_conv_branches, se_chs=b.se_chs, drop_path_rate=drop_path_rate, name=name)


class MobileOne(nn.Module):
    """Backbone (stem block -> stages of (depthwise, pointwise) block pairs -> pool: `pre_logits`) + classifier
    (`ClassifierHead`: fc). `features=True`: the backbone's dict (`zoo.models.heads`). `deploy=True`: every block is
    one conv with a bias (the variables `compress.deploy.reparameterize` gives)."""

    stages: Stages
    stem_chs: int
    num_conv_branches: int = 1
    act: str = "relu"
    bn_eps: float = BN_EPS_TORCH
    deploy: bool = False
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
        check_images(x, self.in_chans, "MobileOne")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        block = partial(MobileOneBlock, conv=conv, norm=norm, act=self.act, deploy=self.deploy)
        # the stem has a single 3x3 branch in every variant (timm builds it without `num_conv_branches`)
        x = block(self.stem_chs, 3, 2, name="stem")(x, train)
        make = partial(make_block, block=block, num_conv_branches=self.num_conv_branches)
        maps = [x]
        resolved, in_chs = [], self.stem_chs
        for s in self.stages:
            resolved.append(resolve_stage(s, in_chs))
            in_chs = s.out_chs
        # stochastic depth grows linearly over all blocks of the stages (timm's ByobNet; the stem has none)
        n_blocks = sum(len(b) for b in resolved)
        rates = [self.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        seen = 0
        for i, blocks in enumerate(resolved):
            stage_rates = tuple(rates[seen:seen + len(blocks)])
            seen += len(blocks)
            x = BlockStage(blocks, make, stage_rates, name=f"stages_{i}")(x, train)
            maps.append(x)
        feats = feature_dict([f.name for f in feature_info(self.stages, self.stem_chs)], maps,
                             jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return ClassifierHead(self.num_classes, self.drop_rate, dense, name="head")(feats, train)


def timm_rename(module: MobileOne):
    """timm ByobNet keys: `stages.{i}.{j}.` -> `stages_{i}/block_{j}/`, `conv_kxk.{n}.` -> `conv_kxk_{n}/`,
    SE `attn.fc1/fc2` -> `se/conv_reduce/conv_expand`; the rest 1:1 (`reparam_conv` included)."""

    def rename(path: str) -> str | None:
        path = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages_\1/block_\2/", path)
        path = re.sub(r"(^|[./])conv_kxk\.(\d+)\.", r"\1conv_kxk_\2/", path)
        path = re.sub(r"(^|[./])attn\.fc1$", r"\1se/conv_reduce", path)
        path = re.sub(r"(^|[./])attn\.fc2$", r"\1se/conv_expand", path)
        return path.replace(".", "/")

    return rename


# Apple's ImageNet-1k weights (github.com/apple/ml-mobileone) as re-published by timm, training form. timm's
# default_cfgs record no accuracy for them: top1 is the one the paper and the release report (224x224).
_APPLE = dict(license="mobileone-license", origin="https://github.com/apple/ml-mobileone", interpolation="bilinear")

# name: (table, stem channels, conv branches, pretrained weights)
VARIANTS = {
    "mobileone_s0": (S0, 48, 4, (timm_weights("mobileone_s0", "apple_in1k", top1=71.4, crop_pct=0.875, **_APPLE),)),
    "mobileone_s1": (S1, 64, 1, (timm_weights("mobileone_s1", "apple_in1k", top1=75.9, crop_pct=0.9, **_APPLE),)),
    "mobileone_s2": (S2, 64, 1, (timm_weights("mobileone_s2", "apple_in1k", top1=77.4, crop_pct=0.9, **_APPLE),)),
    "mobileone_s3": (S3, 64, 1, (timm_weights("mobileone_s3", "apple_in1k", top1=78.1, crop_pct=0.9, **_APPLE),)),
    "mobileone_s4": (S4, 64, 1, (timm_weights("mobileone_s4", "apple_in1k", top1=79.4, crop_pct=0.9, **_APPLE),)),
}


def _build(table: Stages, stem_chs: int, branches: int, **overrides) -> MobileOne:
    return MobileOne(**{**dict(stages=table, stem_chs=stem_chs, num_conv_branches=branches), **overrides})


for _name, (_table, _stem, _branches, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="mobileone", input_size=(224, 224), interpolation="bilinear",
            crop_pct=_weights[0].crop_pct, first_conv=("stem/conv_kxk_0/conv", "stem/conv_scale/conv"),
            classifier="head/fc",
            feature_info=feature_info(_table, _stem), paper="arXiv:2206.04040 network specification table",
            twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _table, _stem, _branches))
