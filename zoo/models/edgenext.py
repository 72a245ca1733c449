"""EdgeNeXt (Maaz et al., "EdgeNeXt: Efficiently Amalgamated CNN-Transformer Architecture for Mobile Vision
Applications", arXiv:2206.10589, ECCV 2022 workshops): XX-S, X-S, S and B as timm builds them
(`timm/models/edgenext.py`, `edgenext_*`).

A ConvNeXt-like network: a 4x4/4 patchify conv + LayerNorm stem, four stages at strides 4-32 (stages 1-3 start with
LayerNorm + 2x2/2 conv), a pooled LayerNorm + Linear head; every LayerNorm has eps 1e-6. A stage is `depth` blocks of
two kinds:
- conv encoders: a k x k depthwise conv (k = 3, 5, 7, 9 in stages 0-3) -> LayerNorm -> MLP (4x, GELU) -> layer
  scale -> + input: ConvNeXt's block (`zoo.models.convnext.ConvNeXtBlock`), reused as it is.
- SDTA encoders (split depth-wise transpose attention), the last block of stages 1-3: the channels are split into
  `scales` groups of ceil(C / scales) (the last group takes what is left, as torch's `chunk`); a 3x3 depthwise conv
  runs on the first group, and on each later group but the last after adding the previous conv's output (a cascade
  whose receptive field grows per group); the last group passes as it is. In stage 1 a positional encoding is added
  next (below). Then x + gamma_xca * XCA(LayerNorm(x)) and, from the block's input, + gamma * MLP(LayerNorm(.)).
  XCA is cross-covariance attention (El-Nouby et al., arXiv:2106.09681): per head, queries and keys are L2-normalized
  over the positions, and the (head_dim x head_dim) attention between channels, scaled by a learned temperature per
  head, mixes the values' channels; its cost is linear in the number of positions.

Positional encoding (timm's PositionalEncodingFourier, DETR's sine encoding): at position (i, j) of an H x W map,
y = 2 pi (i + 1) / H and x = 2 pi (j + 1) / W, each expanded to 32 features sin / cos of y / 10000^(2m / 32), the 64
projected by a learned 1x1 conv (with bias) to the stage's width. It has no size-dependent parameters: it is computed
for whatever map the input gives (a constant of the traced graph), so the model runs at any input size from 32x32
(odd sizes floored by each downsampling), as timm's does (tests/test_edgenext.py checks a non-square input against
timm).

The MLPs (timm's Linear `fc1`, `fc2`) are 1x1 convs here (kernels (1, 1, in, out); the converter reshapes timm's
weights), as ConvNeXt's `conv_mlp`: the same numbers, and an int8 file folds the layer scale after `fc2` into a conv
whose bias XNNPACK takes, where folded into a Linear it leaves a 4-D bias that XNNPACK does not take (each such
FULLY_CONNECTED then runs on the builtin kernel, splitting the graph into partitions).

No BatchNorm and no multi-branch block: the deploy form is the training form (`compress.deploy` leaves it as is).
The XCA (`CrossCovarianceAttention`, with its temperature) is an attention layer kept float in int8 files, as the
zoo's other attention layers.

Feature maps: the stages, strides 4-32 (the patchify stem has no stride-2 map; timm's feature_info lists none).

Parameter names follow timm's (`stem_0`, `stages_1/downsample_1`, `stages_2/blocks/block_3/conv_dw`,
`stages_1/blocks/block_1/convs_0`, `.../pos_embd/token_projection`, `.../xca/qkv`, `.../xca/temperature`, an SDTA
block's `gamma` and `gamma_xca`, `head/norm`, `head/fc`); a conv encoder's `gamma` is its `layer_scale/gamma`, as in
ConvNeXt (`timm_rename`).
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
from zoo.layers import kinds
from zoo.layers.blocks import Stage as BlockStage, drop_path
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import feature_dict, layer_factories
from zoo.models.convnext import ConvNeXtBlock, ConvNeXtHead, Mlp
from zoo.registry import register_model

LN_EPS = 1e-6  # every LayerNorm of timm's EdgeNeXt
MLP_RATIO = 4.0


@dataclass(frozen=True)
class Stage:
    """One stage: `depth` blocks of width `dims`, the last `sdta` of them SDTA encoders (the rest conv encoders with a
    `kernel` x `kernel` depthwise conv); SDTA splits its channels into `scales` groups and attends with `heads` heads,
    adding the positional encoding where `pos_emb`."""

    depth: int
    dims: int
    kernel: int
    heads: int
    scales: int
    sdta: int
    pos_emb: bool


def _table(depths, dims, heads) -> tuple[Stage, ...]:
    # the same in every variant (timm's defaults, the authors' configurations): kernels 3-9, SDTA channel groups 2, 2,
    # 3, 4, one SDTA block ending stages 1-3, the positional encoding in stage 1's
    kernels, scales, sdta, pos = (3, 5, 7, 9), (2, 2, 3, 4), (0, 1, 1, 1), (False, True, False, False)
    return tuple(Stage(*args) for args in zip(depths, dims, kernels, heads, scales, sdta, pos))


# timm's edgenext_* model_args (the authors' configurations, github.com/mmaaz60/EdgeNeXt).
# 256x256 input: stages at 64x64, 32x32, 16x16, 8x8.
XX_SMALL = _table((2, 2, 6, 2), (24, 48, 88, 168), (4, 4, 4, 4))
X_SMALL = _table((3, 3, 9, 3), (32, 64, 100, 192), (4, 4, 4, 4))
SMALL = _table((3, 3, 9, 3), (48, 96, 160, 304), (8, 8, 8, 8))
BASE = _table((3, 3, 9, 3), (80, 160, 288, 584), (8, 8, 8, 8))

Stages = tuple[Stage, ...]


def feature_info(stages: Stages) -> tuple[FeatureInfo, ...]:
    return tuple(FeatureInfo(f"stages_{i}", 4 * 2 ** i, s.dims) for i, s in enumerate(stages))


def split_widths(channels: int, scales: int) -> tuple[int, ...]:
    """Widths of an SDTA block's channel groups: `scales` groups of ceil(channels / scales), the last one what is left
    (torch's `chunk`, which timm splits with). Raises where that does not give `scales` non-empty groups (timm's block
    then fails too)."""
    if scales < 2:
        raise ValueError(f"SDTA needs at least 2 channel groups, got scales={scales}")
    width = math.ceil(channels / scales)
    last = channels - (scales - 1) * width
    if last <= 0:
        raise ValueError(f"{channels} channels do not split into {scales} groups of {width} and a remainder")
    return (width,) * (scales - 1) + (last,)


def fourier_position_features(h: int, w: int, hidden_dim: int = 32, temperature: float = 10000.0) -> np.ndarray:
    """(h, w, 2 * hidden_dim) float32 sine features of an h x w map: hidden_dim for the row, then hidden_dim for the
    column, each [sin(p / t_0), cos(p / t_0), sin(p / t_1), cos(p / t_1), ...] with t_m = temperature^(2m / hidden_dim)
    and p = 2 pi (index + 1) / (size + 1e-6). In float32 in timm's order of operations, so the constant equals the one
    timm computes."""
    f32 = np.float32
    eps, scale = f32(1e-6), f32(2 * math.pi)
    y = np.arange(1, h + 1, dtype=f32)
    x = np.arange(1, w + 1, dtype=f32)
    y = y / (y[-1] + eps) * scale
    x = x / (x[-1] + eps) * scale
    dim_t = np.power(f32(temperature), f32(2) * (np.arange(hidden_dim) // 2).astype(f32) / f32(hidden_dim))

    def expand(p):  # (n,) -> (n, hidden_dim): sin of even features, cos of odd ones, interleaved
        a = p[:, None] / dim_t
        return np.stack([np.sin(a[:, 0::2]), np.cos(a[:, 1::2])], axis=-1).reshape(len(p), hidden_dim)

    py = np.broadcast_to(expand(y)[:, None, :], (h, w, hidden_dim))
    px = np.broadcast_to(expand(x)[None, :, :], (h, w, hidden_dim))
    return np.concatenate([py, px], axis=-1).astype(f32)


class PositionalEncodingFourier(nn.Module):
    """The sine features of the map's size (`fourier_position_features`, a constant) projected by a 1x1 conv with bias
    (`token_projection`) to `dim` channels: (B, H, W, dim) for a map of shape (B, H, W, .)."""

    dim: int
    conv: Any
    hidden_dim: int = 32
    temperature: float = 10000.0

    @nn.compact
    def __call__(self, shape: tuple[int, ...]):
        b, h, w = shape[:3]
        feats = jnp.asarray(fourier_position_features(h, w, self.hidden_dim, self.temperature))
        # one copy per image, as timm projects it: the same MACs per image as timm counts
        feats = jnp.broadcast_to(feats[None], (b, h, w, 2 * self.hidden_dim))
        return self.conv(self.dim, 1, use_bias=True, name="token_projection")(feats)


class CrossCovarianceAttention(nn.Module):
    """XCA on an NHWC map (module doc): qkv Linear -> per head, queries and keys L2-normalized over the positions,
    softmax(temperature * q^T k) over channels applied to the values' channels -> proj Linear. timm's channel order:
    qkv's output is (q, k, v) x heads x head_dim."""

    num_heads: int
    dense: Any = nn.Dense
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        heads = self.num_heads
        if c % heads:
            raise ValueError(f"XCA: {c} channels do not split into {heads} heads")
        d = c // heads
        temperature = self.param("temperature", nn.initializers.ones, (heads, 1, 1))
        qkv = self.dense(3 * c, dtype=self.dtype, name="qkv")(x.reshape(b, h * w, c))
        # q, k, v as (B, N, heads, d) each: 4-D throughout (no 5-D reshape in the exported graph)
        q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, h * w, heads, d) for i in range(3))

        def normalize(t):  # torch's F.normalize over the positions: t / max(|t|, 1e-12)
            t32 = t.astype(jnp.float32)
            return (t32 * jax.lax.rsqrt(jnp.maximum(jnp.sum(t32 * t32, axis=1, keepdims=True), 1e-24))).astype(t.dtype)

        attn = jnp.einsum("bnhc,bnhd->bhcd", normalize(q), normalize(k)) * temperature.astype(q.dtype)
        attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhcd,bnhd->bnhc", attn, v).reshape(b, h * w, c)
        return self.dense(c, dtype=self.dtype, name="proj")(out).reshape(b, h, w, c)


