"""TinyViT (Wu et al., "TinyViT: Fast Pretraining Distillation for Small Vision Transformers", ECCV 2022,
arXiv:2207.10666), the 5M / 11M / 21M variants at 224x224 as timm builds them (`timm/models/tiny_vit.py`,
`tiny_vit_*_224`).

A 4x4 stem of two 3x3/2 conv+BN (GELU between them), then four stages at strides 4, 8, 16 and 32. Stage 0 is
MBConv blocks (1x1 expand 4x, 3x3 depthwise, 1x1 project, each conv+BN, GELU after the first two; the residual sum is
followed by a GELU too). Stages 1-3 start with patch merging (1x1 conv+BN, GELU, 3x3/2 depthwise conv+BN, GELU, 1x1
conv+BN) to the stage width, then transformer blocks: x + windowed attention(x), a 3x3 depthwise conv+BN
(`local_conv`, no residual), x + MLP(x). The attention is pre-LayerNorm multi-head attention inside non-overlapping
square windows (7, 7, 14 positions a side in stages 1-3: at 224x224 the maps are 28, 14 and 7, a whole number of
windows); a map that is not a multiple of the window is zero-padded at the bottom and right before the LayerNorm,
the padded positions take part as keys, as in timm, and are cropped after. Each head has a learned bias per relative
offset (|dy|, |dx|) inside a window (the table LeViT uses, `zoo.layers.attention`). The MLP is LayerNorm -> Linear
(4x) -> GELU -> Linear. Head: global mean -> LayerNorm -> Linear (timm's NormMlpClassifierHead, as ConvNeXt's).

Input size: the bias tables are sized by the window (`window * window` entries a head), not by the input, so the
parameters do not depend on the input size and the model runs at any size, as timm's does, windows padded where
needed. A table made for another window (weights of timm's `tiny_vit_21m_384`, windows 12/24) does not fit:
the strict merge names the mis-shaped biases, and variables of another window raise naming the window they were made
for instead of reading the wrong entries (timm resizes the table when it loads such weights; the zoo does not).

Deploy form (`deploy=True`, `compress.deploy`): every conv+BN (stem, MBConv, patch merging, local conv) one conv with a
bias, timm's `ConvNorm.fuse`; the LayerNorms, attention and Linears are unchanged.

Named outputs (`features=True`): the stem's first conv (stride 2, after its GELU) and the four stages (strides 4-32);
`pre_logits` is the pooled, normalized last stage (the classifier's input).

Parameter names mirror timm's module names (`patch_embed/conv1/linear`, `stages_0/blocks_1/conv3/bn`,
`stages_2/downsample/conv2/linear`, `stages_2/blocks_3/attn/attention_biases`, `stages_3/blocks_0/local_conv/bn`,
`stages_1/blocks_0/mlp/fc1`, `head/norm`, `head/fc`); the timm key map is a few substitutions (`timm_rename`).
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
from zoo.layers import kinds
from zoo.layers.activations import get_act
from zoo.layers.attention import attend_with_bias, attention_bias_index
from zoo.layers.blocks import drop_path
from zoo.layers.linear_bn import Conv2dBn
from zoo.layers.norm import BN_EPS_TORCH
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import feature_dict, layer_factories
from zoo.models.convnext import ConvNeXtHead
from zoo.registry import register_model

ModuleDef = Any

LN_EPS = 1e-5  # torch's LayerNorm default, every LayerNorm of TinyViT (the head's LayerNorm2d too)
MBCONV_RATIO, MLP_RATIO = 4.0, 4.0


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage of width `dim` and `depth` blocks. The first stage is MBConv blocks (`num_heads` and `window` are
    None); the others start with patch merging (stride 2) and are transformer blocks with `num_heads` heads attending
    inside `window` x `window` windows."""

    dim: int
    depth: int
    num_heads: int | None = None
    window: int | None = None


