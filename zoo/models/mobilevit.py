"""MobileViT v1 (Mehta & Rastegari, "MobileViT: Light-weight, General-purpose, and Mobile-friendly Vision
Transformer", arXiv:2110.02178), the XXS / XS / S variants as timm builds them (`timm/models/mobilevit.py`).

The network is MobileNetV2 inverted residuals (timm's byobnet "bottle" block with the expansion applied to the input
width, depthwise kxk, linear output) and MobileViT blocks: a local kxk conv and a 1x1 projection to the transformer
width, unfold into 2x2 patches, a ViT encoder run across patches for every pixel position inside a patch, fold back,
project to the block width and fuse with the block input by a kxk conv on their concatenation.

Parameter names mirror timm's module names (`stem/conv`, `stages_2/block_1/transformer_0/attn/qkv`, `final_conv/bn`,
`head/fc`), so the timm key map is a few substitutions (`timm_rename` below).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.config import FeatureInfo, ModelCfg
from zoo.inputs import check_images
from zoo.layers.activations import get_act
from zoo.layers.blocks import drop_path
from zoo.layers.conv import Conv2d
from zoo.layers.norm import BN_EPS_TORCH, batch_norm
from zoo.layers import kinds
from zoo.models.mobilenet_base import make_divisible
from zoo.models._pretrained import timm_weights
from zoo.models.heads import ClassifierHead, feature_dict
from zoo.registry import register_model

ModuleDef = Any
LN_EPS_TORCH = 1e-5  # torch.nn.LayerNorm default


@dataclass(frozen=True)
class IRSpec:
    """Inverted residual: 1x1 expand (expansion x *input* width) -> depthwise kxk (stride) -> 1x1 linear."""

    out_chs: int
    stride: int = 1
    expand: float = 4.0
    kernel: int = 3


@dataclass(frozen=True)
class MViTSpec:
    """MobileViT block (stride 1, output width = input width unless `out_chs` differs)."""

    out_chs: int
    transformer_dim: int
    depth: int
    patch_size: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    kernel: int = 3
    stride: int = 1


def ir(d: int, c: int, s: int, e: float = 4.0) -> tuple[IRSpec, ...]:
    """`d` inverted residuals to width `c`; the first has stride `s`."""
    return tuple(IRSpec(c, s if i == 0 else 1, e) for i in range(d))


def mvit(c: int, s: int, dim: int, depth: int, e: float = 4.0) -> tuple[IRSpec | MViTSpec, ...]:
    """A downsampling inverted residual, then a MobileViT block with a `depth`-layer transformer of width `dim`."""
    return ir(1, c, s, e) + (MViTSpec(c, dim, depth),)


# arXiv:2110.02178 Table 4 (Appendix A), 256x256 input. XXS expands by 2, XS and S by 4 (timm's `br`).
XXS = (
    ir(1, 16, 1, 2.0),  # stage 0, 128x128 in
    ir(3, 24, 2, 2.0),  # stage 1, 128x128 in
    mvit(48, 2, 64, 2, 2.0),  # stage 2, 64x64 in
    mvit(64, 2, 80, 4, 2.0),  # stage 3, 32x32 in
    mvit(80, 2, 96, 3, 2.0),  # stage 4, 16x16 in
)
XS = (
    ir(1, 32, 1),  # stage 0, 128x128 in
    ir(3, 48, 2),  # stage 1, 128x128 in
    mvit(64, 2, 96, 2),  # stage 2, 64x64 in
    mvit(80, 2, 120, 4),  # stage 3, 32x32 in
    mvit(96, 2, 144, 3),  # stage 4, 16x16 in
)
S = (
    ir(1, 32, 1),  # stage 0, 128x128 in
    ir(3, 64, 2),  # stage 1, 128x128 in
    mvit(96, 2, 144, 2),  # stage 2, 64x64 in
    mvit(128, 2, 192, 4),  # stage 3, 32x32 in
    mvit(160, 2, 240, 3),  # stage 4, 16x16 in
)

Stages = tuple[tuple[IRSpec | MViTSpec, ...], ...]


def feature_info(stages: Stages, stem_stride: int = 2) -> tuple[FeatureInfo, ...]:
    """The last stage output at each stride.

    timm's `features_only` MobileViT returns `final_conv` (the 1x1 expansion to `num_features`) at stride 32; this
    returns the last stage there instead, as ml-cvnets' segmentation and detection heads use it.
    """
    infos, stride = [], stem_stride
    for i, blocks in enumerate(stages):
        stride *= blocks[0].stride
        nxt = stages[i + 1][0].stride if i + 1 < len(stages) else 2
        if nxt > 1:
            infos.append(FeatureInfo(f"stages_{i}", stride, blocks[-1].out_chs))
    return tuple(infos)


class ConvNormAct(nn.Module):
    """conv -> BN [-> act]; timm's ConvNormAct (children `conv`, `bn`)."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    act: str | None = "silu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(self.features, self.kernel, stride=self.stride, groups=self.groups, name="conv")(x)
        x = self.norm(use_running_average=not train, name="bn")(x)
        return get_act(self.act)(x) if self.act else x


