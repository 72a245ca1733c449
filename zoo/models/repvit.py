"""RepViT (Wang et al., "RepViT: Revisiting Mobile CNN From ViT Perspective", arXiv:2307.09283), M0.9 / M1.0 / M1.1 /
M1.5 / M2.3 as timm builds them (`timm/models/repvit.py`, `repvit_m*_*`).

A MobileNetV3-style CNN rebuilt with a ViT's macro design: a stem of two 3x3/2 conv+BN (GELU between), then four
stages at strides 4-32. Every block separates the token mixer from the channel mixer: a re-parameterizable depthwise
3x3 (`zoo.layers.repvgg_dw.RepVggDw`), squeeze-excite in every other block (the first, third, ... of a stage), then
x + MLP(x), the MLP two 1x1 conv+BN with GELU between and expansion 2. Stages 1-3 start with a separate downsampling
layer: a block without SE, a depthwise 3x3/2 conv+BN, a 1x1 conv+BN to the stage width and a residual MLP. Every
conv is followed by a BatchNorm (`zoo.layers.linear_bn.Conv2dBn`), so the deploy form (`deploy=True`,
`compress.deploy`) is plain convolutions with biases.

The classifier is the distilled head: two BatchNorm+Linear heads on the pooled features, logits averaged (timm's
eval output; its training output unless `distilled_training` is set, which the zoo does not offer). Deployed, the
BatchNorms fold into their Linears and the two average into one Linear, as timm's `fuse()` does.

Parameter names mirror timm's module names (`stem/conv1/linear`, `stages_1/downsample/pre_block/token_mixer/conv1`,
`stages_2/blocks_3/channel_mixer/conv2/bn`, `stages_0/blocks_0/se/conv_reduce`); the timm key map is a few
substitutions (`timm_rename`). The heads are `head/bn`, `head/bn_dist`, `head/fc/head`, `head/fc/head_dist`, as
LeViT's, so that the classifier (`head/fc`) does not include the BatchNorms.
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
from zoo.layers.blocks import SqueezeExcite
from zoo.layers.linear_bn import Conv2dBn, bn_affine, norm_eps
from zoo.layers.norm import BN_EPS_TORCH, batch_norm
from zoo.layers.repvgg_dw import RepVggDw
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import PRE_LOGITS, feature_dict, layer_factories
from zoo.models.heads import HeadPair
from zoo.models.mobilenet_base import make_divisible
from zoo.registry import register_model

ModuleDef = Any


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage: `depth` RepViT blocks of width `dim`; every stage but the first starts with a downsampling layer."""

    dim: int
    depth: int


# The model configurations of arXiv:2307.09283 (channels and blocks per stage), 224x224 input; MLP expansion 2,
# 3x3 depthwise kernels, GELU, squeeze-excite (ratio 0.25) in alternate blocks.
M0_9 = (
    Stage(dim=48, depth=2),  # stage 0, 56x56 in
    Stage(dim=96, depth=2),  # stage 1, 56x56 in
    Stage(dim=192, depth=14),  # stage 2, 28x28 in
    Stage(dim=384, depth=2),  # stage 3, 14x14 in
)
M1_0 = (
    Stage(dim=56, depth=2),  # stage 0, 56x56 in
    Stage(dim=112, depth=2),  # stage 1, 56x56 in
    Stage(dim=224, depth=14),  # stage 2, 28x28 in
    Stage(dim=448, depth=2),  # stage 3, 14x14 in
)
M1_1 = (
    Stage(dim=64, depth=2),  # stage 0, 56x56 in
    Stage(dim=128, depth=2),  # stage 1, 56x56 in
    Stage(dim=256, depth=12),  # stage 2, 28x28 in
    Stage(dim=512, depth=2),  # stage 3, 14x14 in
)
M1_5 = (
    Stage(dim=64, depth=4),  # stage 0, 56x56 in
    Stage(dim=128, depth=4),  # stage 1, 56x56 in
    Stage(dim=256, depth=24),  # stage 2, 28x28 in
    Stage(dim=512, depth=4),  # stage 3, 14x14 in
)
M2_3 = (
    Stage(dim=80, depth=6),  # stage 0, 56x56 in
    Stage(dim=160, depth=6),  # stage 1, 56x56 in
    Stage(dim=320, depth=34),  # stage 2, 28x28 in
    Stage(dim=640, depth=2),  # stage 3, 14x14 in
)