# TinyViT variants (the paper's 5M / 11M / 21M models, arXiv:2207.10666; timm's `tiny_vit_*_224` model args), 224x224
# input.
TINY_VIT_5M = (
    Stage(dim=64, depth=2),  # stage 0, 56x56 in
    Stage(dim=128, depth=2, num_heads=4, window=7),  # stage 1, 56x56 in (28x28 after merging)
    Stage(dim=160, depth=6, num_heads=5, window=14),  # stage 2, 14x14 after merging
    Stage(dim=320, depth=2, num_heads=10, window=7),  # stage 3, 7x7 after merging
)
TINY_VIT_11M = (
    Stage(dim=64, depth=2),  # stage 0, 56x56 in
    Stage(dim=128, depth=2, num_heads=4, window=7),  # stage 1, 28x28 after merging
    Stage(dim=256, depth=6, num_heads=8, window=14),  # stage 2, 14x14 after merging
    Stage(dim=448, depth=2, num_heads=14, window=7),  # stage 3, 7x7 after merging
)
TINY_VIT_21M = (
    Stage(dim=96, depth=2),  # stage 0, 56x56 in
    Stage(dim=192, depth=2, num_heads=6, window=7),  # stage 1, 28x28 after merging
    Stage(dim=384, depth=6, num_heads=12, window=14),  # stage 2, 14x14 after merging
    Stage(dim=576, depth=2, num_heads=18, window=7),  # stage 3, 7x7 after merging
)

Stages = tuple[Stage, ...]


