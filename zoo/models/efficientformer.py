"""EfficientFormer (Li et al., "EfficientFormer: Vision Transformers at MobileNet Speed", arXiv:2206.01191), L1 / L3 /
L7 as timm builds them (`timm/models/efficientformer.py`, `efficientformer_l*`).

A stem of two 3x3/2 conv+BN+ReLU (stride 4), then four stages at strides 4-32; stages 1-3 start with a 3x3/2
conv+BN. The blocks are MetaFormer blocks, x + LayerScale(token mixer(x)) and x + LayerScale(MLP(x)):
- 4-D blocks on NHWC maps: the token mixer is PoolFormer's pooling, a 3x3 stride-1 average that does not count the
  padding, minus its input (`zoo.layers.pooling`); the MLP two 1x1 conv+BN (biases on the convs too) with GELU
  between, expansion 4.
- 3-D blocks, the last `num_vit` blocks of the last stage, on its map flattened to tokens: pre-LayerNorm multi-head
  attention (8 heads, key dim 32, value dim 128, Linear qkv and projection) with a learned bias per head and relative
  offset (|dy|, |dx|) in place of position embeddings, and a pre-LayerNorm Linear MLP (GELU, expansion 4).
After the last stage a LayerNorm, the mean over positions (`pre_logits`) and the distillation head: two Linear
classifiers on the same features, `head` and `head_dist`, whose logits are averaged. That average is what timm
returns in eval (and in training, unless its `distilled_training` is set, which the zoo does not offer); `model(x)`
returns it. Each classifier's own logits: `DistilledLinearHead.both_logits(params["head"], feats["pre_logits"])`.

Deploy form (`deploy=True`, the variables `compress.deploy` gives): the two classifiers are one Linear computing the
average (exact up to rounding: both read the same input); every layer scale that follows a weight layer is multiplied
into it (`fold_layer_scales`: the 3-D blocks' into `proj` and `fc2`, the 4-D blocks' `ls2` into the BatchNorm before
it); every BatchNorm is folded into the conv before it. The pooling branch's `ls1` stays: no weight layer precedes it.

The attention biases are sized by the last stage's token map: timm fixes them at 7x7 (a 224x224 input); here they
follow the resolution the model is initialized at (224x224: timm's shape), as LeViT's do in this zoo. A model run on
an input whose last map has another size raises an error naming the input sizes its biases fit (`Attention`); create
the model at the new size for biases of that size (untrained).

Parameter names mirror timm's module names (`stem/conv1`, `stem/norm2`, `stages_1/downsample/conv`,
`stages_0/blocks_2/mlp/fc1`, `stages_3/blocks_4/token_mixer/qkv`, `stages_3/blocks_4/ls1/gamma`, `norm`); the timm
key map is a few substitutions (`timm_rename`). One name differs: the downsampling BatchNorm is `downsample/bn`
(timm's `downsample.norm`). An int8 export keeps float every op whose path has a segment named like a layer kept
float (`zoo.layers.kinds.float_in_int8_pattern`), and `norm` is the final LayerNorm's name: under timm's name the
three downsampling convs (their BatchNorms folded in) stayed float in int8 files. As in timm, the last stage's block
indices count the parameter-free flattening between its 4-D and 3-D blocks (timm's `Flat`, at index depth - num_vit),
so they skip that one index (L1: `blocks_0`-`blocks_2`, then `blocks_4`). The classifiers are `head/fc/head` and
`head/fc/head_dist` (LeViT's and RepViT's names), so that the classifier path `head/fc` covers both forms.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from zoo.config import FeatureInfo, ModelCfg
from zoo.inputs import check_images
from zoo.layers import kinds
from zoo.layers.activations import get_act
from zoo.layers.attention import attend_with_bias, attention_bias_index
from zoo.layers.blocks import drop_path
from zoo.layers.norm import BN_EPS_TORCH, LN_EPS_TORCH
from zoo.layers.pooling import avg_pool_excluding_padding
from zoo.layers.scale import LayerScale
from zoo.layers.transformer import Mlp
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import PRE_LOGITS, feature_dict, layer_factories
from zoo.models.heads import HeadPair
from zoo.registry import register_model

ModuleDef = Any


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage: `depth` blocks of width `dim`, the last `num_vit` of them attention (3-D) blocks on the flattened
    map, the others pooling (4-D) blocks. Every stage but the first starts with a 3x3/2 conv+BN to `dim`."""

    dim: int
    depth: int
    num_vit: int = 0


