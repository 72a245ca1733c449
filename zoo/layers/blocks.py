"""Blocks of the MobileNet / EfficientNet family (same structure and parameter names as timm's, so weights map 1:1).

Every block takes injected `conv` and `norm` factories (flax examples' ModuleDef pattern), so quantized or sparse
layers slot in without forking a model, and a `train` flag that switches BatchNorm to batch statistics.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.layers.activations import get_act
from zoo.layers.scale import LayerScale

ModuleDef = Any


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce (bias) -> act -> 1x1 expand (bias) -> gate, multiplied onto the input."""

    rd_channels: int
    conv: ModuleDef
    act: str = "relu"
    gate: str = "sigmoid"

    @nn.compact
    def __call__(self, x):
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = self.conv(self.rd_channels, 1, use_bias=True, name="conv_reduce")(s)
        s = get_act(self.act)(s)
        s = self.conv(x.shape[-1], 1, use_bias=True, name="conv_expand")(s)
        return x * get_act(self.gate)(s)


def _avg_pool_2x2(x):
    """2x2 average pooling, stride 2, an odd last row/column dropped (torch `AvgPool2d(2)`)."""
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _blur_pool_2x(x):
    """The 3x3 binomial blur ([1, 2, 1] / 4 in each direction), stride 2, zero padding 1 (timm's 'blurpc' BlurPool2d):
    a fixed depthwise filter, no parameters."""
    c = x.shape[-1]
    taps = np.array([1.0, 2.0, 1.0]) / 4
    # HWIO, one filter per channel, built in numpy: the exported graph holds it as one constant (tiled in the traced
    # graph it became a BROADCAST_TO feeding the depthwise conv, which XNNPACK does not take)
    kernel = jnp.asarray(np.tile((taps[:, None] * taps[None, :])[:, :, None, None], (1, 1, 1, c)), x.dtype)
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)), feature_group_count=c,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Anti-aliased downsampling (Zhang, "Making Convolutional Networks Shift-Invariant Again", arXiv:1904.11486): a
# strided conv becomes the stride-1 conv, its norm and act, then one of these low-pass stride-2 pools.
ANTIALIAS = {"avg": _avg_pool_2x2, "blur": _blur_pool_2x}


def antialias_pool(aa: str):
    if aa not in ANTIALIAS:
        raise ValueError(f"unknown anti-aliasing pool {aa!r}; expected one of {sorted(ANTIALIAS)}")
    return ANTIALIAS[aa]


def dilated(dilation: int) -> dict:
    """The conv factory keyword for a dilated spatial conv; none at dilation 1, so factories without the option
    (quantized, mixed) keep working for every undilated network."""
    return {"dilation": dilation} if dilation != 1 else {}


def drop_path(x, rate: float, train: bool, module: nn.Module):
    """Stochastic depth on the residual branch (per sample), active only in training."""
    if not train or rate == 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0.0)


class ConvNormAct(nn.Module):
    """conv -> norm [-> act] [+ skip]: stems, 'cn' blocks, 1x1 projections, MobileViT's convolutions.

    `norm_name` is there because parameter names are the checkpoint format: timm's EfficientNet/MobileNet stems and
    'cn' blocks name the norm `bn1` (`conv_stem`/`bn1`), its ConvNormAct (byobnet, MobileViT) names it `bn`.
    """

    out_chs: int
    conv: ModuleDef
    norm: ModuleDef
    kernel: int = 1
    stride: int = 1
    groups: int = 1
    act: str | None = "relu"  # None: no activation (a linear projection)
    skip: bool = False
    norm_name: str = "bn"
    aa: str | None = None  # a strided conv downsamples by this anti-aliasing pool after its act instead
    dilation: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        shortcut = x
        pool = antialias_pool(self.aa) if self.aa and self.stride > 1 else None
        x = self.conv(self.out_chs, self.kernel, stride=1 if pool else self.stride, groups=self.groups,
                      name="conv", **dilated(self.dilation))(x)
        x = self.norm(use_running_average=not train, name=self.norm_name)(x)
        if self.act:
            x = get_act(self.act)(x)
        if pool:
            if self.stride != 2:
                raise ValueError(f"anti-aliased downsampling is by 2, not {self.stride}")
            x = pool(x)
        if self.skip and self.stride == 1 and shortcut.shape[-1] == self.out_chs:
            x = x + shortcut
        return x