class SdtaBlock(nn.Module):
    """Split depth-wise transpose attention encoder (module doc). Its own parameters are its two layer scales, timm's
    `gamma_xca` (attention branch) and `gamma` (MLP branch)."""

    heads: int
    scales: int
    pos_emb: bool
    conv: Any
    dense: Any
    ln: Any
    mlp_ratio: float = MLP_RATIO
    ls_init_value: float | None = 1e-6
    drop_path_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        widths = split_widths(c, self.scales)
        groups = jnp.split(x, np.cumsum(widths)[:-1].tolist(), axis=-1)
        outs, y = [], groups[0]
        for i, g in enumerate(groups[:-1]):  # the cascade: each conv sees its group plus the previous conv's output
            if i:
                y = y + g
            y = self.conv(widths[i], 3, groups=widths[i], use_bias=True, name=f"convs_{i}")(y)
            outs.append(y)
        y = jnp.concatenate([*outs, groups[-1]], axis=-1)
        if self.pos_emb:
            y = y + PositionalEncodingFourier(c, self.conv, name="pos_embd")(y.shape).astype(y.dtype)
        branch = CrossCovarianceAttention(self.heads, self.dense, self.dtype, name="xca")(self.ln(name="norm_xca")(y))
        if self.ls_init_value is not None:
            branch = branch * self.param("gamma_xca", nn.initializers.constant(self.ls_init_value), (c,)).astype(
                branch.dtype)
        y = y + drop_path(branch, self.drop_path_rate, train, self)
        y = Mlp(int(self.mlp_ratio * c), self.conv, self.dense, conv_mlp=True, name="mlp")(self.ln(name="norm")(y))
        if self.ls_init_value is not None:
            y = y * self.param("gamma", nn.initializers.constant(self.ls_init_value), (c,)).astype(y.dtype)
        return x + drop_path(y, self.drop_path_rate, train, self)