# EfficientFormer-L1 / L3 / L7 of arXiv:2206.01191 (widths and depths per stage; attention blocks in the last stage:
# 1 / 4 / 8), as timm's `EfficientFormer_width`, `EfficientFormer_depth` and `num_vit`; MLP expansion 4 everywhere.
L1 = (
    Stage(dim=48, depth=3),  # stage 0, 56x56 in
    Stage(dim=96, depth=2),  # stage 1, 56x56 in
    Stage(dim=224, depth=6),  # stage 2, 28x28 in
    Stage(dim=448, depth=4, num_vit=1),  # stage 3, 14x14 in
)
L3 = (
    Stage(dim=64, depth=4),  # stage 0, 56x56 in
    Stage(dim=128, depth=4),  # stage 1, 56x56 in
    Stage(dim=320, depth=12),  # stage 2, 28x28 in
    Stage(dim=512, depth=6, num_vit=4),  # stage 3, 14x14 in
)
L7 = (
    Stage(dim=96, depth=6),  # stage 0, 56x56 in
    Stage(dim=192, depth=6),  # stage 1, 56x56 in
    Stage(dim=384, depth=18),  # stage 2, 28x28 in
    Stage(dim=768, depth=8, num_vit=8),  # stage 3, 14x14 in
)

Stages = tuple[Stage, ...]

# timm's Attention defaults, the same in every variant: 8 heads, key dim 32, value dim 4 x 32
NUM_HEADS, KEY_DIM, ATTN_RATIO = 8, 32, 4.0
LAST_STRIDE = 32  # the stride of the last stage's map, the one the attention biases are sized by


def feature_info(stages: Stages) -> tuple[FeatureInfo, ...]:
    """Every stage output (the last stage's as an NHWC map, before the final LayerNorm), strides 4-32."""
    return tuple(FeatureInfo(f"stages_{i}", 4 * 2 ** i, s.dim) for i, s in enumerate(stages))


class Attention(nn.Module):
    """Multi-head attention on (B, N, C) tokens of an `hw` map: Linear `qkv` (per head: key_dim q, key_dim k,
    attn_ratio * key_dim v, timm's channel order), softmax(q k^T / sqrt(key_dim) + bias) v, Linear `proj` back to C.

    The bias is a learned `attention_biases` entry per head and relative offset (|dy|, |dx|), indexed |dy| * W + |dx|,
    so the table has one entry per position of the map it was created for. A map of another size raises, naming the
    input sizes that fit (its index would read past the table, or the wrong entries); a square table (224x224
    weights: 7x7) takes only that square map. A table made for a non-square map cannot tell which one: it takes any
    map of as many positions, and only the one it was made for (the input size the model was created at) reads its
    entries as they were trained.
    """

    hw: tuple[int, int]
    num_heads: int = NUM_HEADS
    key_dim: int = KEY_DIM
    attn_ratio: float = ATTN_RATIO
    dense: ModuleDef = nn.Dense

    @nn.compact
    def __call__(self, x):
        b, n, c = x.shape
        h, w = self.hw
        if n != h * w:
            raise ValueError(f"{'/'.join(self.path)}: {n} tokens for a {h}x{w} map")
        heads, kd, vd = self.num_heads, self.key_dim, int(self.attn_ratio * self.key_dim)
        self._check_table(h, w)
        biases = self.param("attention_biases", nn.initializers.zeros, (heads, h * w))
        qkv = self.dense(heads * (2 * kd + vd), name="qkv")(x).reshape(b, n, heads, 2 * kd + vd)
        q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
        x = attend_with_bias(q, k, v, biases, attention_bias_index((h, w)), kd**-0.5)
        return self.dense(c, name="proj")(x)

    def _check_table(self, h: int, w: int) -> None:
        if not self.has_variable("params", "attention_biases"):
            return  # being initialized: the table is created for this map
        size = int(self.get_variable("params", "attention_biases").shape[-1])
        side = math.isqrt(size)
        if size == h * w and (side * side != size or h == w):
            return
        if side * side == size:
            made = (f"a {side}x{side} map, which inputs of {LAST_STRIDE * (side - 1) + 1} to {LAST_STRIDE * side} "
                    f"pixels a side give (e.g. {LAST_STRIDE * side}x{LAST_STRIDE * side})")
        else:
            made = f"a map of {size} positions (the input size the model was created at)"
        raise ValueError(
            f"EfficientFormer attention '{'/'.join(self.path)}': its biases are for {made}, but this input gives a "
            f"{h}x{w} map at stride {LAST_STRIDE}. Run the model at the size its biases were made for, or create it "
            "at the new size (zoo.create_model, initialized at that size: new, untrained biases).")


