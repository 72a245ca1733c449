"""LeViT (Graham et al., "LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference", arXiv:2104.01136),
the 128S / 128 / 192 / 256 / 384 variants as timm builds them (`timm/models/levit.py`, `levit_*`: the nn.Linear form;
`levit_conv_*`, timm's 1x1-convolution form of the same function, load into the same module).

A 16x16 patchify stem of four 3x3/2 conv+BN (hard-swish between them), then three stages of attention blocks on the
tokens of the 14x14 (224x224 input) map: every block is x + attention(x) and x + MLP(x), with no LayerNorm; every
projection is Linear+BatchNorm (`zoo.layers.linear_bn.LinearBn`), so the deployed network is plain matrix products.
The attention layers (`zoo.layers.attention.RelBiasAttention`, `RelBiasAttentionSubsample`) and the MLP
(`zoo.layers.linear_bn.LinearBnMlp`) come from the shared block library; the blocks, stem and head are LeViT's own.
Attention has a learned bias per head and relative offset (|dy|, |dx|) in place of position embeddings, and
hard-swish before its output projection. Between stages a "shrink attention" block subsamples the queries 2x
(keys and values keep the full map), widens the tokens, and is followed by a residual MLP. The classifier is
LeViT's distilled head: two BatchNorm+Linear heads on the pooled tokens, whose logits are averaged (timm's eval
output, and its training output unless `distilled_training` is set, which the zoo does not offer).

The attention biases are sized by the token map, so a model's parameters follow its input resolution (timm's
`img_size`, `fixed_input_size=True`): weights for 224x224 load into a model run at 224x224 only.

The blocks run on NHWC maps (attention reshapes to tokens inside), so every stage output is a feature map. Parameter
names mirror timm's module names (`stem/conv1/linear`, `stages_1/downsample/attn_downsample/kv/bn`,
`stages_0/blocks_1/attn/attention_biases`, `stages_2/blocks_3/mlp/ln2/linear`); the timm key map is a few
substitutions (`timm_rename`). The two heads are `head/bn`, `head/bn_dist`, `head/fc/head`, `head/fc/head_dist`,
so that the classifier (`head/fc`, re-initialized for another number of classes) does not include the BatchNorms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from zoo.config import FeatureInfo, ModelCfg
from zoo.inputs import check_images
from zoo.layers import kinds
from zoo.layers.blocks import drop_path
from zoo.layers.attention import RelBiasAttention, RelBiasAttentionSubsample
from zoo.layers.linear_bn import Conv2dBn, LinearBn, LinearBnMlp, bn_affine, norm_eps
from zoo.layers.norm import BN_EPS_TORCH, batch_norm
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import PRE_LOGITS, feature_dict, layer_factories
from zoo.models.heads import HeadPair
from zoo.registry import register_model

ModuleDef = Any


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage: `depth` attention blocks of width `dim` with `num_heads` heads. Every stage but the first starts
    with a shrink-attention block (queries subsampled 2x, `in_dim // key_dim` heads) to `dim`."""

    dim: int
    depth: int
    num_heads: int


# LeViT variants (timm's `model_cfgs`, the paper's architecture table); key_dim D = 16 (128S, 128) or 32.
# Attention and MLP ratios are 2 in the blocks; a shrink block has value ratio 4 and MLP ratio 2.
LEVIT_128S = (
    Stage(dim=128, depth=2, num_heads=4),  # stage 0, 14x14 tokens (224x224 in)
    Stage(dim=256, depth=3, num_heads=6),  # stage 1, 7x7 tokens (224x224 in)
    Stage(dim=384, depth=4, num_heads=8),  # stage 2, 4x4 tokens (224x224 in)
)
LEVIT_128 = (
    Stage(dim=128, depth=4, num_heads=4),  # stage 0, 14x14 tokens (224x224 in)
    Stage(dim=256, depth=4, num_heads=8),  # stage 1, 7x7 tokens (224x224 in)
    Stage(dim=384, depth=4, num_heads=12),  # stage 2, 4x4 tokens (224x224 in)
)
LEVIT_192 = (
    Stage(dim=192, depth=4, num_heads=3),  # stage 0, 14x14 tokens (224x224 in)
    Stage(dim=288, depth=4, num_heads=5),  # stage 1, 7x7 tokens (224x224 in)
    Stage(dim=384, depth=4, num_heads=6),  # stage 2, 4x4 tokens (224x224 in)
)
LEVIT_256 = (
    Stage(dim=256, depth=4, num_heads=4),  # stage 0, 14x14 tokens (224x224 in)
    Stage(dim=384, depth=4, num_heads=6),  # stage 1, 7x7 tokens (224x224 in)
    Stage(dim=512, depth=4, num_heads=8),  # stage 2, 4x4 tokens (224x224 in)
)
LEVIT_384 = (
    Stage(dim=384, depth=4, num_heads=6),  # stage 0, 14x14 tokens (224x224 in)
    Stage(dim=512, depth=4, num_heads=9),  # stage 1, 7x7 tokens (224x224 in)
    Stage(dim=768, depth=4, num_heads=12),  # stage 2, 4x4 tokens (224x224 in)
)