Stages = tuple[Stage, ...]

SE_RATIO = 0.25


def se_channels(channels: int) -> int:
    """timm's SqueezeExcite(channels, 0.25): a quarter of the channels rounded to a multiple of 8, never bumped up."""
    return make_divisible(channels * SE_RATIO, 8, round_limit=0.0)


def feature_info(stages: Stages) -> tuple[FeatureInfo, ...]:
    """Every stage output: stage 0 at the stem's stride 4, then each downsampling stage doubles it."""
    return tuple(FeatureInfo(f"stages_{i}", 4 * 2 ** i, s.dim) for i, s in enumerate(stages))


class Mlp(nn.Module):
    """1x1 conv+BN to `hidden` -> act -> 1x1 conv+BN back to the input width (timm's RepVitMlp: `conv1`, `conv2`).
    `conv_bn`: `Conv2dBn` with the network's conv, norm and form bound; `last_conv_bn`: the same whose BatchNorm
    scale starts at zero, so a residual branch starts as the identity (timm's `bn_weight_init=0`)."""

    hidden: int
    conv_bn: ModuleDef
    last_conv_bn: ModuleDef
    act: str = "gelu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = self.conv_bn(self.hidden, 1, act=self.act, name="conv1")(x, train)
        return self.last_conv_bn(c, 1, name="conv2")(x, train)


class Block(nn.Module):
    """token mixer (`RepVggDw`) -> [SE] -> x + channel mixer (`Mlp`)."""

    use_se: bool
    mlp_ratio: int
    token_mixer: ModuleDef
    mlp: ModuleDef  # `Mlp` with the network's layers bound
    conv: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.token_mixer(name="token_mixer")(x, train)
        if self.use_se:
            x = SqueezeExcite(se_channels(x.shape[-1]), self.conv, "relu", "sigmoid", name="se")(x)
        return x + self.mlp(x.shape[-1] * self.mlp_ratio, name="channel_mixer")(x, train)


class Downsample(nn.Module):
    """A block without SE at the input width, depthwise kxk/2 conv+BN, 1x1 conv+BN to `out_dim`, x + MLP(x)."""

    out_dim: int
    mlp_ratio: int
    kernel_size: int
    block: ModuleDef  # `Block` with the network's layers bound
    conv_bn: ModuleDef
    mlp: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = self.block(use_se=False, name="pre_block")(x, train)
        x = self.conv_bn(c, self.kernel_size, 2, groups=c, name="spatial_downsample")(x, train)
        x = self.conv_bn(self.out_dim, 1, name="channel_downsample")(x, train)
        return x + self.mlp(self.out_dim * self.mlp_ratio, name="ffn")(x, train)


class RepVitStage(nn.Module):
    """[Downsample] then `depth` blocks, squeeze-excite in the first and every other one after it."""

    stage: Stage
    downsample: bool
    mlp_ratio: int
    kernel_size: int
    block: ModuleDef
    conv_bn: ModuleDef
    mlp: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.stage
        if self.downsample:
            x = Downsample(s.dim, self.mlp_ratio, self.kernel_size, self.block, self.conv_bn, self.mlp,
                           name="downsample")(x, train)
        for j in range(s.depth):
            x = self.block(use_se=j % 2 == 0, name=f"blocks_{j}")(x, train)
        return x


