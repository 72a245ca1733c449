"""The network shared by MobileNetV2, MobileNetV3 and EfficientNet(-Lite): stem, stages of blocks, head.

Family files describe their variants as tables of keyword rows (one `stage(kind="ir", repeat=2, ...)` per stage, as
in the papers' tables) and call `resolve_stages` with their width/depth multipliers; the result is a tuple of concrete
per-block configs that `MobileNet` builds from the shared block library (`zoo.layers.blocks`). Rounding follows timm's
EfficientNet builder exactly, so parameter counts match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from zoo.config import FeatureInfo
from zoo.inputs import check_images
from zoo.layers.activations import get_act
from zoo.layers.blocks import (ConvNormAct, DepthwiseSeparable, EdgeResidual, InvertedResidual, Stage,
                               UniversalInvertedResidual)
from zoo.layers.mixed_conv import MixedKernels, mixing
from zoo.models.backbone import feature_dict, layer_factories, stage_feature_info
from zoo.models.heads import classify


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round to the nearest multiple of `divisor`, never dropping more than 10% (the TF MobileNet rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


@dataclass(frozen=True, kw_only=True)
class BlockSpec:
    """One row of a stage table: `repeat` blocks of `kind` to width `out`, the first with `stride`.

    kind: "ds" (depthwise-separable), "ir" (inverted residual expanding the input width by `expand`), "er" (edge
    residual: the fused inverted residual, one kxk conv expanding by `expand`), "uir" (MobileNetV4's universal
    inverted bottleneck: a depthwise conv of `start_kernel` before the expansion and one of `kernel` after it, either
    0 for none) or "cn" (conv, BN, act). `se`: squeeze-excite ratio (0: none); `act` overrides the network activation for these blocks (e.g.
    ReLU in MobileNetV3's early stages). `pw_act`: a 'ds' block activates its pointwise output too (timm's 'dsa',
    MobileNetV1 and LCNet); `noskip`: no residual even where the shapes allow one.
    """

    kind: Literal["ds", "ir", "er", "uir", "cn"]
    repeat: int
    kernel: int | tuple[int, ...]
    stride: int
    out: int
    expand: float = 1.0
    se: float = 0.0
    act: str | None = None
    pw_act: bool = False
    noskip: bool = False
    skip: bool = False  # 'cn' only: add the input where the shapes allow (EfficientNetV2's first stage)
    # MixNet ('ir' only): a tuple `kernel` splits the depthwise conv into channel groups with these kernel sizes;
    # `exp_splits`/`pwl_splits` > 1 split the 1x1 expansion/projection into convs on that many channel groups
    exp_splits: int = 1
    pwl_splits: int = 1
    start_kernel: int = 0  # 'uir' only


def stage(*rows: BlockSpec, **row) -> tuple[BlockSpec, ...]:
    """One stage of a table: a single row by keyword (`stage(kind="ir", repeat=2, kernel=3, stride=2, expand=6,
    out=24)`), or several `BlockSpec` rows."""
    if rows and row:
        raise TypeError("stage() takes either BlockSpec rows or the keywords of one row, not both")
    if not rows:
        rows = (BlockSpec(**row),)
    return rows


@dataclass(frozen=True)
class Block:
    """A concrete block: channels rounded, stride applied to the first block of a stage only."""

    kind: str
    in_chs: int
    out_chs: int
    mid_chs: int
    kernel: int | tuple[int, ...]
    stride: int
    act: str
    se_chs: int
    pw_act: bool = False
    noskip: bool = False
    skip: bool = False
    exp_splits: int = 1
    pwl_splits: int = 1
    start_kernel: int = 0
    dilation: int = 1  # of the block's spatial convs (`dilate`)


def _scale_depth(specs: tuple[BlockSpec, ...], multiplier: float, trunc: str = "ceil") -> list[BlockSpec]:
    """Scale the repeats of one stage (EfficientNet's ceil rule, or rounding, which keeps short stages short as in
    TinyNet and MixNet-L; distributed over rows from the last)."""
    if trunc not in ("ceil", "round"):
        raise ValueError(f"depth_trunc must be 'ceil' or 'round', got {trunc!r}")
    repeats = [s.repeat for s in specs]
    total = sum(repeats)
    scaled_total = int(math.ceil(total * multiplier)) if trunc == "ceil" else max(1, round(total * multiplier))
    scaled = []
    for r in repeats[::-1]:
        rs = max(1, round(r / total * scaled_total))
        scaled.append(rs)
        total -= r
        scaled_total -= rs
    return [replace(s, repeat=1) for s, n in zip(specs, scaled[::-1]) for _ in range(n)]


def resolve_stages(
    table: tuple[tuple[BlockSpec, ...], ...],
    *,
    stem_chs: int,
    act: str,
    width: float = 1.0,
    depth: float = 1.0,
    fix_first_last: bool = False,
    se_from_exp: bool = False,
    se_round: Literal["round", "divisible"] = "round",
    depth_trunc: Literal["ceil", "round"] = "ceil",
    round_limit: float = 0.9,
) -> tuple[tuple[Block, ...], ...]:
    """Expand a stage table into concrete blocks (timm's `decode_arch_def` + `EfficientNetBuilder` semantics).

    `round_limit`: how far below the scaled width a rounded output or squeeze-excite width may fall (timm's
    `round_channels`; FBNetV3 uses 0.95). Expanded widths always use 0.9, as timm's blocks do."""
    in_chs = stem_chs
    stages = []
    for i, specs in enumerate(table):
        fixed = fix_first_last and i in (0, len(table) - 1)
        blocks = []
        for j, spec in enumerate(_scale_depth(specs, 1.0 if fixed else depth, depth_trunc)):
            out_chs = make_divisible(spec.out * width, round_limit=round_limit)
            mid_chs = make_divisible(in_chs * spec.expand) if spec.kind in ("ir", "er", "uir") else in_chs
            se_chs = 0
            if spec.se:
                ratio = spec.se if se_from_exp else spec.se / spec.expand
                rd = mid_chs * ratio
                se_chs = make_divisible(rd, round_limit=round_limit) if se_round == "divisible" else round(rd)
            blocks.append(
                Block(spec.kind, in_chs, out_chs, mid_chs, spec.kernel, spec.stride if j == 0 else 1,
                      spec.act or act, se_chs, spec.pw_act, spec.noskip, spec.skip, spec.exp_splits, spec.pwl_splits,
                      spec.start_kernel)
            )
            in_chs = out_chs
        stages.append(tuple(blocks))
    return tuple(stages)


def dilate(stages: tuple[tuple[Block, ...], ...], output_stride: int, dilate_first: bool = False,
           stem_stride: int = 2) -> tuple[tuple[Block, ...], ...]:
    """The blocks with every stride that would take the network past `output_stride` turned into dilation of the
    spatial convs from there on (DeepLab's atrous backbone, arXiv:1706.05587 Sec. 3.1), keeping the receptive field.

    `dilate_first`: the block whose stride is removed already uses the grown dilation (torchvision's
    `mobilenet_v3_large(dilated=True)`); otherwise it keeps the previous one and the blocks after it use the grown
    one (timm's `output_stride`)."""
    if output_stride not in (8, 16, 32) or output_stride < stem_stride:
        raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    stride, dilation, out = stem_stride, 1, []
    for blocks in stages:
        resolved = []
        for b in blocks:
            if b.stride > 1 and stride * b.stride > output_stride:
                grown = dilation * b.stride
                resolved.append(replace(b, stride=1, dilation=grown if dilate_first else dilation))
                dilation = grown
            else:
                stride *= b.stride
                resolved.append(replace(b, dilation=dilation))
        out.append(tuple(resolved))
    return tuple(out)


def feature_info(stages: tuple[tuple[Block, ...], ...], stem_stride: int = 2,
                 output_stride: int = 32) -> tuple[FeatureInfo, ...]:
    """The last stage output at each stride: what detection/segmentation heads take (timm's feature_info); the stem's
    output where it is the only stride-2 map (MobileNetV3-Small). With a dilated `output_stride`, the same entries
    at strides no larger than it."""
    infos = stage_feature_info(stages[0][0].in_chs, [b[0].stride for b in stages], [b[-1].out_chs for b in stages],
                               stem_stride)
    return tuple(replace(f, stride=min(f.stride, output_stride)) for f in infos)


class FoldedNorm(nn.Module):
    """A BatchNorm folded into the conv before it (a deploy form): the identity, no variables."""

    use_running_average: bool | None = None

    @nn.compact
    def __call__(self, x):
        return x


def _with_bias(conv):
    """`conv` with a bias always (where a folded BatchNorm's shift goes)."""
    return lambda *args, **kwargs: conv(*args, **{**kwargs, "use_bias": True})


def make_block(b: Block, drop_path_rate: float, *, conv, norm, se_act: str, se_gate: str, name: str,
               aa: str | None = None, layer_scale: float | None = None) -> nn.Module:
    """The module of one resolved block ('cn', 'ds', 'ir', 'er' or 'uir'), from the shared block library.

    `aa`: anti-aliased downsampling in strided 'cn', 'er' and 'uir' blocks; `layer_scale`: the init value of 'uir'
    blocks' layer scale (None: none)."""
    common = dict(conv=conv, norm=norm, kernel=b.kernel, stride=b.stride, act=b.act, name=name)
    if aa and b.kind in ("ds", "ir"):
        raise ValueError(f"block {name}: anti-aliased downsampling is built for 'cn', 'er' and 'uir' blocks only")
    if b.dilation > 1 and isinstance(b.kernel, int) and b.kernel > 1:  # 1x1 convs are the same at any dilation
        common["dilation"] = b.dilation
    elif b.dilation > 1 and isinstance(b.kernel, tuple):
        raise ValueError(f"block {name}: mixed-kernel convs are not built dilated (output_stride needs plain convs)")
    if b.kind == "cn":
        return ConvNormAct(b.out_chs, **common, norm_name="bn1", skip=b.skip, aa=aa)
    if b.kind == "uir":
        if b.se_chs:
            raise ValueError(f"block {name}: 'uir' blocks are built without squeeze-excite (MobileNetV4 has none)")
        return UniversalInvertedResidual(b.out_chs, b.mid_chs, **common, start_kernel=b.start_kernel,
                                         noskip=b.noskip, drop_path_rate=drop_path_rate, aa=aa,
                                         layer_scale=layer_scale)
    se = dict(se_chs=b.se_chs, se_act=se_act, se_gate=se_gate, drop_path_rate=drop_path_rate)
    if b.kind == "ds":
        return DepthwiseSeparable(b.out_chs, **common, **se, pw_act=b.pw_act, noskip=b.noskip)
    if b.kind == "er":
        return EdgeResidual(b.out_chs, b.mid_chs, **common, **se, noskip=b.noskip, aa=aa)
    if isinstance(b.kernel, tuple) or b.exp_splits > 1 or b.pwl_splits > 1:  # MixNet: mixed convs in the block
        common.update(conv=mixing(conv), kernel=MixedKernels(b.kernel) if isinstance(b.kernel, tuple) else b.kernel)
        se.update(exp_kernel=MixedKernels((1,) * b.exp_splits) if b.exp_splits > 1 else 1,
                  pw_kernel=MixedKernels((1,) * b.pwl_splits) if b.pwl_splits > 1 else 1)
    return InvertedResidual(b.out_chs, b.mid_chs, **common, **se, noskip=b.noskip)


class MobileNetHead(nn.Module):
    """The family's pre-logits layers and classifier under one scope `head` (`head/conv`, `head/bn`, `head/fc`: the
    names timm's and torchvision's checkpoints map to), called twice: on the last map with `pre_logits=True` (the
    backbone's `pre_logits`), then on the backbone's dict for the logits.

    head_type "efficientnet": 1x1 conv + BN + act, then global pool (MobileNetV2, EfficientNet).
    head_type "mobilenetv3": global pool, then 1x1 conv (with bias unless `head_bias=False`) + act, no BN
    (MobileNetV3; FBNetV3 without the bias), or with `head_norm` a BN before the act (MobileNetV4).
    head_type "pool": global pool only, `num_features` is the last stage's width (MobileNetV1 without a head conv).
    """

    num_features: int
    num_classes: int
    head_type: str
    act: str
    conv: Any
    norm: Any
    dense: Any = nn.Dense
    drop_rate: float = 0.0
    head_bias: bool = True
    head_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        if pre_logits:
            act = get_act(self.act)
            if self.head_type == "efficientnet":
                x = self.conv(self.num_features, 1, name="conv")(x)
                x = act(self.norm(use_running_average=not train, name="bn")(x))
                x = jnp.mean(x, axis=(1, 2), keepdims=True)
            elif self.head_type == "pool":
                x = jnp.mean(x, axis=(1, 2), keepdims=True)
            else:
                x = jnp.mean(x, axis=(1, 2), keepdims=True)
                x = self.conv(self.num_features, 1, use_bias=self.head_bias, name="conv")(x)
                if self.head_norm:
                    x = self.norm(use_running_average=not train, name="bn")(x)
                x = act(x)
            return x.reshape(x.shape[0], -1)
        return classify(x, self.num_classes, self.drop_rate, self.dense, train)  # `head/fc`


class MobileNet(nn.Module):
    """Backbone (stem conv -> stages -> pre-logits conv and pool) + classifier (`MobileNetHead`).

    `features=True`: the backbone's dict (`feature_info` names and `pre_logits`, see `zoo.models.heads`).
    `num_classes=0` returns the pre-logits.
    """

    stages: tuple[tuple[Block, ...], ...]
    stem_chs: int
    num_features: int
    head_type: Literal["efficientnet", "mobilenetv3", "pool"]
    act: str
    se_act: str = "relu"
    se_gate: str = "sigmoid"
    padding: str = "symmetric"  # "same" for weights ported from TensorFlow
    bn_eps: float = 1e-5
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    head_bias: bool = True  # the "mobilenetv3" head conv's bias
    head_norm: bool = False  # a BatchNorm after the "mobilenetv3" head conv (MobileNetV4)
    aa: str | None = None  # anti-aliased downsampling in the blocks ("avg" or "blur", see `zoo.layers.blocks`)
    layer_scale: float | None = None  # 'uir' blocks' layer scale init value (None: no layer scale)
    # dilated output stride 8 or 16 for dense prediction (see `dilate`); the feature dict keeps its names
    output_stride: int = 32
    dilate_first: bool = False
    # stages whose first block's expansion (after conv_pw, bn1, act) the feature dict also returns, keyed
    # "<stage>.expansion": torchvision SSDLite's C4 is "stages_5.expansion" (timm's feature_location="expansion"
    # taps later, at the projection's input)
    expansion_taps: tuple[str, ...] = ()
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); parameters stay float32
    # injected layer factories (None: the defaults; see `zoo.models.backbone.layer_factories`)
    conv: Any = None
    norm: Any = None
    dense: Any = None
    # every BatchNorm folded into the conv before it: convs with a bias, norms the identity (MixNet's deploy form,
    # whose variables its re-parameterization gives; other families fold through `compress.fold_bn` instead)
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        check_images(x, self.in_chans, type(self).__name__)
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype,
                                            padding=self.padding)
        head_conv = conv  # the "mobilenetv3" head conv has no BatchNorm to fold: its bias stays as built
        if self.deploy:
            conv, norm = _with_bias(conv), FoldedNorm
        x = ConvNormAct(self.stem_chs, conv, norm, kernel=3, stride=2, act=self.act, norm_name="bn1", name="stem")(
            x, train)
        make = partial(make_block, conv=conv, norm=norm, se_act=self.se_act, se_gate=self.se_gate, aa=self.aa,
                       layer_scale=self.layer_scale)
        stages = self.stages if self.output_stride == 32 else dilate(self.stages, self.output_stride, self.dilate_first)
        n_blocks = sum(len(s) for s in stages)
        names = [f.name for f in feature_info(self.stages)]  # the undilated network's: the same keys at any stride
        unknown = set(self.expansion_taps) - {f"stages_{i}" for i in range(len(stages))}
        if unknown:
            raise ValueError(f"expansion_taps {sorted(unknown)}: not stages of this network (stages_0..stages_"
                             f"{len(stages) - 1})")
        seen, maps, taps = 0, [x] if "stem" in names else [], {}
        for i, blocks in enumerate(stages):
            # stochastic depth grows linearly with block index (EfficientNet)
            rates = tuple(self.drop_path_rate * (seen + j) / n_blocks for j in range(len(blocks)))
            seen += len(blocks)
            stage_module = Stage(blocks, make, rates, name=f"stages_{i}")
            if f"stages_{i}" in self.expansion_taps:
                x, taps[f"stages_{i}.expansion"] = stage_module(x, train, tap_expansion=True)
            else:
                x = stage_module(x, train)
            if f"stages_{i}" in names:
                maps.append(x)
        head = MobileNetHead(self.num_features, self.num_classes, self.head_type, self.act,
                             head_conv if self.head_type == "mobilenetv3" and not self.head_norm else conv, norm,
                             dense, self.drop_rate, self.head_bias, self.head_norm, name="head")
        feats = feature_dict(names, maps, head(x, train, pre_logits=True))
        if taps:
            feats = {**taps, **feats}
        if features:
            return feats
        return head(feats, train)
