"""EfficientViT (MIT) (Cai et al., "EfficientViT: Multi-Scale Linear Attention for High-Resolution Dense Prediction",
arXiv:2205.14756), B0-B3 as timm builds them (`timm/models/efficientvit_mit.py`, `efficientvit_b*`). Not MSRA's
EfficientViT (arXiv:2305.07027, `zoo.models.efficientvit_msra`), a different network of the same name.

A stem (3x3/2 conv+BN, hard-swish, then residual DSConv blocks: depthwise 3x3 conv+BN, hard-swish, 1x1 conv+BN) and
four stages at strides 4, 8, 16 and 32. Stages 0 and 1 are MBConv blocks (1x1 conv+BN to 4x the width, hard-swish,
depthwise 3x3 conv+BN, hard-swish, 1x1 conv+BN), the first with stride 2 and no residual, the others residual.
Stages 2 and 3 start with such a stride-2 MBConv in its "fewer norm" form (the two first convs with a bias and no
BatchNorm), then `depth` EfficientViT blocks: x + attention(x), then x + MBConv(x) in the fewer-norm form. The
attention is the paper's multi-scale ReLU linear attention (`zoo.layers.relu_linear_attention`: heads of `head_dim`
channels, one 5x5 aggregation scale whose depthwise 5x5 and grouped 1x1 convs double the heads, ReLU kernels, eps
1e-5 on the denominator, computed in float32 as timm does). Every activation is hard-swish, as timm's (the paper's
ImageNet models). The authors' fused MBConv and plain conv blocks belong to the L series (timm's
`efficientvit_l*`), which is not ported. The classifier head is timm's: 1x1 conv+BN to `head_widths[0]`, hard-swish,
global average pool, Linear (no bias) to `head_widths[1]`, LayerNorm (eps 1e-5), hard-swish (that is `pre_logits`),
dropout, Linear to the classes.

Every conv followed by a BatchNorm is a `zoo.layers.linear_bn.Conv2dBn`, so the deploy form (`deploy=True`,
`compress.deploy`) is plain convolutions with biases; the head's LayerNorm stays. timm defines no fusion for this
network. The attention is global with no position terms: the parameters do not depend on the input size, and the
model runs at any size (odd sizes too: every stride-2 conv pads k // 2, so maps round up, as timm's).

Named outputs (`features=True`): the stem (stride 2) and the four stages (4-32), timm's feature_info plus the stem.

Parameter names mirror timm's module names with its residual wrappers' `main` dropped (`stem/in_conv/linear`,
`stem/res0/depth_conv/bn`, `stages_0/blocks_1/inverted_conv/linear`, `stages_2/blocks_1/context_module/qkv`,
`stages_2/blocks_1/context_module/aggreg_0/dw`, `stages_2/blocks_1/local_module/point_conv/bn`); a conv without a
norm sits under `linear` as Conv2dBn's does, so the timm key map is a few substitutions (`timm_rename`). The head is
`head/in_conv`, `head/hidden` (timm's `classifier.0`), `head/ln` (`classifier.1`) and `head/fc` (`classifier.4`).
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
from zoo.layers.linear_bn import Conv2dBn
from zoo.layers.norm import BN_EPS_TORCH, LN_EPS_TORCH
from zoo.layers.relu_linear_attention import ReluLinearAttention
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import feature_dict, layer_factories
from zoo.models.heads import classify
from zoo.registry import register_model

ModuleDef = Any

ACT = "hard_swish"
EXPAND = 4  # MBConv's hidden width over its input width, in every block of B0-B3


@dataclass(frozen=True, kw_only=True)
class Stage:
    """`width` channels. The stem: a 3x3/2 conv then `depth` residual DSConv blocks. A stage without attention:
    `depth` MBConv blocks, the first with stride 2. A stage with attention: a stride-2 MBConv, then `depth`
    EfficientViT blocks (timm's counting)."""

    width: int
    depth: int
    attention: bool = False


# The B0-B3 widths and depths of arXiv:2205.14756 (timm's efficientvit_b*), 224x224 input; attention heads of
# `head_dim` channels; head widths (the 1x1 conv's, the hidden Linear's).
B0 = dict(
    stem=Stage(width=8, depth=1),  # 224x224 in
    stages=(
        Stage(width=16, depth=2),  # stage 0, 112x112 in
        Stage(width=32, depth=2),  # stage 1, 56x56 in
        Stage(width=64, depth=2, attention=True),  # stage 2, 28x28 in
        Stage(width=128, depth=2, attention=True),  # stage 3, 14x14 in
    ),
    head_dim=16, head_widths=(1024, 1280),
)
B1 = dict(
    stem=Stage(width=16, depth=1),
    stages=(
        Stage(width=32, depth=2),  # stage 0, 112x112 in
        Stage(width=64, depth=3),  # stage 1, 56x56 in
        Stage(width=128, depth=3, attention=True),  # stage 2, 28x28 in
        Stage(width=256, depth=4, attention=True),  # stage 3, 14x14 in
    ),
    head_dim=16, head_widths=(1536, 1600),
)
B2 = dict(
    stem=Stage(width=24, depth=1),
    stages=(
        Stage(width=48, depth=3),  # stage 0, 112x112 in
        Stage(width=96, depth=4),  # stage 1, 56x56 in
        Stage(width=192, depth=4, attention=True),  # stage 2, 28x28 in
        Stage(width=384, depth=6, attention=True),  # stage 3, 14x14 in
    ),
    head_dim=32, head_widths=(2304, 2560),
)
B3 = dict(
    stem=Stage(width=32, depth=1),
    stages=(
        Stage(width=64, depth=4),  # stage 0, 112x112 in
        Stage(width=128, depth=6),  # stage 1, 56x56 in
        Stage(width=256, depth=6, attention=True),  # stage 2, 28x28 in
        Stage(width=512, depth=9, attention=True),  # stage 3, 14x14 in
    ),
    head_dim=32, head_widths=(2304, 2560),
)

Stages = tuple[Stage, ...]


def feature_info(stem: Stage, stages: Stages) -> tuple[FeatureInfo, ...]:
    return (FeatureInfo("stem", 2, stem.width),
            *(FeatureInfo(f"stages_{i}", 4 * 2**i, s.width) for i, s in enumerate(stages)))


class ConvAct(nn.Module):
    """A conv with a bias and no norm [-> act] (timm's ConvNormAct without its norm: the first two convs of the
    attention stages' MBConvs). The conv is the child `linear`, as in Conv2dBn, so both map from timm's `conv`."""

    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1
    act: str | None = None
    conv: ModuleDef = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(self.features, self.kernel_size, stride=self.stride, groups=self.groups, use_bias=True,
                      name="linear")(x)
        return get_act(self.act)(x) if self.act else x


class DSConv(nn.Module):
    """Depthwise 3x3 conv+BN, hard-swish, 1x1 conv+BN to `out_features` (the stem's blocks)."""

    out_features: int
    conv_bn: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = self.conv_bn(c, 3, groups=c, act=ACT, name="depth_conv")(x, train)
        return self.conv_bn(self.out_features, 1, name="point_conv")(x, train)


class MBConv(nn.Module):
    """1x1 conv to EXPAND x the input width, hard-swish, depthwise 3x3 conv (`stride`), hard-swish, 1x1 conv+BN to
    `out_features`. `fewer_norm`: the first two convs with a bias instead of a BatchNorm (the attention stages')."""

    out_features: int
    stride: int
    fewer_norm: bool
    conv_bn: ModuleDef
    conv_act: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        mid = round(x.shape[-1] * EXPAND)
        first = self.conv_act if self.fewer_norm else self.conv_bn
        x = first(mid, 1, act=ACT, name="inverted_conv")(x, train)
        x = first(mid, 3, self.stride, groups=mid, act=ACT, name="depth_conv")(x, train)
        return self.conv_bn(self.out_features, 1, name="point_conv")(x, train)


class EfficientVitBlock(nn.Module):
    """x + attention(x) (`context_module`), then x + MBConv(x) in the fewer-norm form (`local_module`)."""

    head_dim: int
    conv: ModuleDef
    conv_bn: ModuleDef
    conv_act: ModuleDef
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = x + ReluLinearAttention(c, self.head_dim, self.conv, self.conv_bn, dtype=self.dtype,
                                    name="context_module")(x, train)
        return x + MBConv(c, 1, True, self.conv_bn, self.conv_act, name="local_module")(x, train)


class Stem(nn.Module):
    stage: Stage
    conv_bn: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv_bn(self.stage.width, 3, 2, act=ACT, name="in_conv")(x, train)
        for j in range(self.stage.depth):
            x = x + DSConv(self.stage.width, self.conv_bn, name=f"res{j}")(x, train)
        return x


class MitStage(nn.Module):
    """A stride-2 MBConv to `stage.width`, then MBConvs or EfficientViT blocks (`Stage`)."""

    stage: Stage
    head_dim: int
    conv: ModuleDef
    conv_bn: ModuleDef
    conv_act: ModuleDef
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.stage
        x = MBConv(s.width, 2, s.attention, self.conv_bn, self.conv_act, name="blocks_0")(x, train)
        if s.attention:
            for j in range(1, s.depth + 1):
                x = EfficientVitBlock(self.head_dim, self.conv, self.conv_bn, self.conv_act, self.dtype,
                                      name=f"blocks_{j}")(x, train)
        else:
            for j in range(1, s.depth):
                x = x + MBConv(s.width, 1, False, self.conv_bn, self.conv_act, name=f"blocks_{j}")(x, train)
        return x


class MitHead(nn.Module):
    """The pre-logits layers and the classifier under one scope `head`, called twice (as `MobileNetHead`): on the last
    map with `pre_logits=True` (1x1 conv+BN, hard-swish, mean, Linear without bias, LayerNorm, hard-swish), then on
    the backbone's dict for the logits (dropout, `fc`)."""

    widths: tuple[int, int]
    num_classes: int
    drop_rate: float
    conv_bn: ModuleDef
    dense: ModuleDef
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        if not pre_logits:
            return classify(x, self.num_classes, self.drop_rate, self.dense, train)
        act = get_act(ACT)
        x = self.conv_bn(self.widths[0], 1, act=ACT, name="in_conv")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = self.dense(self.widths[1], use_bias=False, name="hidden")(x)
        return act(nn.LayerNorm(epsilon=LN_EPS_TORCH, dtype=self.dtype, name="ln")(x))


class EfficientViTMit(nn.Module):
    """Backbone (stem -> four stages, strides 4-32 -> the head's pre-logits layers: `pre_logits`) + Linear.
    `features=True`: the backbone's dict (`zoo.models.heads`). `deploy=True`: every conv+BN one conv with a bias
    (the variables `compress.deploy.reparameterize` gives)."""

    stem: Stage
    stages: Stages
    head_dim: int
    head_widths: tuple[int, int]
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
        check_images(x, self.in_chans, "EfficientViT")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        conv_bn = partial(Conv2dBn, conv=conv, norm=norm, deploy=self.deploy)
        conv_act = partial(ConvAct, conv=conv)
        x = Stem(self.stem, conv_bn, name="stem")(x, train)
        maps = [x]
        for i, s in enumerate(self.stages):
            x = MitStage(s, self.head_dim, conv, conv_bn, conv_act, self.dtype, name=f"stages_{i}")(x, train)
            maps.append(x)
        head = MitHead(tuple(self.head_widths), self.num_classes, self.drop_rate, conv_bn, dense, self.dtype,
                       name="head")
        names = [f.name for f in feature_info(self.stem, self.stages)]
        feats = feature_dict(names, maps, head(x, train, pre_logits=True))
        if features:
            return feats
        return head(feats, train)


# timm's head Sequential: Linear, LayerNorm, act, dropout, Linear
_HEAD = {"head.classifier.0": "head/hidden", "head.classifier.1": "head/ln", "head.classifier.4": "head/fc"}


def timm_rename(module: EfficientViTMit):
    """timm EfficientVit keys: `stages.{i}.blocks.{j}.` -> `stages_{i}/blocks_{j}/`, a residual wrapper's `main`
    dropped, `qkv.conv` -> `qkv`, `aggreg.{i}.0` / `.1` -> `aggreg_{i}/dw` / `pw`, a ConvNormAct's `conv` / `norm`
    -> `linear` / `bn`, the head's `classifier.{0,1,4}` -> `hidden`, `ln`, `fc`; the rest 1:1."""

    def rename(path: str) -> str | None:
        if path in _HEAD:
            return _HEAD[path]
        path = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages_\1.blocks_\2.", path)
        path = path.replace(".main.", ".")
        path = re.sub(r"\.qkv\.conv$", ".qkv", path)
        path = re.sub(r"\.aggreg\.(\d+)\.0$", r".aggreg_\1.dw", path)
        path = re.sub(r"\.aggreg\.(\d+)\.1$", r".aggreg_\1.pw", path)
        path = re.sub(r"\.conv$", ".linear", path)
        path = re.sub(r"\.norm$", ".bn", path)
        return path.replace(".", "/")

    return rename


# The authors' ImageNet-1k weights (github.com/mit-han-lab/efficientvit) as re-published by timm, at the input sizes
# timm lists (crop 0.95 at 224, 1.0 above). timm's default_cfgs record no accuracy, so none is given here.
_MIT = dict(origin="https://github.com/mit-han-lab/efficientvit")


def _tags(name: str, sizes: tuple[int, ...]) -> tuple:
    return tuple(timm_weights(name, f"r{r}_in1k", **_MIT, **({} if r == 224 else dict(input_size=(r, r), crop_pct=1.0)))
                 for r in sizes)


# name: (variant, pretrained weights)
VARIANTS = {
    "efficientvit_b0": (B0, _tags("efficientvit_b0", (224,))),
    "efficientvit_b1": (B1, _tags("efficientvit_b1", (224, 256, 288))),
    "efficientvit_b2": (B2, _tags("efficientvit_b2", (224, 256, 288))),
    "efficientvit_b3": (B3, _tags("efficientvit_b3", (224, 256, 288))),
}


def _build(variant: dict, **overrides) -> EfficientViTMit:
    return EfficientViTMit(**{**variant, **overrides})


for _name, (_variant, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="efficientvit_mit", input_size=(224, 224), interpolation="bicubic", crop_pct=0.95,
            first_conv="stem/in_conv/linear", classifier="head/fc",
            feature_info=feature_info(_variant["stem"], _variant["stages"]),
            paper="arXiv:2205.14756 B0-B3", twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _variant))