class InvertedResidual(nn.Module):
    """timm byobnet BottleneckBlock with bottle_in=True, linear_out=True, group size 1, downsample='' (no projection
    shortcut: the residual is used only when stride is 1 and the width is kept)."""

    spec: IRSpec
    conv: ModuleDef
    norm: ModuleDef
    act: str = "silu"
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.spec
        in_chs = x.shape[-1]
        mid = make_divisible(in_chs * s.expand)
        shortcut = x
        x = ConvNormAct(mid, self.conv, self.norm, 1, act=self.act, name="conv1_1x1")(x, train)
        x = ConvNormAct(mid, self.conv, self.norm, s.kernel, s.stride, groups=mid, act=self.act,
                        name="conv2_kxk")(x, train)
        x = ConvNormAct(s.out_chs, self.conv, self.norm, 1, act=None, name="conv3_1x1")(x, train)
        # timm applies drop_path even without a shortcut (dropping the whole block output); only the residual is
        # dropped here. Eval is identical; the default rate is 0.
        if s.stride == 1 and in_chs == s.out_chs:
            x = drop_path(x, self.drop_path_rate, train, self) + shortcut
        return x


class Attention(nn.Module):
    """Multi-head self-attention written as reshapes, einsums and a softmax (no fused kernel), so it exports."""

    num_heads: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        head_dim = c // self.num_heads
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)  # timm's (3, heads, head_dim) channel order
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        attn = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k)
        attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
        x = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, c)
        return nn.Dense(c, dtype=self.dtype, name="proj")(x)


kinds.register(Attention, kinds.LayerKind("attention", int8="float"))  # softmax of activations: float in int8 files


class Mlp(nn.Module):
    hidden: int
    act: str = "silu"
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = get_act(self.act)(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        return nn.Dense(c, dtype=self.dtype, name="fc2")(x)


class TransformerBlock(nn.Module):
    """Pre-norm ViT block (timm vision_transformer.Block): x + attn(ln(x)), then x + mlp(ln(x))."""

    num_heads: int
    mlp_ratio: float = 2.0
    act: str = "silu"
    drop_path_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        ln = partial(nn.LayerNorm, epsilon=LN_EPS_TORCH, dtype=self.dtype)
        y = Attention(self.num_heads, self.dtype, name="attn")(ln(name="norm1")(x))
        x = x + drop_path(y, self.drop_path_rate, train, self)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.act, self.dtype, name="mlp")(ln(name="norm2")(x))
        return x + drop_path(y, self.drop_path_rate, train, self)