class ConvMlp(nn.Module):
    """1x1 conv `fc1` -> BN `norm1` -> act -> 1x1 conv `fc2` -> BN `norm2` (timm's ConvMlpWithNorm; convs with
    biases)."""

    hidden: int
    conv: ModuleDef
    norm: ModuleDef
    act: str = "gelu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = self.conv(self.hidden, 1, use_bias=True, name="fc1")(x)
        x = get_act(self.act)(self.norm(use_running_average=not train, name="norm1")(x))
        x = self.conv(c, 1, use_bias=True, name="fc2")(x)
        return self.norm(use_running_average=not train, name="norm2")(x)


class MetaBlock2d(nn.Module):
    """x + ls1(pool(x) - x), then x + ls2(ConvMlp(x)), on an NHWC map. `deploy=True`: `ls2` folded into the MLP's
    last BatchNorm (`fold_layer_scales`), which BatchNorm folding then takes into `fc2`."""

    mlp_ratio: float
    pool_size: int
    layer_scale_init_value: float
    conv: ModuleDef
    norm: ModuleDef
    act: str = "gelu"
    drop_path_rate: float = 0.0
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = avg_pool_excluding_padding(x, self.pool_size) - x
        y = LayerScale(self.layer_scale_init_value, name="ls1")(y)
        x = x + drop_path(y, self.drop_path_rate, train, self)
        y = ConvMlp(int(x.shape[-1] * self.mlp_ratio), self.conv, self.norm, self.act, name="mlp")(x, train)
        if not self.deploy:
            y = LayerScale(self.layer_scale_init_value, name="ls2")(y)
        return x + drop_path(y, self.drop_path_rate, train, self)


class MetaBlock1d(nn.Module):
    """x + ls1(attention(norm1(x))), then x + ls2(mlp(norm2(x))), on (B, N, C) tokens of an `hw` map.
    `deploy=True`: `ls1` folded into the attention's `proj`, `ls2` into the MLP's `fc2` (`fold_layer_scales`)."""

    hw: tuple[int, int]
    mlp_ratio: float
    layer_scale_init_value: float
    dense: ModuleDef
    act: str = "gelu"
    drop_path_rate: float = 0.0
    dtype: Any = None
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        ln = partial(nn.LayerNorm, epsilon=LN_EPS_TORCH, use_fast_variance=False, dtype=self.dtype)
        y = Attention(self.hw, dense=self.dense, name="token_mixer")(ln(name="norm1")(x))
        if not self.deploy:
            y = LayerScale(self.layer_scale_init_value, name="ls1")(y)
        x = x + drop_path(y, self.drop_path_rate, train, self)
        y = Mlp(int(x.shape[-1] * self.mlp_ratio), self.act, self.dtype, self.dense, name="mlp")(ln(name="norm2")(x))
        if not self.deploy:
            y = LayerScale(self.layer_scale_init_value, name="ls2")(y)
        return x + drop_path(y, self.drop_path_rate, train, self)


