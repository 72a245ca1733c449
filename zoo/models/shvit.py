"""SHViT (Yun & Ro, "SHViT: Single-Head Vision Transformer with Memory Efficient Macro Design", arXiv:2401.16456),
S1-S4 as timm builds them (`timm/models/shvit.py`, `shvit_s*`).

The macro design is EfficientViT (MSRA)'s, and so are its parts, taken from `zoo.models.efficientvit_msra`: a 16x16
patch embedding of four 3x3/2 conv+BN (ReLU between them), three stages at strides 16, 32 and 64, a subsampling block
at the start of stages 1 and 2 (x + dw(x), x + FFN(x), patch merging with squeeze-excite to the stage width and
stride 2, x + dw(x), x + FFN(x)), and the BatchNorm -> dropout -> Linear classifier on the pooled last stage (timm's
NormLinear). A block is x + dw(x), [x + attention(x)], x + FFN(x): dw a depthwise 3x3 conv+BN, the FFN two 1x1
conv+BN with ReLU between and expansion 2, the attention single-head partial attention
(`zoo.layers.single_head_attention`: a GroupNorm, then one head with 16-channel queries and keys over every position,
on the stage's first `pdim` channels only; the rest pass by it). Stage 0 has no attention (timm's type "i"), stages
1 and 2 have it in every block ("s"). The attention is global and has no position biases: the parameters do not
depend on the input size, and the model runs at any size (S4's weights are trained at 256x256, the others' at 224).

Every conv is followed by a BatchNorm (`zoo.layers.linear_bn.Conv2dBn`), so the deploy form (`deploy=True`,
`compress.deploy`) is plain convolutions with biases, the head's BatchNorm folded into its Linear; the attention's
GroupNorm stays (its statistics are the input's). timm's own fusion also adds the identity into the kernel of each
residual depthwise conv; here the residual sum stays an addition (the same parameter count).

Named outputs (`features=True`): the patch embedding's first three convs (strides 2, 4, 8, after their ReLU) and the
first two stages (strides 16 and 32). The network has no stage at stride 4 or 8; its last stage (stride 64,
`stages_2`) is not a named output (the zoo's feature pyramids end at stride 32), it is what `pre_logits` pools.

Parameter names mirror timm's module names (`patch_embed/conv1/linear`, `stages_1/blocks_0/mixer/pre_norm`,
`stages_1/blocks_0/mixer/qkv/bn`, `stages_2/downsample/patchmerge/se/conv_reduce`, `stages_0/blocks_1/ffn/pw2/linear`);
the timm key map is a few substitutions (`timm_rename`). The head is `head/bn` and `head/fc` (timm's `head.l`).
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
from zoo.layers.linear_bn import Conv2dBn
from zoo.layers.norm import BN_EPS_TORCH
from zoo.layers.single_head_attention import SingleHeadAttention
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import feature_dict, layer_factories
from zoo.models.efficientvit_msra import FFN_RATIO, Ffn, NormLinearHead, PatchEmbed, Subsample
from zoo.registry import register_model

ModuleDef = Any


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage: `depth` blocks of width `dim`, with single-head attention on the first `pdim` channels when
    `attention` (timm's type "s"; "i" has none). Every stage but the first starts with a subsampling block (stride
    2) from the previous width to `dim`."""

    dim: int
    depth: int
    pdim: int
    attention: bool