def feature_info(stages: Stages) -> tuple[FeatureInfo, ...]:
    """The stem's first conv (stride 2, after its GELU) and every stage (strides 4-32)."""
    return (FeatureInfo("patch_embed/conv1", 2, stages[0].dim // 2),
            *(FeatureInfo(f"stages_{i}", 4 * 2 ** i, s.dim) for i, s in enumerate(stages)))


class PatchEmbed(nn.Module):
    """3x3/2 conv+BN to dim/2, GELU, 3x3/2 conv+BN to dim. Returns (x, [the first conv's output after GELU])."""

    dim: int
    conv_bn: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        first = self.conv_bn(self.dim // 2, 3, 2, act="gelu", name="conv1")(x, train)
        return self.conv_bn(self.dim, 3, 2, name="conv2")(first, train), [first]


class MBConv(nn.Module):
    """GELU(x + (1x1 conv+BN 4x, GELU, 3x3 dw conv+BN, GELU, 1x1 conv+BN)); the last BatchNorm starts at scale zero
    (timm's bn_weight_init=0)."""

    conv_bn: ModuleDef
    zero_conv_bn: ModuleDef
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        mid = int(c * MBCONV_RATIO)
        y = self.conv_bn(mid, 1, act="gelu", name="conv1")(x, train)
        y = self.conv_bn(mid, 3, groups=mid, act="gelu", name="conv2")(y, train)
        y = self.zero_conv_bn(c, 1, name="conv3")(y, train)
        return get_act("gelu")(x + drop_path(y, self.drop_path_rate, train, self))


class PatchMerging(nn.Module):
    """1x1 conv+BN to `out_dim`, GELU, 3x3/2 depthwise conv+BN, GELU, 1x1 conv+BN."""

    out_dim: int
    conv_bn: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        d = self.out_dim
        x = self.conv_bn(d, 1, act="gelu", name="conv1")(x, train)
        x = self.conv_bn(d, 3, 2, groups=d, act="gelu", name="conv2")(x, train)
        return self.conv_bn(d, 1, name="conv3")(x, train)


class WindowAttention(nn.Module):
    """LayerNorm -> multi-head attention with a relative-position bias over the (B, window * window, C) tokens of
    windows: Linear `qkv` (per head: head_dim q, k and v, timm's channel order), softmax(q k^T / sqrt(head_dim) +
    bias) v, Linear `proj`. `attention_biases` (heads, window * window) is indexed by |dy| * window + |dx|."""

    num_heads: int
    window: int
    dense: ModuleDef = nn.Dense
    ln: ModuleDef = partial(nn.LayerNorm, epsilon=LN_EPS, use_fast_variance=False)

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        ws, heads = self.window, self.num_heads
        if n != ws * ws:
            raise ValueError(f"{'/'.join(self.path)}: {n} tokens for a {ws}x{ws} window")
        self._check_table()
        hd = c // heads
        biases = self.param("attention_biases", nn.initializers.zeros, (heads, ws * ws))
        x = self.ln(name="norm")(x)
        qkv = self.dense(heads * 3 * hd, name="qkv")(x).reshape(b, n, heads, 3 * hd)
        q, k, v = qkv[..., :hd], qkv[..., hd:2 * hd], qkv[..., 2 * hd:]
        x = attend_with_bias(q, k, v, biases, attention_bias_index((ws, ws)), hd**-0.5)
        return self.dense(c, name="proj")(x)

    def _check_table(self) -> None:
        """Biases made for another window (variables of another model) would be read at the wrong offsets, or past
        their end: name the window they fit instead."""
        if not self.has_variable("params", "attention_biases"):
            return  # being initialized: the table is created for this window
        size = int(self.get_variable("params", "attention_biases").shape[-1])
        if size == self.window ** 2:
            return
        side = round(size ** 0.5)
        made = f"a {side}x{side} window" if side * side == size else f"a window of {size} positions"
        raise ValueError(
            f"TinyViT attention '{'/'.join(self.path)}': its biases are for {made}, but the model attends in "
            f"{self.window}x{self.window} windows. Create the model with the window sizes the weights were made for "
            "(`window_sizes`), or initialize it anew (untrained biases).")


kinds.register(WindowAttention, kinds.LayerKind("attention", int8="float"))


def window_partition(x, ws: int):
    """(B, H, W, C) with H, W multiples of `ws` -> (B * H/ws * W/ws, ws * ws, C), windows in row-major order.
    Five dimensions at most (batch and window rows merged), which TFLite's transpose takes."""
    b, h, w, c = x.shape
    x = x.reshape(b * (h // ws), ws, w // ws, ws, c).transpose(0, 2, 1, 3, 4)
    return x.reshape(-1, ws * ws, c)


def window_reverse(x, ws: int, b: int, h: int, w: int):
    """The inverse of `window_partition`: (B * H/ws * W/ws, ws * ws, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.reshape(b * (h // ws), w // ws, ws, ws, c).transpose(0, 2, 1, 3, 4)
    return x.reshape(b, h, w, c)


class Mlp(nn.Module):
    """LayerNorm -> Linear (4x) -> GELU -> Linear (timm's NormMlp)."""

    hidden: int
    dense: ModuleDef
    ln: ModuleDef

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = self.dense(self.hidden, name="fc1")(self.ln(name="norm")(x))
        return self.dense(c, name="fc2")(get_act("gelu")(x))


class TinyVitBlock(nn.Module):
    """x + window attention(x) (zero padding to whole windows, bottom and right, cropped after), then the 3x3
    depthwise conv+BN `local_conv`, then x + MLP(x); on NHWC maps."""

    num_heads: int
    window: int
    conv_bn: ModuleDef
    dense: ModuleDef
    ln: ModuleDef
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, h, w, c = x.shape
        ws = self.window
        pad_h, pad_w = -h % ws, -w % ws
        y = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))) if pad_h or pad_w else x
        y = WindowAttention(self.num_heads, ws, self.dense, self.ln, name="attn")(window_partition(y, ws))
        y = window_reverse(y, ws, b, h + pad_h, w + pad_w)[:, :h, :w]
        x = x + drop_path(y, self.drop_path_rate, train, self)
        x = self.conv_bn(c, 3, groups=c, name="local_conv")(x, train)
        y = Mlp(int(c * MLP_RATIO), self.dense, self.ln, name="mlp")(x)
        return x + drop_path(y, self.drop_path_rate, train, self)


class TinyVitStage(nn.Module):
    """Stage 0: MBConv blocks. Later stages: patch merging to `stage.dim` (`downsample`), then transformer blocks."""

    stage: Stage
    first: bool
    conv_bn: ModuleDef
    zero_conv_bn: ModuleDef
    dense: ModuleDef
    ln: ModuleDef
    drop_path_rates: tuple[float, ...]

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.stage
        if self.first:
            for j, rate in enumerate(self.drop_path_rates):
                x = MBConv(self.conv_bn, self.zero_conv_bn, rate, name=f"blocks_{j}")(x, train)
            return x
        x = PatchMerging(s.dim, self.conv_bn, name="downsample")(x, train)
        for j, rate in enumerate(self.drop_path_rates):
            x = TinyVitBlock(s.num_heads, s.window, self.conv_bn, self.dense, self.ln, rate,
                             name=f"blocks_{j}")(x, train)
        return x


class TinyViT(nn.Module):
    """Backbone (stem -> 4 stages, strides 4-32 -> mean over positions -> LayerNorm: `pre_logits`) + Linear
    classifier. `features=True`: the backbone's dict (`zoo.models.heads`). `deploy=True`: every conv+BN one conv with
    a bias (the variables `compress.deploy.reparameterize` gives). `window_sizes` (stages 1-3) overrides the table's
    windows (timm's 384 and 512 forms use 12/24 and 16/32)."""

    stages: Stages
    window_sizes: tuple[int, ...] | None = None
    bn_eps: float = BN_EPS_TORCH
    deploy: bool = False
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # grows linearly over all blocks, as timm's
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); parameters stay float32
    # injected layer factories (None: the defaults; see `zoo.models.backbone.layer_factories`)
    conv: Any = None
    norm: Any = None
    dense: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        check_images(x, self.in_chans, "TinyViT")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        ln = partial(nn.LayerNorm, epsilon=LN_EPS, use_fast_variance=False, dtype=self.dtype)
        conv_bn = partial(Conv2dBn, conv=conv, norm=norm, deploy=self.deploy)
        zero_conv_bn = partial(conv_bn, norm=partial(norm, scale_init=nn.initializers.zeros))
        stages = self._stages()
        x, maps = PatchEmbed(stages[0].dim, conv_bn, name="patch_embed")(x, train)
        n_blocks = sum(s.depth for s in stages)
        rates = [self.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        seen = 0
        for i, s in enumerate(stages):
            x = TinyVitStage(s, i == 0, conv_bn, zero_conv_bn, dense, ln, tuple(rates[seen:seen + s.depth]),
                             name=f"stages_{i}")(x, train)
            seen += s.depth
            maps.append(x)
        head = ConvNeXtHead(self.num_classes, ln, dense, self.drop_rate, name="head")
        feats = feature_dict([f.name for f in feature_info(stages)], maps, head(x, train, pre_logits=True))
        if features:
            return feats
        return head(feats, train)

    def _stages(self) -> Stages:
        if self.window_sizes is None:
            return self.stages
        if len(self.window_sizes) != len(self.stages) - 1:
            raise ValueError(f"TinyViT window_sizes: one per attention stage ({len(self.stages) - 1}), "
                             f"got {self.window_sizes}")
        return (self.stages[0], *(Stage(dim=s.dim, depth=s.depth, num_heads=s.num_heads, window=ws)
                                  for s, ws in zip(self.stages[1:], self.window_sizes)))


def timm_rename(module: TinyViT):
    """timm TinyVit keys: `stages.{i}.blocks.{j}.` -> `stages_{i}/blocks_{j}/`, `stages.{i}.downsample.` ->
    `stages_{i}/downsample/`, a ConvNorm's `conv` -> `linear`; the rest 1:1."""

    def rename(path: str) -> str | None:
        path = re.sub(r"^stages\.(\d+)\.(blocks\.(\d+)|downsample)\.",
                      lambda m: f"stages_{m[1]}.{'downsample' if m[3] is None else 'blocks_' + m[3]}.", path)
        path = re.sub(r"\.conv$", ".linear", path)
        return path.replace(".", "/")

    return rename


# The authors' weights (github.com/microsoft/Cream/tree/main/TinyViT) as re-published by timm: trained on
# ImageNet-1k, and distilled on ImageNet-22k then fine-tuned on 1k. timm's default_cfgs record no accuracy: top1 is the
# authors' (their README's model table, 224x224).
_W = partial(timm_weights, crop_pct=0.95, origin="https://github.com/microsoft/Cream/tree/main/TinyViT")

# name: (table, pretrained weights)
VARIANTS = {
    "tiny_vit_5m_224": (TINY_VIT_5M, (_W("tiny_vit_5m_224", "in1k", top1=79.1),
                                      _W("tiny_vit_5m_224", "dist_in22k_ft_in1k", top1=80.7))),
    "tiny_vit_11m_224": (TINY_VIT_11M, (_W("tiny_vit_11m_224", "in1k", top1=81.5),
                                        _W("tiny_vit_11m_224", "dist_in22k_ft_in1k", top1=83.2))),
    "tiny_vit_21m_224": (TINY_VIT_21M, (_W("tiny_vit_21m_224", "in1k", top1=83.1),
                                        _W("tiny_vit_21m_224", "dist_in22k_ft_in1k", top1=84.8))),
}


def _build(table: Stages, **overrides) -> TinyViT:
    return TinyViT(**{**dict(stages=table), **overrides})


for _name, (_table, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="tiny_vit", input_size=(224, 224), interpolation="bicubic", crop_pct=0.95,
            first_conv="patch_embed/conv1/linear", classifier="head/fc", feature_info=feature_info(_table),
            paper="arXiv:2207.10666 model variants", twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _table))