class DepthwiseSeparable(nn.Module):
    """dw conv -> BN -> act -> [SE] -> pw conv -> BN (-> act if pw_act) [+ skip] (MobileNetV1 block, 'ds')."""

    out_chs: int
    conv: ModuleDef
    norm: ModuleDef
    kernel: int = 3
    stride: int = 1
    act: str = "relu"
    se_chs: int = 0  # squeeze-excite reduced channels; 0: no SE
    se_act: str = "relu"
    se_gate: str = "sigmoid"
    pw_act: bool = False
    noskip: bool = False
    drop_path_rate: float = 0.0
    dilation: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_chs = x.shape[-1]
        shortcut = x
        act = get_act(self.act)
        x = self.conv(in_chs, self.kernel, stride=self.stride, groups=in_chs, name="conv_dw",
                      **dilated(self.dilation))(x)
        x = act(self.norm(use_running_average=not train, name="bn1")(x))
        if self.se_chs:
            x = SqueezeExcite(self.se_chs, self.conv, self.se_act, self.se_gate, name="se")(x)
        x = self.conv(self.out_chs, 1, name="conv_pw")(x)
        x = self.norm(use_running_average=not train, name="bn2")(x)
        if self.pw_act:
            x = act(x)
        if self.stride == 1 and in_chs == self.out_chs and not self.noskip:
            x = drop_path(x, self.drop_path_rate, train, self) + shortcut
        return x


class InvertedResidual(nn.Module):
    """pw expand -> BN -> act -> dw -> BN -> act -> [SE] -> pw linear -> BN [+ skip] (MobileNetV2 block, 'ir').

    The one inverted residual of the zoo: MobileNetV2/V3 and EfficientNet ('ir' rows, `mid_chs` from the expansion
    of the input width rounded by the family's rule) and MobileViT (timm byobnet's bottleneck with `bottle_in=True`,
    `linear_out=True`, whose checkpoint names its converter maps onto these).
    """

    out_chs: int
    mid_chs: int
    conv: ModuleDef
    norm: ModuleDef
    kernel: int = 3
    stride: int = 1
    act: str = "relu"
    se_chs: int = 0
    se_act: str = "relu"
    se_gate: str = "sigmoid"
    noskip: bool = False
    drop_path_rate: float = 0.0
    # kernel sizes of the 1x1 convs as the conv factory takes them (MixNet: `zoo.layers.mixed_conv.MixedKernels`)
    exp_kernel: Any = 1
    pw_kernel: Any = 1
    dilation: int = 1  # of the depthwise conv

    @nn.compact
    def __call__(self, x, train: bool = False, return_expansion: bool = False):
        """`return_expansion`: also return the expanded map (after conv_pw, bn1 and the act): torchvision SSDLite's
        C4 feature."""
        in_chs = x.shape[-1]
        shortcut = x
        act = get_act(self.act)
        x = self.conv(self.mid_chs, self.exp_kernel, name="conv_pw")(x)
        x = expanded = act(self.norm(use_running_average=not train, name="bn1")(x))
        x = self.conv(self.mid_chs, self.kernel, stride=self.stride, groups=self.mid_chs, name="conv_dw",
                      **dilated(self.dilation))(x)
        x = act(self.norm(use_running_average=not train, name="bn2")(x))
        if self.se_chs:
            x = SqueezeExcite(self.se_chs, self.conv, self.se_act, self.se_gate, name="se")(x)
        x = self.conv(self.out_chs, self.pw_kernel, name="conv_pwl")(x)
        x = self.norm(use_running_average=not train, name="bn3")(x)
        # only the residual branch is dropped; timm's byobnet also drops the output of blocks without a shortcut
        # (MobileViT's downsampling blocks). Eval is identical.
        if self.stride == 1 and in_chs == self.out_chs and not self.noskip:
            x = drop_path(x, self.drop_path_rate, train, self) + shortcut
        return (x, expanded) if return_expansion else x


class EdgeResidual(nn.Module):
    """kxk conv expand -> BN -> act -> [SE] -> pw linear -> BN [+ skip] ('er': the fused MBConv of EfficientNetV2 and
    MobileNetV4's FusedIB): the inverted residual with its pw expansion and dw conv fused into one full conv."""

    out_chs: int
    mid_chs: int
    conv: ModuleDef
    norm: ModuleDef
    kernel: int = 3
    stride: int = 1
    act: str = "relu"
    se_chs: int = 0
    se_act: str = "relu"
    se_gate: str = "sigmoid"
    noskip: bool = False
    drop_path_rate: float = 0.0
    aa: str | None = None  # anti-aliased downsampling (see `ConvNormAct`)
    dilation: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_chs = x.shape[-1]
        shortcut = x
        act = get_act(self.act)
        pool = antialias_pool(self.aa) if self.aa and self.stride > 1 else None
        x = self.conv(self.mid_chs, self.kernel, stride=1 if pool else self.stride, name="conv_exp",
                      **dilated(self.dilation))(x)
        x = act(self.norm(use_running_average=not train, name="bn1")(x))
        if pool:
            x = pool(x)
        if self.se_chs:
            x = SqueezeExcite(self.se_chs, self.conv, self.se_act, self.se_gate, name="se")(x)
        x = self.conv(self.out_chs, 1, name="conv_pwl")(x)
        x = self.norm(use_running_average=not train, name="bn2")(x)
        if self.stride == 1 and in_chs == self.out_chs and not self.noskip:
            x = drop_path(x, self.drop_path_rate, train, self) + shortcut
        return x