# Where each block's layer scales fold: (layer scale, the layer whose per-output-channel scale and shift absorb it).
# A product per output channel, exact: (x W + b) g = x (W g) + b g, and a BatchNorm's output times g is the same
# BatchNorm with scale and shift times g. In int8 files this matters beyond the saved multiply: the converter fuses
# a 3-D block's layer scale into the Linear before it with a bias of shape (1, 1, C), and XNNPACK then leaves that
# FULLY_CONNECTED out of its graph (a second partition).
LAYER_SCALE_FOLDS = {
    MetaBlock2d: (("ls2", ("mlp", "norm2")),),
    MetaBlock1d: (("ls1", ("token_mixer", "proj")), ("ls2", ("mlp", "fc2"))),
}


def fold_layer_scales(module: nn.Module, variables: dict) -> dict:
    """A block's training-form variables (its own subtree, every collection) -> its deploy form's: each layer scale
    of `LAYER_SCALE_FOLDS` multiplied into the scale (`kernel` or BatchNorm `scale`) and `bias` of the layer it
    follows, and removed. Computed in float64, stored float32."""
    params = traverse_util.flatten_dict(variables["params"])
    folds = next(f for cls, f in LAYER_SCALE_FOLDS.items() if isinstance(module, cls))
    for ls, target in folds:
        if (ls, "gamma") not in params:
            raise ValueError(f"fold_layer_scales: no `{ls}/gamma` in the variables of {type(module).__name__} "
                             "(already deployed?)")
        if (*target, "kernel") not in params and (*target, "scale") not in params:
            raise ValueError(f"fold_layer_scales: `{'/'.join(target)}` has no kernel or scale to take `{ls}`")
        gamma = np.asarray(params.pop((ls, "gamma")), np.float64)
        for leaf in ("kernel", "scale", "bias"):
            if (*target, leaf) in params:
                params[(*target, leaf)] = (np.asarray(params[(*target, leaf)], np.float64) * gamma).astype(np.float32)
    return {**variables, "params": traverse_util.unflatten_dict(params)}


class Downsample(nn.Module):
    """3x3/2 conv (with bias) `conv` -> BN `bn` (timm's `norm`: see `timm_rename`)."""

    features: int
    conv: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(self.features, 3, stride=2, use_bias=True, name="conv")(x)
        return self.norm(use_running_average=not train, name="bn")(x)


class EfficientFormerStage(nn.Module):
    """[3x3/2 conv+BN `downsample`] -> the 4-D blocks -> [flatten -> the 3-D blocks -> back to a map].
    `drop_path_rates`: one per block."""

    stage: Stage
    downsample: bool
    drop_path_rates: tuple[float, ...]
    mlp_ratio: float
    pool_size: int
    layer_scale_init_value: float
    conv: ModuleDef
    norm: ModuleDef
    dense: ModuleDef
    act: str = "gelu"
    dtype: Any = None
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.stage
        if self.downsample:
            x = Downsample(s.dim, self.conv, self.norm, name="downsample")(x, train)
        first_vit = s.depth - s.num_vit
        for j in range(first_vit):
            x = MetaBlock2d(self.mlp_ratio, self.pool_size, self.layer_scale_init_value, self.conv, self.norm,
                            self.act, self.drop_path_rates[j], self.deploy, name=f"blocks_{j}")(x, train)
        if s.num_vit:
            b, h, w, c = x.shape
            x = x.reshape(b, h * w, c)
            for j in range(first_vit, s.depth):
                # index j + 1: timm's Flat (no parameters) holds index `first_vit` of the block list
                x = MetaBlock1d((h, w), self.mlp_ratio, self.layer_scale_init_value, self.dense, self.act,
                                self.drop_path_rates[j], self.dtype, self.deploy, name=f"blocks_{j + 1}")(x, train)
            x = x.reshape(b, h, w, c)
        return x