# The model variants of arXiv:2401.16456 (widths, depths and partial attention widths per stage; timm's shvit_s*),
# 224x224 input (S4: 256x256, maps 16, 8, 4). Query and key width 16 in every stage.
S1 = (
    Stage(dim=128, depth=2, pdim=32, attention=False),  # stage 0, 14x14 in
    Stage(dim=224, depth=4, pdim=48, attention=True),  # stage 1, 14x14 in
    Stage(dim=320, depth=5, pdim=68, attention=True),  # stage 2, 7x7 in
)
S2 = (
    Stage(dim=128, depth=2, pdim=32, attention=False),  # stage 0, 14x14 in
    Stage(dim=308, depth=4, pdim=66, attention=True),  # stage 1, 14x14 in
    Stage(dim=448, depth=5, pdim=96, attention=True),  # stage 2, 7x7 in
)
S3 = (
    Stage(dim=192, depth=3, pdim=48, attention=False),  # stage 0, 14x14 in
    Stage(dim=352, depth=5, pdim=75, attention=True),  # stage 1, 14x14 in
    Stage(dim=448, depth=5, pdim=96, attention=True),  # stage 2, 7x7 in
)
S4 = (
    Stage(dim=224, depth=4, pdim=48, attention=False),  # stage 0, 16x16 in (256x256 input)
    Stage(dim=336, depth=7, pdim=72, attention=True),  # stage 1, 16x16 in
    Stage(dim=448, depth=6, pdim=96, attention=True),  # stage 2, 8x8 in
)

Stages = tuple[Stage, ...]

QK_DIM = 16