Stages = tuple[Stage, ...]

ATTN_RATIO, MLP_RATIO = 2.0, 2.0  # blocks
DOWN_ATTN_RATIO, DOWN_MLP_RATIO = 4.0, 2.0  # shrink-attention blocks


def feature_info(stages: Stages) -> tuple[FeatureInfo, ...]:
    """The stem's first three convs (strides 2, 4, 8, after their hard-swish) and the first two stages (16, 32).

    The last stage (stride 64, `stages_2`) is left out: the zoo's feature pyramids end at stride 32.
    """
    e = stages[0].dim
    return (FeatureInfo("stem/conv1", 2, e // 8), FeatureInfo("stem/conv2", 4, e // 4),
            FeatureInfo("stem/conv3", 8, e // 2), FeatureInfo("stages_0", 16, stages[0].dim),
            FeatureInfo("stages_1", 32, stages[1].dim))


class Block(nn.Module):
    """x + attn(x), then x + mlp(x); stochastic depth on both branches."""

    dim: int
    num_heads: int
    key_dim: int
    linear: ModuleDef
    act: str = "hard_swish"
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = RelBiasAttention(self.num_heads, self.key_dim, ATTN_RATIO, self.linear, self.act, name="attn")(x, train)
        x = x + drop_path(y, self.drop_path_rate, train, self)
        y = LinearBnMlp(int(self.dim * MLP_RATIO), self.linear, self.act, name="mlp")(x, train)
        return x + drop_path(y, self.drop_path_rate, train, self)


class Downsample(nn.Module):
    """Shrink attention to `out_dim` (no residual: width and resolution change), then x + mlp(x)."""

    out_dim: int
    key_dim: int
    linear: ModuleDef
    act: str = "hard_swish"
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        heads = x.shape[-1] // self.key_dim
        x = RelBiasAttentionSubsample(self.out_dim, heads, self.key_dim, DOWN_ATTN_RATIO, self.linear, self.act,
                                      name="attn_downsample")(x, train)
        y = LinearBnMlp(int(self.out_dim * DOWN_MLP_RATIO), self.linear, self.act, name="mlp")(x, train)
        return x + drop_path(y, self.drop_path_rate, train, self)


class LevitStage(nn.Module):
    stage: Stage
    key_dim: int
    downsample: bool
    linear: ModuleDef
    act: str = "hard_swish"
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.stage
        if self.downsample:
            x = Downsample(s.dim, self.key_dim, self.linear, self.act, self.drop_path_rate, name="downsample")(x, train)
        for j in range(s.depth):
            x = Block(s.dim, s.num_heads, self.key_dim, self.linear, self.act, self.drop_path_rate,
                      name=f"blocks_{j}")(x, train)
        return x


class Stem16(nn.Module):
    """Four 3x3/2 conv+BN, widths dim/8, dim/4, dim/2, dim; act after all but the last. Returns (x, [the first
    three outputs])."""

    dim: int
    conv_bn: ModuleDef
    act: str = "hard_swish"

    @nn.compact
    def __call__(self, x, train: bool = False):
        feats = []
        for i, div in enumerate((8, 4, 2, 1)):
            last = div == 1
            x = self.conv_bn(self.dim // div, 3, 2, act=None if last else self.act, name=f"conv{i + 1}")(x, train)
            if not last:
                feats.append(x)
        return x, feats


class DistilledHead(nn.Module):
    """Two BatchNorm -> dropout -> Linear heads on the same pooled features, logits averaged (timm's NormLinear
    `head` and `head_dist`, LevitDistilled's output), on the backbone dict's `pre_logits` (`zoo.models.heads`).
    `deploy=True`: each BatchNorm folded into its Linear, the two kept, as the official LeViT code fuses them (one
    Dense could compute the average with one classifier's parameters fewer).
    `num_classes=0`: the pooled features."""

    num_classes: int
    drop_rate: float = 0.0
    dense: ModuleDef = nn.Dense
    norm: ModuleDef = batch_norm(BN_EPS_TORCH)
    deploy: bool = False

    @nn.compact
    def __call__(self, feats, train: bool = False):
        x = feats[PRE_LOGITS]
        if self.num_classes <= 0:
            return x
        if self.deploy:
            y, y_dist = HeadPair(self.num_classes, self.dense, name="fc")(x, x)
            return ((y + y_dist) / 2).astype(jnp.float32)
        y = self.norm(use_running_average=not train, name="bn")(x)
        y_dist = self.norm(use_running_average=not train, name="bn_dist")(x)
        y = nn.Dropout(self.drop_rate)(y, deterministic=not train)
        y_dist = nn.Dropout(self.drop_rate)(y_dist, deterministic=not train)
        y, y_dist = HeadPair(self.num_classes, self.dense, name="fc")(y, y_dist)
        return ((y + y_dist) / 2).astype(jnp.float32)

    @staticmethod
    def reparameterize(variables: dict, *, eps: float = BN_EPS_TORCH) -> dict:
        """Training-form variables ({"params", "batch_stats"}, the head's subtree) -> the deploy form's: each
        BatchNorm folded into the Dense after it, x (t W) + (s W + b). float64, stored float32."""
        params, stats = variables["params"], variables.get("batch_stats", {})
        if "bn" not in params:
            raise ValueError("DistilledHead.reparameterize: no `bn` in the variables (already deployed?)")
        fc = {}
        for bn, name in (("bn", "head"), ("bn_dist", "head_dist")):
            t, s = bn_affine(params[bn], stats[bn], eps)
            w = np.asarray(params["fc"][name]["kernel"], np.float64)
            fc[name] = {"kernel": (t[:, None] * w).astype(np.float32),
                        "bias": (s @ w + np.asarray(params["fc"][name]["bias"], np.float64)).astype(np.float32)}
        return {"params": {"fc": fc}}


def _reparameterize_head(module: DistilledHead, variables: dict) -> dict:
    if module.num_classes <= 0:
        return {k: v for k, v in variables.items() if k == "params"}
    return DistilledHead.reparameterize(variables, eps=norm_eps(module.norm))


kinds.register(DistilledHead, kinds.LayerKind("reparam", reparameterize=_reparameterize_head))


class LeViT(nn.Module):
    """Backbone (Stem16 -> stages, NHWC maps, the first stage at 1/16 -> mean over positions: `pre_logits`) +
    distilled head. `features=True`: the backbone's dict (`zoo.models.heads`).
    `deploy=True`: every Linear/conv+BN is one Dense/conv with a bias, and each classifier's BatchNorm is folded
    into its Linear (the variables `compress.deploy.reparameterize` gives)."""

    stages: Stages
    key_dim: int
    act: str = "hard_swish"
    bn_eps: float = BN_EPS_TORCH
    deploy: bool = False
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # the same rate in every block, as timm
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); parameters stay float32
    # injected layer factories (None: the defaults; see `zoo.models.backbone.layer_factories`)
    conv: Any = None
    norm: Any = None
    dense: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        check_images(x, self.in_chans, "LeViT")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        linear = partial(LinearBn, dense=dense, norm=norm, deploy=self.deploy)
        conv_bn = partial(Conv2dBn, conv=conv, norm=norm, deploy=self.deploy)
        image_hw = x.shape[1:3]
        x, maps = Stem16(self.stages[0].dim, conv_bn, self.act, name="stem")(x, train)
        self._check_bias_table(image_hw, x.shape[1:3])
        for i, s in enumerate(self.stages):
            x = LevitStage(s, self.key_dim, i > 0, linear, self.act, self.drop_path_rate, name=f"stages_{i}")(x, train)
            maps.append(x)
        names = [f.name for f in feature_info(self.stages)]
        feats = feature_dict(names, maps[:len(names)], jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return DistilledHead(self.num_classes, self.drop_rate, dense, norm, self.deploy, name="head")(feats, train)

    def _check_bias_table(self, image_hw, map_hw) -> None:
        """The attention biases are sized by the stride-16 map of the input the model was initialized at: another map
        would fail deep inside the first attention layer with a shape error; name the sizes that fit instead."""
        table = self.variables.get("params", {}).get("stages_0", {}).get("blocks_0", {}).get("attn", {}).get(
            "attention_biases")
        h, w = map_hw
        if table is None or table.shape[-1] == h * w:
            return
        size = int(table.shape[-1])
        side = int(round(size ** 0.5))
        made = (f"a {side}x{side} map at stride 16, which inputs of {16 * (side - 1) + 1} to {16 * side} pixels a "
                f"side give (e.g. {16 * side}x{16 * side})" if side * side == size else
                f"a map of {size} positions at stride 16 (the input size the model was initialized at)")
        raise ValueError(f"LeViT's attention biases are for {made}, but the {image_hw[0]}x{image_hw[1]} input gives a "
                         f"{h}x{w} map. Run the model at the size its weights were made for, or create and initialize "
                         "it at the new size (new, untrained biases).")


def timm_rename(module: LeViT):
    """timm Levit keys: `stages.{i}.blocks.{j}.` -> `stages_{i}/blocks_{j}/`, `proj.ln` / `q.ln` -> `proj` / `q`,
    `head.linear` / `head_dist.linear` -> `head/fc/head` / `head/fc/head_dist`, `head_dist.bn` -> `head/bn_dist`;
    the rest 1:1."""

    def rename(path: str) -> str | None:
        path = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages_\1/blocks_\2/", path)
        path = re.sub(r"^stages\.(\d+)\.downsample\.", r"stages_\1/downsample/", path)
        path = re.sub(r"\.(proj|q)\.ln\.", r".\1.", path)
        path = {"head.linear": "head.fc.head", "head_dist.linear": "head.fc.head_dist",
                "head_dist.bn": "head.bn_dist"}.get(path, path)
        return path.replace(".", "/")

    return rename


# Facebook's distilled ImageNet-1k weights (github.com/facebookresearch/LeViT) as re-published by timm. timm's
# default_cfgs record no accuracy: top1 is the paper's (224x224, distilled).
_FB = dict(crop_pct=0.9, origin="https://github.com/facebookresearch/LeViT")

# name: (table, key_dim, pretrained weights)
VARIANTS = {
    "levit_128s": (LEVIT_128S, 16, (timm_weights("levit_128s", "fb_dist_in1k", top1=76.6, **_FB),)),
    "levit_128": (LEVIT_128, 16, (timm_weights("levit_128", "fb_dist_in1k", top1=78.6, **_FB),)),
    "levit_192": (LEVIT_192, 32, (timm_weights("levit_192", "fb_dist_in1k", top1=80.0, **_FB),)),
    "levit_256": (LEVIT_256, 32, (timm_weights("levit_256", "fb_dist_in1k", top1=81.6, **_FB),)),
    "levit_384": (LEVIT_384, 32, (timm_weights("levit_384", "fb_dist_in1k", top1=82.6, **_FB),)),
}


def _build(table: Stages, key_dim: int, **overrides) -> LeViT:
    return LeViT(**{**dict(stages=table, key_dim=key_dim), **overrides})


# timm's `levit_conv_*` forms compute the same function with 1x1 convolutions on NCHW maps in place of Linears on
# tokens, under the same parameter names: here they are the same module, loading the conv-shaped checkpoints
# (`zoo.convert` reshapes a 1x1 conv kernel onto a Dense one).
CONV_FORMS = {name.replace("levit_", "levit_conv_"): (table, kd, tuple(
    timm_weights(name.replace("levit_", "levit_conv_"), p.tag, top1=p.top1, **_FB) for p in weights))
    for name, (table, kd, weights) in VARIANTS.items()}

for _name, (_table, _kd, _weights) in {**VARIANTS, **CONV_FORMS}.items():
    register_model(
        ModelCfg(
            name=_name, family="levit", input_size=(224, 224), interpolation="bicubic", crop_pct=0.9,
            first_conv="stem/conv1/linear", classifier="head/fc", feature_info=feature_info(_table),
            paper="arXiv:2104.01136", twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _table, _kd))