class Stem4(nn.Module):
    """3x3/2 conv `conv1` -> BN `norm1` -> ReLU -> 3x3/2 conv `conv2` -> BN `norm2` -> ReLU; convs with biases."""

    dim: int
    conv: ModuleDef
    norm: ModuleDef
    act: str = "relu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, features in enumerate((self.dim // 2, self.dim), start=1):
            x = self.conv(features, 3, stride=2, use_bias=True, name=f"conv{i}")(x)
            x = get_act(self.act)(self.norm(use_running_average=not train, name=f"norm{i}")(x))
        return x


class DistilledLinearHead(nn.Module):
    """`pre_logits` -> dropout -> two Linear classifiers (`fc/head`, `fc/head_dist`), logits averaged (timm's eval
    output of a distilled EfficientFormer). `deploy=True`: one Linear `fc` computing the average (its kernel and bias
    the means of the two: exact up to rounding, both read the same input). `num_classes=0`: the pooled features."""

    num_classes: int
    drop_rate: float = 0.0
    dense: ModuleDef = nn.Dense
    deploy: bool = False

    @nn.compact
    def __call__(self, feats, train: bool = False):
        x = feats[PRE_LOGITS]
        if self.num_classes <= 0:
            return x.astype(jnp.float32)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        if self.deploy:
            return self.dense(self.num_classes, name="fc")(x).astype(jnp.float32)
        y, y_dist = HeadPair(self.num_classes, self.dense, name="fc")(x, x)
        return ((y + y_dist) / 2).astype(jnp.float32)

    @staticmethod
    def both_logits(params: dict, pre_logits) -> tuple:
        """(class logits, distillation logits) of the two classifiers alone, on `pre_logits` (the backbone dict's);
        `params`: a training-form head's parameters (`variables["params"]["head"]`)."""
        fc = params["fc"]
        x = jnp.asarray(pre_logits, jnp.float32)
        return tuple((x @ fc[k]["kernel"] + fc[k]["bias"]).astype(jnp.float32) for k in ("head", "head_dist"))

    @staticmethod
    def reparameterize(variables: dict) -> dict:
        """Training-form variables (the head's subtree) -> {"params": {"fc": kernel, bias}}, the means of the two
        classifiers' (float64, stored float32)."""
        fc = variables["params"].get("fc", {})
        if "head" not in fc:
            raise ValueError("DistilledLinearHead.reparameterize: no `fc/head` in the variables (already deployed?)")
        mean = {k: (np.asarray(fc["head"][k], np.float64) + np.asarray(fc["head_dist"][k], np.float64)) / 2
                for k in ("kernel", "bias")}
        return {"params": {"fc": {k: v.astype(np.float32) for k, v in mean.items()}}}


def _reparameterize_head(module: DistilledLinearHead, variables: dict) -> dict:
    if module.num_classes <= 0:
        return {k: v for k, v in variables.items() if k == "params"}
    return DistilledLinearHead.reparameterize(variables)


kinds.register(DistilledLinearHead, kinds.LayerKind("reparam", reparameterize=_reparameterize_head))
# softmax attention of activations: kept float in int8 files, as the zoo's other attention layers
kinds.register(Attention, kinds.LayerKind("attention", int8="float"))
for _block in LAYER_SCALE_FOLDS:
    kinds.register(_block, kinds.LayerKind("reparam", reparameterize=fold_layer_scales))


def drop_path_rates(stages: Stages, rate: float) -> tuple[tuple[float, ...], ...]:
    """Per block: linear from 0 at the first block to `rate` at the last, over the whole network (timm's
    `calculate_drop_path_rates(rate, depths, stagewise=True)`)."""
    rates = np.linspace(0.0, rate, sum(s.depth for s in stages)).tolist()
    out, start = [], 0
    for s in stages:
        out.append(tuple(rates[start:start + s.depth]))
        start += s.depth
    return tuple(out)