# the block's own parameters are per-channel gains on its branches (as LayerScale's); its layers are its children
kinds.register(SdtaBlock, kinds.LayerKind("norm"))
# softmax attention of activations (and a learned temperature): kept float in int8 files, as the other attention layers
kinds.register(CrossCovarianceAttention, kinds.LayerKind("attention", int8="float"))


def _make_block(kind: str, drop_path_rate: float, *, stage: Stage, conv, dense, ln, ls_init_value, dtype,
                name: str) -> nn.Module:
    if kind == "conv":
        return ConvNeXtBlock(conv, dense, ln, kernel=stage.kernel, mlp_ratio=MLP_RATIO, conv_mlp=True,
                             ls_init_value=ls_init_value, drop_path_rate=drop_path_rate, name=name)
    return SdtaBlock(stage.heads, stage.scales, stage.pos_emb, conv, dense, ln, MLP_RATIO, ls_init_value,
                     drop_path_rate, dtype, name=name)


def block_kinds(stage: Stage) -> tuple[str, ...]:
    """"conv" or "sdta" per block of the stage: the last `stage.sdta` are SDTA encoders."""
    if not 0 <= stage.sdta <= stage.depth:
        raise ValueError(f"a stage of depth {stage.depth} cannot end with {stage.sdta} SDTA blocks")
    return ("conv",) * (stage.depth - stage.sdta) + ("sdta",) * stage.sdta