class UniversalInvertedResidual(nn.Module):
    """[dw start -> BN] -> pw expand -> BN -> act -> [dw mid -> BN -> act] -> pw linear -> BN [+ skip] ('uir': the
    Universal Inverted Bottleneck of MobileNetV4). Its optional depthwise convs give the inverted residual (mid only),
    ConvNeXt-like (start only), ExtraDW (both) and FFN (neither) blocks. Each stage is a `ConvNormAct` named as timm's
    (`dw_start`, `pw_exp`, `dw_mid`, `pw_proj`, each with `conv` and `bn`).
    """

    out_chs: int
    mid_chs: int
    conv: ModuleDef
    norm: ModuleDef
    start_kernel: int = 0  # 0: no depthwise conv before the expansion
    kernel: int = 3  # the middle depthwise conv's kernel; 0: none
    stride: int = 1
    act: str = "relu"
    noskip: bool = False
    drop_path_rate: float = 0.0
    aa: str | None = None  # anti-aliased downsampling in the strided depthwise conv (see `ConvNormAct`)
    layer_scale: float | None = None  # init value of a per-channel gain on the residual branch (`layer_scale/gamma`)
    dilation: int = 1  # of the depthwise convs

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.stride > 1 and not (self.start_kernel or self.kernel):
            raise ValueError("a strided 'uir' block needs a start or middle depthwise conv to downsample")
        in_chs = x.shape[-1]
        shortcut = x
        if self.start_kernel:  # downsamples only where no middle conv follows (timm)
            x = ConvNormAct(in_chs, self.conv, self.norm, self.start_kernel, 1 if self.kernel else self.stride,
                            groups=in_chs, act=None, aa=self.aa, dilation=self.dilation, name="dw_start")(x, train)
        x = ConvNormAct(self.mid_chs, self.conv, self.norm, 1, act=self.act, name="pw_exp")(x, train)
        if self.kernel:
            x = ConvNormAct(self.mid_chs, self.conv, self.norm, self.kernel, self.stride, groups=self.mid_chs,
                            act=self.act, aa=self.aa, dilation=self.dilation, name="dw_mid")(x, train)
        x = ConvNormAct(self.out_chs, self.conv, self.norm, 1, act=None, name="pw_proj")(x, train)
        if self.layer_scale is not None:
            x = LayerScale(self.layer_scale, name="layer_scale")(x)
        if self.stride == 1 and in_chs == self.out_chs and not self.noskip:
            x = drop_path(x, self.drop_path_rate, train, self) + shortcut
        return x


class Stage(nn.Module):
    """Blocks `block_0`, `block_1`, ... in sequence: `make(spec, drop_path_rate, name=...)` builds each from its spec.

    Every family's stages are this module, so passes that follow a residual stream through a stage (the int8 row
    split) see them alike.
    """

    blocks: tuple[Any, ...]
    make: Callable[..., nn.Module]
    drop_path_rates: tuple[float, ...]

    @nn.compact
    def __call__(self, x, train: bool = False, tap_expansion: bool = False):
        """`tap_expansion`: return `(output, expanded map of the first block)` (an `InvertedResidual`'s
        `return_expansion`)."""
        if len(self.drop_path_rates) != len(self.blocks):
            raise ValueError(f"{len(self.blocks)} blocks but {len(self.drop_path_rates)} drop-path rates")
        tap = None
        for j, (spec, rate) in enumerate(zip(self.blocks, self.drop_path_rates)):
            block = self.make(spec, rate, name=f"block_{j}")
            if tap_expansion and j == 0:
                if not isinstance(block, InvertedResidual):
                    raise ValueError(f"{self.name}: an expansion tap needs an inverted residual first block, not "
                                     f"{type(block).__name__}")
                x, tap = block(x, train, return_expansion=True)
            else:
                x = block(x, train)
        return (x, tap) if tap_expansion else x