class EfficientFormer(nn.Module):
    """Backbone (Stem4 -> four stages, strides 4-32 -> LayerNorm `norm` -> mean over positions: `pre_logits`) +
    distilled head. `features=True`: the backbone's dict (`zoo.models.heads`). `deploy=True`: layer scales folded
    and the head one Linear (the variables `compress.deploy.reparameterize` gives; see the module docstring)."""

    stages: Stages
    mlp_ratio: float = 4.0
    pool_size: int = 3
    layer_scale_init_value: float = 1e-5
    act: str = "gelu"
    stem_act: str = "relu"
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
        check_images(x, self.in_chans, "EfficientFormer")
        if any(s.num_vit for s in self.stages[:-1]) or self.stages[-1].num_vit > self.stages[-1].depth:
            raise ValueError("EfficientFormer takes attention blocks (num_vit) in the last stage only, at most its "
                             f"depth; got {self.stages}")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        x = Stem4(self.stages[0].dim, conv, norm, self.stem_act, name="stem")(x, train)
        maps = []
        for i, (s, rates) in enumerate(zip(self.stages, drop_path_rates(self.stages, self.drop_path_rate))):
            x = EfficientFormerStage(s, i > 0, rates, self.mlp_ratio, self.pool_size, self.layer_scale_init_value,
                                     conv, norm, dense, self.act, self.dtype, self.deploy,
                                     name=f"stages_{i}")(x, train)
            maps.append(x)
        x = nn.LayerNorm(epsilon=LN_EPS_TORCH, use_fast_variance=False, dtype=self.dtype, name="norm")(x)
        feats = feature_dict([f.name for f in feature_info(self.stages)], maps,
                             jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return DistilledLinearHead(self.num_classes, self.drop_rate, dense, self.deploy, name="head")(feats, train)


def timm_rename(module: EfficientFormer):
    """timm EfficientFormer keys: `stages.{i}.blocks.{j}.` -> `stages_{i}/blocks_{j}/` (the same j: both count the
    Flat), `stages.{i}.downsample.` -> `stages_{i}/downsample/` and its `norm` -> `bn`, `head` / `head_dist` ->
    `head/fc/head` / `head/fc/head_dist`; the rest 1:1."""

    def rename(path: str) -> str | None:
        path = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages_\1.blocks_\2.", path)
        path = re.sub(r"^stages\.(\d+)\.downsample\.norm$", r"stages_\1.downsample.bn", path)
        path = re.sub(r"^stages\.(\d+)\.downsample\.", r"stages_\1.downsample.", path)
        path = {"head": "head.fc.head", "head_dist": "head.fc.head_dist"}.get(path, path)
        return path.replace(".", "/")

    return rename


# Snap's distilled ImageNet-1k weights (github.com/snap-research/EfficientFormer) as re-published by timm. timm's
# default_cfgs record no accuracy: top1 is the paper's (224x224, distilled).
_SNAP = dict(crop_pct=0.95, origin="https://github.com/snap-research/EfficientFormer")

# name: (table, pretrained weights)
VARIANTS = {
    "efficientformer_l1": (L1, (timm_weights("efficientformer_l1", "snap_dist_in1k", top1=79.2, **_SNAP),)),
    "efficientformer_l3": (L3, (timm_weights("efficientformer_l3", "snap_dist_in1k", top1=82.4, **_SNAP),)),
    "efficientformer_l7": (L7, (timm_weights("efficientformer_l7", "snap_dist_in1k", top1=83.3, **_SNAP),)),
}


def _build(table: Stages, **overrides) -> EfficientFormer:
    return EfficientFormer(**{**dict(stages=table), **overrides})


for _name, (_table, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="efficientformer", input_size=(224, 224), interpolation="bicubic", crop_pct=0.95,
            first_conv="stem/conv1", classifier="head/fc", feature_info=feature_info(_table),
            paper="arXiv:2206.01191", twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _table))