class EdgeNeXtStage(nn.Module):
    """[LayerNorm -> 2x2/2 conv (`downsample_0`, `downsample_1`)] -> blocks (`blocks/block_{j}`)."""

    stage: Stage
    stride: int
    conv: Any
    dense: Any
    ln: Any
    ls_init_value: float | None
    drop_path_rates: tuple[float, ...]
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.stride > 1:
            x = self.ln(name="downsample_0")(x)
            x = self.conv(self.stage.dims, 2, stride=2, padding=0, use_bias=True, name="downsample_1")(x)
        make = partial(_make_block, stage=self.stage, conv=self.conv, dense=self.dense, ln=self.ln,
                       ls_init_value=self.ls_init_value, dtype=self.dtype)
        return BlockStage(block_kinds(self.stage), make, self.drop_path_rates, name="blocks")(x, train)


class EdgeNeXt(nn.Module):
    """Backbone (stem -> 4 stages -> pool -> LayerNorm: `pre_logits`) + classifier (fc). `features=True`: the
    backbone's dict (`zoo.models.heads`). `deploy` is accepted and changes nothing (no layer to fold)."""

    stages: Stages
    ls_init_value: float | None = 1e-6
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
        check_images(x, self.in_chans, "EdgeNeXt")
        conv, _, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=LN_EPS, dtype=self.dtype)
        ln = partial(nn.LayerNorm, epsilon=LN_EPS, use_fast_variance=False, dtype=self.dtype)
        x = conv(self.stages[0].dims, 4, stride=4, padding=0, use_bias=True, name="stem_0")(x)
        x = ln(name="stem_1")(x)
        # stochastic depth grows linearly over all blocks (timm's calculate_drop_path_rates, stagewise)
        n_blocks = sum(s.depth for s in self.stages)
        rates = [self.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        maps, seen = [], 0
        for i, s in enumerate(self.stages):
            x = EdgeNeXtStage(s, 1 if i == 0 else 2, conv, dense, ln, self.ls_init_value,
                              tuple(rates[seen:seen + s.depth]), self.dtype, name=f"stages_{i}")(x, train)
            seen += s.depth
            maps.append(x)
        head = ConvNeXtHead(self.num_classes, ln, dense, self.drop_rate, name="head")
        feats = feature_dict([f.name for f in feature_info(self.stages)], maps, head(x, train, pre_logits=True))
        if features:
            return feats
        return head(feats, train)


def timm_rename(module: EdgeNeXt):
    """timm keys: `stem.{n}` -> `stem_{n}`, `stages.{i}.downsample.{n}` -> `stages_{i}/downsample_{n}`,
    `stages.{i}.blocks.{j}` -> `stages_{i}/blocks/block_{j}`, `convs.{k}` -> `convs_{k}`; a conv encoder's own
    `gamma` -> `layer_scale/gamma` (an SDTA block keeps its `gamma` and `gamma_xca`); the rest 1:1."""
    sdta = {(i, j) for i, s in enumerate(module.stages) for j, k in enumerate(block_kinds(s)) if k == "sdta"}

    def rename(path: str) -> str | None:
        m = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)", path)
        if m and (int(m[1]), int(m[2])) not in sdta:  # a conv encoder's own parameter: its layer scale `gamma`
            path += ".layer_scale"
        path = re.sub(r"^stem\.(\d+)", r"stem_\1", path)
        path = re.sub(r"^stages\.(\d+)\.downsample\.(\d+)", r"stages_\1/downsample_\2", path)
        path = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)", r"stages_\1/blocks/block_\2", path)
        path = re.sub(r"\.convs\.(\d+)", r".convs_\1", path)
        return path.replace(".", "/")

    return rename


