"""ConvNeXt, small end (Liu et al., "A ConvNet for the 2020s", arXiv:2201.03545): timm's atto, femto, pico and nano
variants (`timm/models/convnext.py`) and their `_ols` forms with an overlapped 3x3 conv stem.

Stem (4x4/4 patchify conv + LayerNorm, or in `_ols` two 3x3/2 convs + LayerNorm), then four stages; stages 1-3 start
with LayerNorm + 2x2/2 conv. Each block: 7x7 depthwise conv -> LayerNorm over channels -> MLP (1x1 conv or Linear to
4x width, GELU, back) -> layer scale -> + input. Head: global pool -> LayerNorm -> Linear. Every LayerNorm has eps
1e-6. These variants use timm's `conv_mlp=True` (MLP as 1x1 convs, `fc1`/`fc2` kernels (1, 1, in, out));
`conv_mlp=False` builds the same MLP as Linear layers (kernels (in, out)), as timm's larger ConvNeXts.

No BatchNorm and no multi-branch block: the deploy form is the training form (`compress.deploy` leaves it as is).

Feature maps: the stages give strides 4-32. The patchify stem has no stride-2 output (as timm's feature_info, these
variants list none); the `_ols` stems' first conv (`stem_0`) is a real stride-2 map.

Parameter names follow timm's (`stem_0`, `stages_1/downsample_1`, `stages_2/blocks_3/mlp/fc1`, `.../layer_scale/gamma`,
`head/norm`, `head/fc`), so the timm key map is a few substitutions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import flax.linen as nn
import jax.numpy as jnp

from zoo.config import FeatureInfo, ModelCfg
from zoo.inputs import check_images
from zoo.layers.activations import get_act
from zoo.layers.blocks import Stage as BlockStage, drop_path
from zoo.layers.scale import LayerScale
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import feature_dict, layer_factories
from zoo.models.heads import classify
from zoo.models.mobilenet_base import make_divisible
from zoo.registry import register_model

LN_EPS = 1e-6  # timm's LayerNorm / LayerNorm2d default, used by every ConvNeXt norm

StemType = Literal["patch", "overlap", "overlap_tiered"]


@dataclass(frozen=True)
class Stage:
    """One stage: `depth` blocks of `dims` channels (stages after the first start with a 2x2/2 downsample)."""

    depth: int
    dims: int


def _table(depths, dims) -> tuple[Stage, ...]:
    return tuple(Stage(d, c) for d, c in zip(depths, dims))


# timm's small ConvNeXts (`convnext_atto` ... `convnext_nano` model_args; the paper's Table 9 starts at ConvNeXt-T,
# depths 3-3-9-3). 224x224 input: stages at 56x56, 28x28, 14x14, 7x7.
ATTO = _table((2, 2, 6, 2), (40, 80, 160, 320))
FEMTO = _table((2, 2, 6, 2), (48, 96, 192, 384))
PICO = _table((2, 2, 6, 2), (64, 128, 256, 512))
NANO = _table((2, 2, 8, 2), (80, 160, 320, 640))

Stages = tuple[Stage, ...]


def feature_info(stages: Stages, stem_type: StemType) -> tuple[FeatureInfo, ...]:
    first = () if stem_type == "patch" else (FeatureInfo("stem_0", 2, stem_mid_chs(stages, stem_type)),)
    return (*first, *(FeatureInfo(f"stages_{i}", 4 * 2 ** i, s.dims) for i, s in enumerate(stages)))


def stem_mid_chs(stages: Stages, stem_type: StemType) -> int:
    """Width of the overlapped stem's first conv: half the stem width, rounded to 8, in the tiered form."""
    return make_divisible(stages[0].dims // 2) if stem_type == "overlap_tiered" else stages[0].dims


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 over channels; as 1x1 convs (`conv_mlp`) or as Linear layers (timm's `Mlp`)."""

    hidden: int
    conv: Any
    dense: Any
    conv_mlp: bool = True

    @nn.compact
    def __call__(self, x):
        out = x.shape[-1]
        if self.conv_mlp:
            fc1, fc2 = (self.conv(self.hidden, 1, use_bias=True, name="fc1"),
                        self.conv(out, 1, use_bias=True, name="fc2"))
        else:
            fc1, fc2 = self.dense(self.hidden, name="fc1"), self.dense(out, name="fc2")
        return fc2(get_act("gelu")(fc1(x)))


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv (bias) -> LayerNorm -> MLP (4x) -> layer scale -> + input (timm's ConvNeXtBlock, stride 1)."""

    conv: Any
    dense: Any
    ln: Any
    kernel: int = 7
    mlp_ratio: float = 4.0
    conv_mlp: bool = True
    ls_init_value: float | None = 1e-6
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        shortcut = x
        x = self.conv(c, self.kernel, groups=c, use_bias=True, name="conv_dw")(x)
        x = self.ln(name="norm")(x)
        x = Mlp(int(self.mlp_ratio * c), self.conv, self.dense, self.conv_mlp, name="mlp")(x)
        if self.ls_init_value is not None:
            x = LayerScale(self.ls_init_value, name="layer_scale")(x)
        return drop_path(x, self.drop_path_rate, train, self) + shortcut


class ConvNeXtStage(nn.Module):
    """[LayerNorm -> 2x2/2 conv (`downsample_0`, `downsample_1`)] -> blocks (`blocks/block_{j}`)."""

    dims: int
    depth: int
    stride: int
    conv: Any
    dense: Any
    ln: Any
    conv_mlp: bool
    drop_path_rates: tuple[float, ...]

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.stride > 1 or x.shape[-1] != self.dims:
            x = self.ln(name="downsample_0")(x)
            k = 2 if self.stride > 1 else 1
            x = self.conv(self.dims, k, stride=self.stride, padding=0, use_bias=True, name="downsample_1")(x)
        make = partial(_make_block, conv=self.conv, dense=self.dense, ln=self.ln, conv_mlp=self.conv_mlp)
        return BlockStage(tuple(range(self.depth)), make, self.drop_path_rates, name="blocks")(x, train)


def _make_block(_spec, drop_path_rate: float, *, conv, dense, ln, conv_mlp: bool, name: str) -> nn.Module:
    return ConvNeXtBlock(conv, dense, ln, conv_mlp=conv_mlp, drop_path_rate=drop_path_rate, name=name)


class ConvNeXtHead(nn.Module):
    """Global pool -> LayerNorm (`head/norm`) -> dropout -> Linear (`head/fc`): timm's NormMlpClassifierHead without
    a hidden layer. `pre_logits=True`: the normalised pooled features."""

    num_classes: int
    ln: Any
    dense: Any
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        if pre_logits:
            return self.ln(name="norm")(jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        return classify(x, self.num_classes, self.drop_rate, self.dense, train)


class ConvNeXt(nn.Module):
    """Backbone (stem -> 4 stages -> pool -> LayerNorm: `pre_logits`) + classifier (fc). `features=True`: the
    backbone's dict (`zoo.models.heads`). `deploy` is accepted and changes nothing (no layer to fold)."""

    stages: Stages
    stem_type: StemType = "patch"
    conv_mlp: bool = True
    deploy: bool = False
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); parameters stay float32
    # injected layer factories (None: the defaults; see `zoo.models.backbone.layer_factories`); no BatchNorm here
    conv: Any = None
    norm: Any = None
    dense: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        check_images(x, self.in_chans, "ConvNeXt")
        if self.stem_type not in ("patch", "overlap", "overlap_tiered"):
            raise ValueError(f"ConvNeXt stem_type must be 'patch', 'overlap' or 'overlap_tiered', "
                             f"got {self.stem_type!r}")
        conv, _, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=LN_EPS, dtype=self.dtype)
        ln = partial(nn.LayerNorm, epsilon=LN_EPS, use_fast_variance=False, dtype=self.dtype)
        dims0 = self.stages[0].dims
        if self.stem_type == "patch":
            maps = []  # no stride-2 map in this stem
            x = conv(dims0, 4, stride=4, padding=0, use_bias=True, name="stem_0")(x)
            x = ln(name="stem_1")(x)
        else:
            x = conv(stem_mid_chs(self.stages, self.stem_type), 3, stride=2, use_bias=True, name="stem_0")(x)
            maps = [x]
            x = conv(dims0, 3, stride=2, use_bias=True, name="stem_1")(x)
            x = ln(name="stem_2")(x)
        # stochastic depth grows linearly over all blocks (timm's calculate_drop_path_rates)
        n_blocks = sum(s.depth for s in self.stages)
        rates = [self.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        seen = 0
        for i, s in enumerate(self.stages):
            x = ConvNeXtStage(s.dims, s.depth, 1 if i == 0 else 2, conv, dense, ln, self.conv_mlp,
                              tuple(rates[seen:seen + s.depth]), name=f"stages_{i}")(x, train)
            seen += s.depth
            maps.append(x)
        head = ConvNeXtHead(self.num_classes, ln, dense, self.drop_rate, name="head")
        feats = feature_dict([f.name for f in feature_info(self.stages, self.stem_type)], maps,
                             head(x, train, pre_logits=True))
        if features:
            return feats
        return head(feats, train)


def timm_rename(module: ConvNeXt):
    """timm keys: `stem.{n}` -> `stem_{n}`, `stages.{i}.downsample.{n}` -> `stages_{i}/downsample_{n}`,
    `stages.{i}.blocks.{j}` -> `stages_{i}/blocks/block_{j}`, a block's `gamma` -> `layer_scale/gamma`; the rest 1:1."""

    def rename(path: str) -> str | None:
        if re.fullmatch(r"stages\.\d+\.blocks\.\d+", path):  # the block's own parameter: its layer scale `gamma`
            path += ".layer_scale"
        path = re.sub(r"^stem\.(\d+)", r"stem_\1", path)
        path = re.sub(r"^stages\.(\d+)\.downsample\.(\d+)", r"stages_\1/downsample_\2", path)
        path = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)", r"stages_\1/blocks/block_\2", path)
        return path.replace(".", "/")

    return rename


# timm's own ImageNet-1k weights (and convnext_nano's ImageNet-12k pretraining fine-tuned on 1k). top1/top5: timm's
# results-imagenet.csv at the tag's input size.
_REL = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-rsb-weights/"
_W = partial(timm_weights, interpolation="bicubic")

# name: (table, stem type, pretrained weights)
VARIANTS = {
    "convnext_atto": (ATTO, "patch", (
        _W("convnext_atto", "d2_in1k", _REL + "convnext_atto_d2-01bb0f51.pth", crop_pct=0.875,
           top1=75.672, top5=92.914),)),
    "convnext_atto_ols": (ATTO, "overlap_tiered", (
        _W("convnext_atto_ols", "a2_in1k", _REL + "convnext_atto_ols_a2-78d1c8f3.pth", crop_pct=0.875,
           top1=75.902, top5=92.842),)),
    "convnext_femto": (FEMTO, "patch", (
        _W("convnext_femto", "d1_in1k", _REL + "convnext_femto_d1-d71d5b4c.pth", crop_pct=0.875,
           top1=77.498, top5=93.678),)),
    "convnext_femto_ols": (FEMTO, "overlap_tiered", (
        _W("convnext_femto_ols", "d1_in1k", _REL + "convnext_femto_ols_d1-246bf2ed.pth", crop_pct=0.875,
           top1=77.852, top5=93.826),)),
    "convnext_pico": (PICO, "patch", (
        _W("convnext_pico", "d1_in1k", _REL + "convnext_pico_d1-10ad7f0d.pth", crop_pct=0.875,
           top1=79.516, top5=94.554),)),
    "convnext_pico_ols": (PICO, "overlap_tiered", (
        _W("convnext_pico_ols", "d1_in1k", _REL + "convnext_pico_ols_d1-611f0ca7.pth", crop_pct=0.95,
           top1=79.542, top5=94.706),)),
    "convnext_nano": (NANO, "patch", (
        _W("convnext_nano", "d1h_in1k", _REL + "convnext_nano_d1h-7eb4bdea.pth", crop_pct=0.95,
           top1=80.762, top5=95.332),
        _W("convnext_nano", "in12k_ft_in1k", crop_pct=0.95, top1=82.306, top5=96.338),
        _W("convnext_nano", "r384_in12k_ft_in1k", crop_pct=1.0, input_size=(384, 384), top1=83.334, top5=96.624),
    )),
    "convnext_nano_ols": (NANO, "overlap", (
        _W("convnext_nano_ols", "d1h_in1k", _REL + "convnext_nano_ols_d1h-ae424a9a.pth", crop_pct=0.95,
           top1=80.906, top5=95.254),)),
}


def _build(table: Stages, stem_type: StemType, **overrides) -> ConvNeXt:
    return ConvNeXt(**{**dict(stages=table, stem_type=stem_type), **overrides})


for _name, (_table, _stem, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="convnext", input_size=(224, 224), interpolation="bicubic",
            crop_pct=_weights[0].crop_pct, first_conv="stem_0", classifier="head/fc",
            feature_info=feature_info(_table, _stem), paper="arXiv:2201.03545; timm's small variants",
            twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _table, _stem))
