"""RepVGG (Ding et al., "RepVGG: Making VGG-style ConvNets Great Again", arXiv:2101.03697), A0-A2 and B0 as timm
builds them (`timm/models/byobnet.py`, `repvgg_*`).

A plain stack of 3x3 blocks: a stride-2 stem block, then four stages whose first block has stride 2. In the training
form each block sums a 3x3 conv+BN, a 1x1 conv+BN and, where width and resolution are kept, a BatchNorm of its input,
then applies ReLU; with `deploy=True` each block is one 3x3 convolution with a bias (`compress.deploy`). Global average
pool and a linear classifier follow (no final 1x1 conv).

The block is MobileOne's (`zoo.layers.reparam.MobileOneBlock`) with one kxk branch: the same three branch kinds, the
same fusion. Its parameter names are MobileOne's (`conv_kxk_0`, `conv_scale`, `identity`, `reparam_conv`); the timm
key map turns RepVGG's `conv_kxk.` / `conv_1x1.` into them, so timm checkpoints of either form load.
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
    """One row of the paper's table: `depth` 3x3 blocks of `out_chs` channels, the first with stride 2."""

    depth: int
    out_chs: int


# Table 2 of arXiv:2101.03697, 224x224 input: stage widths 64a, 128a, 256a, 512b (a, b: the variant's width
# multipliers); A-series depths 1, 2, 4, 14, 1 and B-series 1, 4, 6, 16, 1, the first "stage" of one block being the
# stem (min(64, 64a) channels), as in timm.
A0 = (  # a = 0.75, b = 2.5
    Stage(depth=2, out_chs=48),  # stage 0, 112x112 in
    Stage(depth=4, out_chs=96),  # stage 1, 56x56 in
    Stage(depth=14, out_chs=192),  # stage 2, 28x28 in
    Stage(depth=1, out_chs=1280),  # stage 3, 14x14 in
)
A1 = (  # a = 1, b = 2.5
    Stage(depth=2, out_chs=64),  # stage 0, 112x112 in
    Stage(depth=4, out_chs=128),  # stage 1, 56x56 in
    Stage(depth=14, out_chs=256),  # stage 2, 28x28 in
    Stage(depth=1, out_chs=1280),  # stage 3, 14x14 in
)
A2 = (  # a = 1.5, b = 2.75
    Stage(depth=2, out_chs=96),  # stage 0, 112x112 in
    Stage(depth=4, out_chs=192),  # stage 1, 56x56 in
    Stage(depth=14, out_chs=384),  # stage 2, 28x28 in
    Stage(depth=1, out_chs=1408),  # stage 3, 14x14 in
)
B0 = (  # a = 1, b = 2.5
    Stage(depth=4, out_chs=64),  # stage 0, 112x112 in
    Stage(depth=6, out_chs=128),  # stage 1, 56x56 in
    Stage(depth=16, out_chs=256),  # stage 2, 28x28 in
    Stage(depth=1, out_chs=1280),  # stage 3, 14x14 in
)

Stages = tuple[Stage, ...]


def feature_info(stages: Stages, stem_chs: int) -> tuple[FeatureInfo, ...]:
    """The stem (stride 2) and every stage output (strides 4-32): each stage starts with a stride-2 block."""
    return stage_feature_info(stem_chs, [2] * len(stages), [s.out_chs for s in stages])


def make_block(spec: tuple[int, int], drop_path_rate: float, *, block, name: str) -> nn.Module:
    """The block of one (out_chs, stride) spec (`block`: `MobileOneBlock` with the network's conv, norm, form)."""
    out_chs, stride = spec
    return block(out_chs, 3, stride, drop_path_rate=drop_path_rate, name=name)


class RepVGG(nn.Module):
    """Backbone (stem block -> stages of 3x3 blocks -> pool: `pre_logits`) + classifier (`ClassifierHead`: fc).
    `features=True`: the backbone's dict (`zoo.models.heads`). `deploy=True`: every block is one 3x3 conv with a bias
    (the variables `compress.deploy.reparameterize` gives)."""

    stages: Stages
    stem_chs: int
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
        check_images(x, self.in_chans, "RepVGG")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        block = partial(MobileOneBlock, conv=conv, norm=norm, act=self.act, deploy=self.deploy)
        x = block(self.stem_chs, 3, 2, name="stem")(x, train)
        maps = [x]
        # stochastic depth grows linearly over all blocks of the stages (timm's ByobNet; the stem has none)
        n_blocks = sum(s.depth for s in self.stages)
        rates = [self.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        make = partial(make_block, block=block)
        seen = 0
        for i, s in enumerate(self.stages):
            specs = tuple((s.out_chs, 2 if j == 0 else 1) for j in range(s.depth))
            x = BlockStage(specs, make, tuple(rates[seen:seen + s.depth]), name=f"stages_{i}")(x, train)
            seen += s.depth
            maps.append(x)
        feats = feature_dict([f.name for f in feature_info(self.stages, self.stem_chs)], maps,
                             jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return ClassifierHead(self.num_classes, self.drop_rate, dense, name="head")(feats, train)


def timm_rename(module: RepVGG):
    """timm ByobNet keys: `stages.{i}.{j}.` -> `stages_{i}/block_{j}/`; RepVggBlock's `conv_kxk.` -> `conv_kxk_0/`
    and `conv_1x1.` -> `conv_scale/` (MobileOneBlock's names); the rest 1:1 (`identity`, `reparam_conv`, `head.fc`)."""

    def rename(path: str) -> str | None:
        path = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages_\1/block_\2/", path)
        path = re.sub(r"(^|[./])conv_kxk\.", r"\1conv_kxk_0/", path)
        path = re.sub(r"(^|[./])conv_1x1\.", r"\1conv_scale/", path)
        return path.replace(".", "/")

    return rename


# The official weights (github.com/DingXiaoH/RepVGG) as re-published by timm; top-1/top-5 from timm's
# results-imagenet.csv at 224x224.
_RVGG = dict(license="mit", origin="https://github.com/DingXiaoH/RepVGG", interpolation="bilinear", crop_pct=0.875)

# name: (table, stem channels, pretrained weights)
VARIANTS = {
    "repvgg_a0": (A0, 48, (timm_weights("repvgg_a0", "rvgg_in1k", top1=72.426, top5=90.506, **_RVGG),)),
    "repvgg_a1": (A1, 64, (timm_weights("repvgg_a1", "rvgg_in1k", top1=74.474, top5=91.852, **_RVGG),)),
    "repvgg_a2": (A2, 64, (timm_weights("repvgg_a2", "rvgg_in1k", top1=76.488, top5=93.016, **_RVGG),)),
    "repvgg_b0": (B0, 64, (timm_weights("repvgg_b0", "rvgg_in1k", top1=75.158, top5=92.41, **_RVGG),)),
}


def _build(table: Stages, stem_chs: int, **overrides) -> RepVGG:
    return RepVGG(**{**dict(stages=table, stem_chs=stem_chs), **overrides})


for _name, (_table, _stem, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="repvgg", input_size=(224, 224), interpolation="bilinear", crop_pct=0.875,
            first_conv=("stem/conv_kxk_0/conv", "stem/conv_scale/conv"), classifier="head/fc",
            feature_info=feature_info(_table, _stem), paper="arXiv:2101.03697 Table 2", twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _table, _stem))