# The authors' ImageNet-1k weights (github.com/mmaaz60/EdgeNeXt; small and base trained with USI, arXiv:2204.03475)
# and base's ImageNet-21k pretraining fine-tuned on 1k, as re-published by timm (hub only, MIT). timm's default_cfgs
# record no accuracy: top1 is the authors' model zoo table (256x256), for base USI the figure of timm's model comment.
_AUTHORS = dict(license="mit", origin="https://github.com/mmaaz60/EdgeNeXt", interpolation="bicubic")

# name: (table, pretrained weights)
VARIANTS = {
    "edgenext_xx_small": (XX_SMALL, (timm_weights("edgenext_xx_small", "in1k", crop_pct=0.9, top1=71.23, **_AUTHORS),)),
    "edgenext_x_small": (X_SMALL, (timm_weights("edgenext_x_small", "in1k", crop_pct=0.9, top1=74.96, **_AUTHORS),)),
    "edgenext_small": (SMALL, (timm_weights("edgenext_small", "usi_in1k", crop_pct=0.95, top1=81.07, **_AUTHORS),)),
    "edgenext_base": (BASE, (
        timm_weights("edgenext_base", "usi_in1k", crop_pct=0.95, top1=83.7, **_AUTHORS),
        timm_weights("edgenext_base", "in21k_ft_in1k", crop_pct=0.95, **_AUTHORS),
    )),
}


def _build(table: Stages, **overrides) -> EdgeNeXt:
    return EdgeNeXt(**{**dict(stages=table), **overrides})


for _name, (_table, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="edgenext", input_size=(256, 256), interpolation="bicubic",
            crop_pct=_weights[0].crop_pct, first_conv="stem_0", classifier="head/fc",
            feature_info=feature_info(_table), paper="arXiv:2206.10589; timm's edgenext_* model_args",
            twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _table))