def _bilinear_indices(size_in: int, size_out: int):
    """Source indices and weights of torch's bilinear resize (align_corners=False, no antialias) along one axis."""
    scale = np.float32(size_in) / np.float32(size_out)  # float32 arithmetic, as torch's CPU kernel
    src = np.maximum((np.arange(size_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int32), size_in - 1)
    i1 = np.minimum(i0 + 1, size_in - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_bilinear(x, size: tuple[int, int]):
    """NHWC bilinear resize equal to torch `F.interpolate(mode="bilinear", align_corners=False)`.

    Written as constant-index gathers and a lerp per axis: `jax.image.resize` antialiases when shrinking, which
    torch's default does not.
    """
    for axis, out in zip((1, 2), size):
        if x.shape[axis] == out:
            continue
        i0, i1, w1 = _bilinear_indices(x.shape[axis], out)
        shape = [1] * x.ndim
        shape[axis] = out
        w1 = jnp.asarray(w1, x.dtype).reshape(shape)
        x = jnp.take(x, i0, axis=axis) * (1 - w1) + jnp.take(x, i1, axis=axis) * w1
    return x


def unfold(x, patch: int):
    """(B, H, W, C) -> (B * P, N, C): one sequence over the N patches for each of the P pixel positions in a patch.

    Sequence (b, i * patch + j) holds pixel (i, j) of every patch, patches in row-major order: timm's order. Done with
    5-D transposes at most (TFLite's TRANSPOSE limit in older runtimes).
    """
    b, h, w, c = x.shape
    nh, nw = h // patch, w // patch
    x = x.reshape(b * nh, patch, nw, patch, c).transpose(0, 1, 3, 2, 4)  # (B nh, ph, pw, nw, C)
    x = x.reshape(b, nh, patch * patch, nw * c).transpose(0, 2, 1, 3)  # (B, P, nh, nw C)
    return x.reshape(b * patch * patch, nh * nw, c)


def fold(x, batch: int, hw: tuple[int, int], patch: int):
    """Inverse of `unfold`: (B * P, N, C) -> (B, H, W, C)."""
    (h, w), c = hw, x.shape[-1]
    nh, nw = h // patch, w // patch
    x = x.reshape(batch, patch * patch, nh, nw * c).transpose(0, 2, 1, 3)  # (B, nh, P, nw C)
    x = x.reshape(batch * nh, patch, patch, nw, c).transpose(0, 1, 3, 2, 4)  # (B nh, ph, nw, pw, C)
    return x.reshape(batch, h, w, c)


class MobileViTBlock(nn.Module):
    """Local kxk conv -> 1x1 to the transformer width -> unfold -> transformer -> LayerNorm -> fold -> 1x1 back
    -> kxk fusion conv over concat(input, x).

    A feature map whose size is not a multiple of the patch size is resized (bilinear) up to the next multiple before
    unfolding and back after folding, as timm and ml-cvnets do.
    """

    spec: MViTSpec
    conv: ModuleDef
    norm: ModuleDef
    act: str = "silu"
    drop_path_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.spec
        shortcut = x
        in_chs = x.shape[-1]
        x = ConvNormAct(in_chs, self.conv, self.norm, s.kernel, s.stride, act=self.act, name="conv_kxk")(x, train)
        x = self.conv(s.transformer_dim, 1, name="conv_1x1")(x)

        b, h, w, _ = x.shape
        p = s.patch_size
        hp, wp = math.ceil(h / p) * p, math.ceil(w / p) * p
        x = resize_bilinear(x, (hp, wp))
        x = unfold(x, p)
        for k in range(s.depth):
            x = TransformerBlock(s.num_heads, s.mlp_ratio, self.act, self.drop_path_rate, self.dtype,
                                 name=f"transformer_{k}")(x, train)
        x = nn.LayerNorm(epsilon=LN_EPS_TORCH, dtype=self.dtype, name="norm")(x)
        x = fold(x, b, (hp, wp), p)
        x = resize_bilinear(x, (h, w))

        x = ConvNormAct(s.out_chs, self.conv, self.norm, 1, act=self.act, name="conv_proj")(x, train)
        x = jnp.concatenate([shortcut.astype(x.dtype), x], axis=-1)
        return ConvNormAct(s.out_chs, self.conv, self.norm, s.kernel, act=self.act, name="conv_fusion")(x, train)


class Stage(nn.Module):
    blocks: tuple[IRSpec | MViTSpec, ...]
    conv: ModuleDef
    norm: ModuleDef
    act: str
    drop_path_rates: tuple[float, ...]
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j, (spec, rate) in enumerate(zip(self.blocks, self.drop_path_rates)):
            if isinstance(spec, MViTSpec):
                block = MobileViTBlock(spec, self.conv, self.norm, self.act, rate, self.dtype, name=f"block_{j}")
            else:
                block = InvertedResidual(spec, self.conv, self.norm, self.act, rate, name=f"block_{j}")
            x = block(x, train)
        return x


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

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        check_images(x, self.in_chans, "MobileViT")
        conv = partial(Conv2d, dtype=self.dtype)
        norm = partial(batch_norm(self.bn_eps), dtype=self.dtype)
        x = ConvNormAct(self.stem_chs, conv, norm, 3, 2, act=self.act, name="stem")(x, train)
        # stochastic depth grows linearly over all blocks (a MobileViT block counts as one), as timm's ByobNet
        n_blocks = sum(len(s) for s in self.stages)
        rates = [self.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        names = [f.name for f in feature_info(self.stages)]
        seen, maps = 0, []
        for i, blocks in enumerate(self.stages):
            stage_rates = tuple(rates[seen:seen + len(blocks)])
            seen += len(blocks)
            x = Stage(blocks, conv, norm, self.act, stage_rates, self.dtype, name=f"stages_{i}")(x, train)
            if f"stages_{i}" in names:
                maps.append(x)
        x = ConvNormAct(self.num_features, conv, norm, 1, act=self.act, name="final_conv")(x, train)
        feats = feature_dict(names, maps, jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return ClassifierHead(self.num_classes, self.drop_rate, partial(nn.Dense, dtype=self.dtype), name="head")(
            feats, train)


def timm_rename(module: MobileViT):
    """timm ByobNet keys: `stages.{i}.{j}.<same names>`, `transformer.{k}` -> `transformer_{k}`; the rest 1:1."""

    def rename(path: str) -> str | None:
        path = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages_\1/block_\2/", path)
        path = re.sub(r"(^|/)transformer\.(\d+)\.", r"\1transformer_\2/", path)
        return path.replace(".", "/")

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
