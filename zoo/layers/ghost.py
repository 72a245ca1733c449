"""Ghost modules: a few "intrinsic" feature maps from a 1x1 conv, the rest from a cheap depthwise conv of them.

- `GhostModule` (Han et al., "GhostNet: More Features from Cheap Operations", arXiv:1911.11907, Fig. 2): primary
  1x1 conv + BN [+ act] to ceil(out/2) maps (`primary_conv`), a depthwise conv + BN [+ act] of those
  (`cheap_operation`), both concatenated. With `dfc=True` the output is gated by DFC attention (GhostNetV2, Tang et
  al., arXiv:2211.12905, Fig. 4: `DFCAttention`); with `num_conv_branches > 0` the primary and cheap convs are
  re-parameterizable sums of branches (GhostNetV3, Liu et al., arXiv:2404.11202, Fig. 2: `RepBranches`).
- `RepGhostModule` (Chen et al., "RepGhost: A Hardware-Efficient Ghost Module via Re-parameterization",
  arXiv:2211.06088, Fig. 3): the cheap depthwise conv *adds* a BatchNorm of its input instead of concatenating it, and
  that sum re-parameterizes into the depthwise conv.
- `GhostBottleneck`: ghost module -> [strided depthwise conv + BN] -> [SE] -> linear ghost module, plus a shortcut
  (identity, or depthwise conv + BN + 1x1 conv + BN where width or resolution change), in every variant.

`RepBranches` is the one re-parameterizable layer here (registered in the layer-kinds table): `num_conv_branches`
kxk conv + BN branches, optionally a 1x1 conv + BN and a BatchNorm identity, summed; deployed (`deploy=True`) it is one
kxk conv with a bias, `reparam_conv`. Its children carry `MobileOneBlock`'s names (`conv_kxk_{i}`, `conv_scale`,
`identity`), so one fusion (`MobileOneBlock.reparameterize`) serves both families. Unlike `MobileOneBlock`, which
branches exist is stated, not inferred from shapes: GhostNetV3's primary conv has no identity branch even where it
keeps the width, and RepGhost's cheap conv has no 1x1 branch.

Parameter names follow timm's modules (`primary_conv/conv`, `cheap_operation/bn`, `short_conv`, `shortcut`) where
the structure is the same; the family converters map the rest.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.layers import kinds
from zoo.layers.activations import get_act
from zoo.layers.blocks import ConvNormAct, SqueezeExcite
from zoo.layers.reparam import ConvBn, MobileOneBlock

ModuleDef = Any


class RepBranches(nn.Module):
    """Summed linear branches (training form) or the one conv with a bias they fuse to (`deploy=True`); no activation.

    Branches: `num_conv_branches` x (kxk conv + BN) `conv_kxk_{i}`, a 1x1 conv + BN `conv_scale` when `scale`, a
    BatchNorm of the input `identity` when `identity` (needs stride 1 and as many output channels as input ones).
    The 1x1 branch reads the centre tap of the kxk window (PyTorch-symmetric padding), which the fusion relies on.
    """

    features: int
    kernel_size: int
    conv: ModuleDef
    norm: ModuleDef
    stride: int = 1
    groups: int = 1
    num_conv_branches: int = 1
    scale: bool = False
    identity: bool = False
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        k, s, g = self.kernel_size, self.stride, self.groups
        if self.deploy:
            return self.conv(self.features, k, stride=s, groups=g, use_bias=True, name="reparam_conv")(x)
        if self.num_conv_branches < 1:
            raise ValueError(f"{self.name}: RepBranches needs at least one kxk branch, got {self.num_conv_branches}")
        out = None
        if self.identity:
            if s != 1 or x.shape[-1] != self.features:
                raise ValueError(f"{self.name}: an identity branch needs stride 1 and {self.features} input channels, "
                                 f"got stride {s} and {x.shape[-1]}")
            out = self.norm(use_running_average=not train, name="identity")(x)
        if self.scale:
            y = ConvBn(self.features, self.conv, self.norm, 1, s, g, name="conv_scale")(x, train)
            out = y if out is None else out + y
        for i in range(self.num_conv_branches):
            y = ConvBn(self.features, self.conv, self.norm, k, s, g, name=f"conv_kxk_{i}")(x, train)
            out = y if out is None else out + y
        return out


def _reparameterize_branches(module: RepBranches, variables: dict) -> dict:
    eps = float(module.norm(use_running_average=True).epsilon)  # an unbound module is a plain dataclass
    return MobileOneBlock.reparameterize(variables, eps=eps)


kinds.register(RepBranches, kinds.LayerKind("reparam", reparameterize=_reparameterize_branches))


def avg_pool_2x2(x):
    """2x2 average pooling with stride 2, dropping an odd last row/column (torch `avg_pool2d(x, 2, 2)`).

    Written with 4-D reshapes, channel/row slices and adds, which the TFLite converter's XNNPACK delegate runs in
    float and int8 alike (its int8 AVERAGE_POOL_2D is not delegated, nor are strided slices): pairs of columns
    become the two halves of the channels, pairs of rows the two halves of the columns, each pair summed."""
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, :2 * h2, :2 * w2]
    cols = x.reshape(n, 2 * h2, w2, 2 * c)
    x = cols[..., :c] + cols[..., c:]
    rows = x.reshape(n, h2, 2 * w2, c)
    return (rows[:, :, :w2] + rows[:, :, w2:]) * 0.25


def _upsample_nearest_axis(x, size: int, axis: int):
    """torch's 'nearest' resize of NHWC axis 1 or 2 from n to `size` in {2n, 2n + 1}: output i reads input
    floor(i * n / size).

    For 2n every input repeats twice: the map concatenated with itself along the next axis and reshaped (4-D ops, no
    gather). For 2n + 1 input 0 covers outputs 0..2 and every other input two: the doubled map with one more copy of
    the first row in front."""
    if axis not in (1, 2):
        raise ValueError(f"nearest upsampling resizes NHWC axis 1 or 2, got {axis}")
    n = x.shape[axis]
    if size not in (2 * n, 2 * n + 1):
        raise ValueError(f"nearest upsampling from {n} to {size}: only 2x (or 2x + 1) is supported")
    shape = list(x.shape)
    shape[axis] *= 2
    y = jnp.concatenate([x, x], axis=axis + 1).reshape(shape)
    if size == 2 * n + 1:
        y = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis), y], axis=axis)
    return y


class DFCAttention(nn.Module):
    """Decoupled fully connected attention (GhostNetV2, arXiv:2211.12905 Eq. 7): on the 2x2-pooled input a 1x1 conv
    + BN to `features`, a horizontal (1x5) and a vertical (5x1) depthwise conv + BN, sigmoid, then nearest upsampling
    to the input's size. Returns the gate (timm's `short_conv` computes its pre-sigmoid value)."""

    features: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        h, w = x.shape[1:3]
        if h < 2 or w < 2:
            raise ValueError(f"{self.name}: DFC attention pools 2x2 and needs maps of at least 2x2, got {h}x{w} "
                             "(use a larger input)")
        bn = lambda name: self.norm(use_running_average=not train, name=name)  # noqa: E731
        c = self.features
        y = bn("bn")(self.conv(c, 1, name="conv")(avg_pool_2x2(x)))
        y = bn("bn_h")(self.conv(c, (1, 5), groups=c, name="conv_h")(y))
        y = bn("bn_v")(self.conv(c, (5, 1), groups=c, name="conv_v")(y))
        gate = get_act("sigmoid")(y)
        return _upsample_nearest_axis(_upsample_nearest_axis(gate, h, 1), w, 2)


class GhostModule(nn.Module):
    """primary 1x1 conv to ceil(out/2) maps, a depthwise `dw_size` conv of those to as many more, concatenated and cut
    to `out_chs`; `act` after both convs (None: a linear module). `dfc`: multiplied by `DFCAttention` of the input
    (`short_conv`). `num_conv_branches > 0`: both convs are `RepBranches` (GhostNetV3: the primary sums that many 1x1
    branches, the cheap conv as many kxk branches, a 1x1 branch and a BatchNorm identity)."""

    out_chs: int
    conv: ModuleDef
    norm: ModuleDef
    act: str | None = "relu"
    dw_size: int = 3
    dfc: bool = False
    num_conv_branches: int = 0
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        init_chs = math.ceil(self.out_chs / 2)
        if self.num_conv_branches:
            act = get_act(self.act or "identity")
            rep = dict(conv=self.conv, norm=self.norm, num_conv_branches=self.num_conv_branches, deploy=self.deploy)
            x1 = act(RepBranches(init_chs, 1, **rep, name="primary_conv")(x, train))
            x2 = act(RepBranches(init_chs, self.dw_size, groups=init_chs, scale=True, identity=True, **rep,
                                 name="cheap_operation")(x1, train))
        else:
            x1 = ConvNormAct(init_chs, self.conv, self.norm, act=self.act, name="primary_conv")(x, train)
            x2 = ConvNormAct(init_chs, self.conv, self.norm, kernel=self.dw_size, groups=init_chs, act=self.act,
                             name="cheap_operation")(x1, train)
        out = jnp.concatenate([x1, x2], axis=-1)[..., :self.out_chs]
        if self.dfc:
            out = out * DFCAttention(self.out_chs, self.conv, self.norm, name="short_conv")(x, train)
        return out


class RepGhostModule(nn.Module):
    """primary 1x1 conv + BN [+ ReLU] to `out_chs` maps, then a depthwise `dw_size` conv + BN of them plus a BatchNorm
    of them (`cheap_operation`, a `RepBranches`: one conv with a bias when deployed) [+ ReLU]."""

    out_chs: int
    conv: ModuleDef
    norm: ModuleDef
    relu: bool = True
    dw_size: int = 3
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = "relu" if self.relu else None
        x = ConvNormAct(self.out_chs, self.conv, self.norm, act=act, name="primary_conv")(x, train)
        x = RepBranches(self.out_chs, self.dw_size, self.conv, self.norm, groups=self.out_chs, identity=True,
                        deploy=self.deploy, name="cheap_operation")(x, train)
        return get_act(act or "identity")(x)


class GhostShortcut(nn.Module):
    """The projection shortcut of a ghost bottleneck: depthwise kxk conv (stride) + BN, then 1x1 conv + BN."""

    out_chs: int
    conv: ModuleDef
    norm: ModuleDef
    kernel: int = 3
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = self.conv(c, self.kernel, stride=self.stride, groups=c, name="conv_dw")(x)
        x = self.norm(use_running_average=not train, name="bn_dw")(x)
        x = self.conv(self.out_chs, 1, name="conv_pw")(x)
        return self.norm(use_running_average=not train, name="bn_pw")(x)


class GhostBottleneck(nn.Module):
    """ghost1 (expand to `mid_chs`, ReLU) -> [depthwise kxk conv (stride) + BN] -> [SE] -> ghost2 (to `out_chs`,
    linear) + shortcut.

    `module`: "ghost" (`GhostModule`; `dfc` gates ghost1 with DFC attention, `num_conv_branches > 0` makes both ghost
    modules and the strided depthwise conv re-parameterizable, GhostNetV3) or "repghost" (`RepGhostModule`).
    `se_chs`: reduced channels of the squeeze-excite (0: none), ReLU and hard-sigmoid gate as timm's GhostNet.
    """

    mid_chs: int
    out_chs: int
    conv: ModuleDef
    norm: ModuleDef
    kernel: int = 3
    stride: int = 1
    se_chs: int = 0
    module: str = "ghost"
    dfc: bool = False
    num_conv_branches: int = 0
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        cn = dict(conv=self.conv, norm=self.norm)
        if self.module == "ghost":
            ghost = dict(num_conv_branches=self.num_conv_branches, deploy=self.deploy, **cn)
            ghost1 = GhostModule(self.mid_chs, act="relu", dfc=self.dfc, **ghost, name="ghost1")
            ghost2 = GhostModule(self.out_chs, act=None, **ghost, name="ghost2")
        elif self.module == "repghost":
            if self.dfc or self.num_conv_branches:
                raise ValueError("a RepGhost bottleneck has neither DFC attention nor conv branches")
            ghost1 = RepGhostModule(self.mid_chs, relu=True, deploy=self.deploy, **cn, name="ghost1")
            ghost2 = RepGhostModule(self.out_chs, relu=False, deploy=self.deploy, **cn, name="ghost2")
        else:
            raise ValueError(f"GhostBottleneck module must be 'ghost' or 'repghost', got {self.module!r}")
        shortcut = x
        x = ghost1(x, train)
        if self.stride > 1:
            k, s, c = self.kernel, self.stride, self.mid_chs
            if self.num_conv_branches:
                x = RepBranches(c, k, stride=s, groups=c, num_conv_branches=self.num_conv_branches, scale=True,
                                deploy=self.deploy, **cn, name="conv_dw")(x, train)
            else:
                x = self.conv(c, k, stride=s, groups=c, name="conv_dw")(x)
                x = self.norm(use_running_average=not train, name="bn_dw")(x)
        if self.se_chs:
            x = SqueezeExcite(self.se_chs, self.conv, "relu", "hard_sigmoid", name="se")(x)
        x = ghost2(x, train)
        if self.stride == 1 and shortcut.shape[-1] == self.out_chs:
            return x + shortcut
        return x + GhostShortcut(self.out_chs, **cn, kernel=self.kernel, stride=self.stride, name="shortcut")(
            shortcut, train)