def feature_info(stages: Stages) -> tuple[FeatureInfo, ...]:
    """The patch embedding's first three convs (strides 2, 4, 8) and the first two stages (16, 32); the last stage
    (stride 64) is left out (module doc)."""
    e = stages[0].dim
    return (FeatureInfo("patch_embed/conv1", 2, e // 8), FeatureInfo("patch_embed/conv2", 4, e // 4),
            FeatureInfo("patch_embed/conv3", 8, e // 2), FeatureInfo("stages_0", 16, stages[0].dim),
            FeatureInfo("stages_1", 32, stages[1].dim))


class Block(nn.Module):
    """x + dw(x), [x + attention(x)], x + FFN(x). Every branch's last BatchNorm starts at scale zero (timm's
    bn_weight_init=0), so a block starts as the identity."""

    qk_dim: int
    pdim: int
    attention: bool
    conv_bn: ModuleDef
    zero_conv_bn: ModuleDef
    ffn: ModuleDef
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = x + self.zero_conv_bn(c, 3, groups=c, name="conv")(x, train)
        if self.attention:
            x = x + SingleHeadAttention(self.qk_dim, self.pdim, self.conv_bn, self.zero_conv_bn, dtype=self.dtype,
                                        name="mixer")(x, train)
        return x + self.ffn(c * FFN_RATIO, name="ffn")(x, train)


class ShvitStage(nn.Module):
    """[Subsample to `stage.dim`] then `stage.depth` blocks."""

    stage: Stage
    downsample: bool
    qk_dim: int
    conv_bn: ModuleDef
    zero_conv_bn: ModuleDef
    ffn: ModuleDef
    conv: ModuleDef
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.stage
        if self.downsample:
            x = Subsample(s.dim, self.conv_bn, self.ffn, self.conv, name="downsample")(x, train)
        for j in range(s.depth):
            x = Block(self.qk_dim, s.pdim, s.attention, self.conv_bn, self.zero_conv_bn, self.ffn, self.dtype,
                      name=f"blocks_{j}")(x, train)
        return x


class SHViT(nn.Module):
    """Backbone (patch embedding -> three stages, strides 16-64 -> mean over positions: `pre_logits`) + BatchNorm/
    Linear head. `features=True`: the backbone's dict (`zoo.models.heads`). `deploy=True`: every conv+BN one conv
    with a bias, the head's BatchNorm folded into its Linear (the variables `compress.deploy.reparameterize` gives)."""

    stages: Stages
    qk_dim: int = QK_DIM
    bn_eps: float = BN_EPS_TORCH
    deploy: bool = False
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
        check_images(x, self.in_chans, "SHViT")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        conv_bn = partial(Conv2dBn, conv=conv, norm=norm, deploy=self.deploy)
        zero_conv_bn = partial(conv_bn, norm=partial(norm, scale_init=nn.initializers.zeros))
        ffn = partial(Ffn, conv_bn=conv_bn, zero_conv_bn=zero_conv_bn)
        x, maps = PatchEmbed(self.stages[0].dim, conv_bn, name="patch_embed")(x, train)
        for i, s in enumerate(self.stages):
            # a stage subsamples where its width changes (timm's prev_dim != dim); every later stage of S1-S4 does
            x = ShvitStage(s, x.shape[-1] != s.dim, self.qk_dim, conv_bn, zero_conv_bn, ffn, conv, self.dtype,
                           name=f"stages_{i}")(x, train)
            maps.append(x)
        names = [f.name for f in feature_info(self.stages)]
        feats = feature_dict(names, maps[:len(names)], jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return NormLinearHead(self.num_classes, self.drop_rate, dense, norm, self.deploy, name="head")(feats, train)


# timm's `downsample` is a Sequential of five; EfficientViT's subsampling block names them
_DOWNSAMPLE = ("res1.dw", "res1.ffn", "patchmerge", "res2.dw", "res2.ffn")


def timm_rename(module: SHViT):
    """timm SHViT keys: `patch_embed.{0,2,4,6}` -> `patch_embed/conv{1-4}`, `stages.{i}.blocks.{j}.` ->
    `stages_{i}/blocks_{j}/`, `stages.{i}.downsample.{0-4}` -> `res1/dw`, `res1/ffn`, `patchmerge`, `res2/dw`,
    `res2/ffn` under `stages_{i}/downsample/`, a residual wrapper's `.m` dropped, `proj.1` -> `proj`, a Conv2dNorm's
    `c` -> `linear`, SE `fc1` / `fc2` -> `conv_reduce` / `conv_expand`, `head.l` -> `head/fc`; the rest 1:1."""

    def rename(path: str) -> str | None:
        path = re.sub(r"^patch_embed\.([0246])\.", lambda m: f"patch_embed.conv{int(m[1]) // 2 + 1}.", path)
        path = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages_\1.blocks_\2.", path)
        path = re.sub(r"^stages\.(\d+)\.downsample\.([0-4])\.",
                      lambda m: f"stages_{m[1]}.downsample.{_DOWNSAMPLE[int(m[2])]}.", path)
        path = path.replace(".m.", ".").replace(".proj.1.", ".proj.")
        path = re.sub(r"\.c$", ".linear", path)
        path = re.sub(r"\.se\.fc1$", ".se.conv_reduce", path)
        path = re.sub(r"\.se\.fc2$", ".se.conv_expand", path)
        path = {"head.l": "head.fc"}.get(path, path)
        return path.replace(".", "/")

    return rename


# The authors' ImageNet-1k weights (github.com/ysj9909/SHViT) as re-published by timm. timm's default_cfgs record no
# accuracy: top1 is the authors' (their README's model table; S4 at 256x256).
_AUTHORS = dict(license="mit", origin="https://github.com/ysj9909/SHViT")

# name: (table, input size, pretrained weights)
VARIANTS = {
    "shvit_s1": (S1, 224, (timm_weights("shvit_s1", "in1k", top1=72.8, **_AUTHORS),)),
    "shvit_s2": (S2, 224, (timm_weights("shvit_s2", "in1k", top1=75.2, **_AUTHORS),)),
    "shvit_s3": (S3, 224, (timm_weights("shvit_s3", "in1k", top1=77.4, **_AUTHORS),)),
    "shvit_s4": (S4, 256, (timm_weights("shvit_s4", "in1k", top1=79.4, **_AUTHORS),)),
}


def _build(table: Stages, **overrides) -> SHViT:
    return SHViT(**{**dict(stages=table), **overrides})


for _name, (_table, _res, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="shvit", input_size=(_res, _res), interpolation="bicubic", crop_pct=0.875,
            first_conv="patch_embed/conv1/linear", classifier="head/fc", feature_info=feature_info(_table),
            paper="arXiv:2401.16456 model variants", twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _table))
