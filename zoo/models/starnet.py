"""StarNet (Ma et al., "Rewrite the Stars", arXiv:2403.19967), S1-S4 as timm builds them (`timm/models/starnet.py`).

The "star operation" is an elementwise product of two linear branches: `relu6(f1(x)) * f2(x)`, which maps the input
into a space of pairwise feature products (implicitly high-dimensional) at the cost of one multiplication.

Stem: 3x3/2 conv + BN + ReLU6 (32 channels). Four stages, each a 3x3/2 conv + BN to `base_dim * 2**i` channels, then
blocks: 7x7 depthwise conv + BN -> two 1x1 convs to 4x width (f1, f2) -> relu6(f1) * f2 -> 1x1 conv + BN back (g) ->
7x7 depthwise conv (dwconv2) -> + input. Then BatchNorm, global pool and a linear classifier. Every conv has a bias.

The deploy form folds each conv's BatchNorm into it (`compress.deploy`); the final BatchNorm follows a residual sum,
not a conv, and becomes the per-channel affine map it computes at inference (`StandaloneBatchNorm`).

Parameter names follow timm's (`stem/conv`, `stages_2_downsample/bn`, `stages_2/block_3/f1`, `norm/bn`, `head/fc`),
so the timm key map is a few substitutions.
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
from zoo.layers.activations import get_act
from zoo.layers.blocks import Stage as BlockStage, drop_path
from zoo.layers.norm import BN_EPS_TORCH
from zoo.layers.reparam import ConvBn, StandaloneBatchNorm
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import feature_dict, layer_factories, stage_feature_info
from zoo.models.heads import ClassifierHead
from zoo.registry import register_model

STEM_CHS = 32


@dataclass(frozen=True)
class Variant:
    """`base_dim`: stage i has `base_dim * 2**i` channels; `depths`: blocks per stage; `mlp_ratio`: f1/f2 width."""

    base_dim: int
    depths: tuple[int, ...]
    mlp_ratio: int = 4

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(self.base_dim * 2 ** i for i in range(len(self.depths)))


# StarNet S1-S4 of arXiv:2403.19967 (the official release's starnet_s1..s4 widths and depths); 224x224 input,
# stages at 56x56, 28x28, 14x14, 7x7.
S1 = Variant(base_dim=24, depths=(2, 2, 8, 3))
S2 = Variant(base_dim=32, depths=(1, 2, 6, 2))
S3 = Variant(base_dim=32, depths=(2, 2, 8, 4))
S4 = Variant(base_dim=32, depths=(3, 3, 12, 5))


def feature_info(v: Variant) -> tuple[FeatureInfo, ...]:
    """The stem (stride 2) and every stage output (strides 4-32): each stage starts with a stride-2 conv."""
    return stage_feature_info(STEM_CHS, [2] * len(v.depths), v.dims)


class StarBlock(nn.Module):
    """dw 7x7 + BN -> relu6(f1(x)) * f2(x) -> g (1x1 + BN) -> dw 7x7 -> + input (timm's starnet Block)."""

    mlp_ratio: int
    conv: Any
    norm: Any
    act: str = "relu6"
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        shortcut = x
        x = ConvBn(c, self.conv, self.norm, 7, 1, c, use_bias=True, name="dwconv")(x, train)
        x1 = self.conv(self.mlp_ratio * c, 1, use_bias=True, name="f1")(x)
        x2 = self.conv(self.mlp_ratio * c, 1, use_bias=True, name="f2")(x)
        x = get_act(self.act)(x1) * x2  # the star operation
        x = ConvBn(c, self.conv, self.norm, 1, use_bias=True, name="g")(x, train)
        x = self.conv(c, 7, groups=c, use_bias=True, name="dwconv2")(x)
        return shortcut + drop_path(x, self.drop_path_rate, train, self)


def _make_block(_spec, drop_path_rate: float, *, block, name: str) -> nn.Module:
    return block(drop_path_rate=drop_path_rate, name=name)


class StarNet(nn.Module):
    """Backbone (stem -> 4 stages -> BN -> pool: `pre_logits`) + classifier (`ClassifierHead`: fc). `features=True`:
    the backbone's dict (`zoo.models.heads`). `deploy=True`: the last BatchNorm is its per-channel affine map
    (`StandaloneBatchNorm`); `compress.deploy` then folds every conv's BatchNorm into the conv."""

    variant: Variant
    act: str = "relu6"
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
        check_images(x, self.in_chans, "StarNet")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        act = get_act(self.act)
        x = act(ConvBn(STEM_CHS, conv, norm, 3, 2, use_bias=True, name="stem")(x, train))
        maps = [x]
        depths = self.variant.depths
        # stochastic depth grows linearly over all blocks (timm's calculate_drop_path_rates)
        rates = [self.drop_path_rate * i / max(sum(depths) - 1, 1) for i in range(sum(depths))]
        block = partial(StarBlock, self.variant.mlp_ratio, conv, norm, self.act)
        seen = 0
        for i, (dim, depth) in enumerate(zip(self.variant.dims, depths)):
            x = ConvBn(dim, conv, norm, 3, 2, use_bias=True, name=f"stages_{i}_downsample")(x, train)
            x = BlockStage(tuple(range(depth)), partial(_make_block, block=block), tuple(rates[seen:seen + depth]),
                           name=f"stages_{i}")(x, train)
            seen += depth
            maps.append(x)
        x = StandaloneBatchNorm(norm, self.deploy, name="norm")(x, train)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        feats = feature_dict([f.name for f in feature_info(self.variant)], maps, pooled)
        if features:
            return feats
        return ClassifierHead(self.num_classes, self.drop_rate, dense, name="head")(feats, train)


def timm_rename(module: StarNet):
    """timm keys: `stem.0.` -> `stem/`, `stages.{i}.0.` (the downsampling ConvBN) -> `stages_{i}_downsample/`,
    `stages.{i}.{j}.` (j >= 1) -> `stages_{i}/block_{j-1}/`, a block's BN-less `f1.conv` (f2, dwconv2) -> `f1`, the
    classifier `head` -> `head/fc`, the last BatchNorm `norm` -> `norm/bn`; the rest 1:1."""

    def block(m: re.Match) -> str:
        i, j = m.group(1), int(m.group(2))
        return f"stages_{i}_downsample/" if j == 0 else f"stages_{i}/block_{j - 1}/"

    def rename(path: str) -> str | None:
        path = re.sub(r"^stem\.0\.", "stem/", path)
        path = re.sub(r"^stages\.(\d+)\.(\d+)\.", block, path)
        path = re.sub(r"(^|[./])(f1|f2|dwconv2)\.conv$", r"\1\2", path)  # ConvBN layers built without their BN
        path = re.sub(r"^head$", "head/fc", path)
        path = re.sub(r"^norm$", "norm/bn", path)
        return path.replace(".", "/")

    return rename


# The authors' ImageNet-1k weights (github.com/ma-xu/Rewrite-the-Stars) as re-published by timm; top1/top5 from
# timm's results-imagenet.csv at 224x224.
_W = partial(timm_weights, origin="https://github.com/ma-xu/Rewrite-the-Stars", interpolation="bicubic",
             crop_pct=0.875)

# name: (variant, pretrained weights)
VARIANTS = {
    "starnet_s1": (S1, (_W("starnet_s1", "in1k", top1=73.532, top5=91.504),)),
    "starnet_s2": (S2, (_W("starnet_s2", "in1k", top1=74.666, top5=92.144),)),
    "starnet_s3": (S3, (_W("starnet_s3", "in1k", top1=77.378, top5=93.616),)),
    "starnet_s4": (S4, (_W("starnet_s4", "in1k", top1=78.824, top5=94.296),)),
}


def _build(variant: Variant, **overrides) -> StarNet:
    return StarNet(**{**dict(variant=variant), **overrides})


for _name, (_variant, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="starnet", input_size=(224, 224), interpolation="bicubic", crop_pct=0.875,
            first_conv="stem/conv", classifier="head/fc", feature_info=feature_info(_variant),
            paper="arXiv:2403.19967, StarNet S1-S4", twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _variant))