class Stem(nn.Module):
    """3x3/2 conv+BN to dim/2 -> act -> 3x3/2 conv+BN to dim (`conv1`, `conv2`)."""

    dim: int
    conv_bn: ModuleDef
    act: str = "gelu"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv_bn(self.dim // 2, 3, 2, act=self.act, name="conv1")(x, train)
        return self.conv_bn(self.dim, 3, 2, name="conv2")(x, train)


class AveragedDistilledHead(nn.Module):
    """`pre_logits` -> dropout -> two BatchNorm -> Linear heads, logits averaged (timm's RepVitClassifier of two
    NormLinear). `deploy=True`: one Linear `fc` computing that average (each BatchNorm folded into its Linear, then
    the two averaged, as timm's `fuse()`). `num_classes=0`: the pooled features."""

    num_classes: int
    drop_rate: float = 0.0
    dense: ModuleDef = nn.Dense
    norm: ModuleDef = batch_norm(BN_EPS_TORCH)
    deploy: bool = False

    @nn.compact
    def __call__(self, feats, train: bool = False):
        x = feats[PRE_LOGITS]
        if self.num_classes <= 0:
            return x.astype(jnp.float32)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        if self.deploy:
            return self.dense(self.num_classes, name="fc")(x).astype(jnp.float32)
        y = self.norm(use_running_average=not train, name="bn")(x)
        y_dist = self.norm(use_running_average=not train, name="bn_dist")(x)
        y, y_dist = HeadPair(self.num_classes, self.dense, name="fc")(y, y_dist)
        return ((y + y_dist) / 2).astype(jnp.float32)

    @staticmethod
    def reparameterize(variables: dict, *, eps: float = BN_EPS_TORCH) -> dict:
        """Training-form variables (the head's subtree) -> {"params": {"fc": kernel, bias}}: the mean of the two
        heads with their BatchNorms folded, x (t W) + (s W + b). float64, stored float32."""
        params, stats = variables["params"], variables.get("batch_stats", {})
        if "bn" not in params:
            raise ValueError("AveragedDistilledHead.reparameterize: no `bn` in the variables (already deployed?)")
        kernel, bias = 0.0, 0.0
        for bn, name in (("bn", "head"), ("bn_dist", "head_dist")):
            t, s = bn_affine(params[bn], stats[bn], eps)
            w = np.asarray(params["fc"][name]["kernel"], np.float64)
            kernel = kernel + t[:, None] * w / 2
            bias = bias + (s @ w + np.asarray(params["fc"][name]["bias"], np.float64)) / 2
        return {"params": {"fc": {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}}}


def _reparameterize_head(module: AveragedDistilledHead, variables: dict) -> dict:
    if module.num_classes <= 0:
        return {k: v for k, v in variables.items() if k == "params"}
    return AveragedDistilledHead.reparameterize(variables, eps=norm_eps(module.norm))


kinds.register(AveragedDistilledHead, kinds.LayerKind("reparam", reparameterize=_reparameterize_head))


class RepViT(nn.Module):
    """Backbone (stem -> four stages, strides 4-32 -> mean over positions: `pre_logits`) + distilled head.
    `features=True`: the backbone's dict (`zoo.models.heads`). `deploy=True`: every conv+BN one conv with a bias,
    every token mixer one depthwise conv, the head one Linear (the variables `compress.deploy.reparameterize` gives)."""

    stages: Stages
    mlp_ratio: int = 2
    kernel_size: int = 3
    act: str = "gelu"
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
        check_images(x, self.in_chans, "RepViT")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        conv_bn = partial(Conv2dBn, conv=conv, norm=norm, deploy=self.deploy)
        last_conv_bn = partial(conv_bn, norm=partial(norm, scale_init=nn.initializers.zeros))
        mlp = partial(Mlp, conv_bn=conv_bn, last_conv_bn=last_conv_bn, act=self.act)
        token_mixer = partial(RepVggDw, self.kernel_size, conv=conv, norm=norm, deploy=self.deploy)
        block = partial(Block, mlp_ratio=self.mlp_ratio, token_mixer=token_mixer, mlp=mlp, conv=conv)
        x = Stem(self.stages[0].dim, conv_bn, self.act, name="stem")(x, train)
        maps = []
        for i, s in enumerate(self.stages):
            x = RepVitStage(s, i > 0, self.mlp_ratio, self.kernel_size, block, conv_bn, mlp,
                            name=f"stages_{i}")(x, train)
            maps.append(x)
        feats = feature_dict([f.name for f in feature_info(self.stages)], maps,
                             jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return AveragedDistilledHead(self.num_classes, self.drop_rate, dense, norm, self.deploy, name="head")(
            feats, train)


def timm_rename(module: RepViT):
    """timm RepVit keys: `stages.{i}.blocks.{j}.` -> `stages_{i}/blocks_{j}/`, a ConvNorm's conv `c` -> `linear`,
    SE `fc1` / `fc2` -> `conv_reduce` / `conv_expand`, the heads' `head.head.l` / `head.head_dist.l` ->
    `head/fc/head` / `head/fc/head_dist` and `head.head_dist.bn` -> `head/bn_dist`; the rest 1:1."""

    def rename(path: str) -> str | None:
        path = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages_\1/blocks_\2/", path)
        path = re.sub(r"^stages\.(\d+)\.downsample\.", r"stages_\1/downsample/", path)
        path = re.sub(r"\.c$", ".linear", path)
        path = re.sub(r"([./])se\.fc1$", r"\1se.conv_reduce", path)
        path = re.sub(r"([./])se\.fc2$", r"\1se.conv_expand", path)
        path = {"head.head.l": "head.fc.head", "head.head_dist.l": "head.fc.head_dist", "head.head.bn": "head.bn",
                "head.head_dist.bn": "head.bn_dist"}.get(path, path)
        return path.replace(".", "/")

    return rename


# The authors' distilled ImageNet-1k weights (github.com/THU-MIG/RepViT), 300 and 450 epochs, as re-published by
# timm. Top-1/5 as timm evaluates them (pytorch-image-models, results/results-imagenet.csv; 224x224, crop 0.95).
_THU = dict(crop_pct=0.95, origin="https://github.com/THU-MIG/RepViT")

# name: (table, pretrained weights; timm's default tag first)
VARIANTS = {
    "repvit_m0_9": (M0_9, (
        timm_weights("repvit_m0_9", "dist_300e_in1k", top1=78.652, top5=94.114, **_THU),
        timm_weights("repvit_m0_9", "dist_450e_in1k", top1=79.058, top5=94.388, **_THU),
    )),
    "repvit_m1_0": (M1_0, (
        timm_weights("repvit_m1_0", "dist_300e_in1k", top1=80.152, top5=94.77, **_THU),
        timm_weights("repvit_m1_0", "dist_450e_in1k", top1=80.43, top5=94.922, **_THU),
    )),
    "repvit_m1_1": (M1_1, (
        timm_weights("repvit_m1_1", "dist_300e_in1k", top1=80.826, top5=95.174, **_THU),
        timm_weights("repvit_m1_1", "dist_450e_in1k", top1=81.314, top5=95.568, **_THU),
    )),
    "repvit_m1_5": (M1_5, (
        timm_weights("repvit_m1_5", "dist_300e_in1k", top1=82.382, top5=96.026, **_THU),
        timm_weights("repvit_m1_5", "dist_450e_in1k", top1=82.52, top5=96.112, **_THU),
    )),
    "repvit_m2_3": (M2_3, (
        timm_weights("repvit_m2_3", "dist_300e_in1k", top1=83.524, top5=96.532, **_THU),
        timm_weights("repvit_m2_3", "dist_450e_in1k", top1=83.746, top5=96.65, **_THU),
    )),
}


def _build(table: Stages, **overrides) -> RepViT:
    return RepViT(**{**dict(stages=table), **overrides})


for _name, (_table, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="repvit", input_size=(224, 224), interpolation="bicubic", crop_pct=0.95,
            first_conv="stem/conv1/linear", classifier="head/fc", feature_info=feature_info(_table),
            paper="arXiv:2307.09283 model configurations", twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _table))
