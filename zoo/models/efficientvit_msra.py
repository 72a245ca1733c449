"""EfficientViT (MSRA) (Liu et al., "EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention",
arXiv:2305.07027), M0-M5 as timm builds them (`timm/models/efficientvit_msra.py`, `efficientvit_m*`). Not MIT's
EfficientViT (arXiv:2205.14756, timm's `efficientvit_b*`), a different network of the same name.

A 16x16 patch embedding of four 3x3/2 conv+BN (ReLU between them), then three stages at strides 16, 32 and 64. Every
block is the paper's sandwich: x + dw(x), x + FFN(x), x + attention(x), x + dw(x), x + FFN(x), where dw is a
depthwise 3x3 conv+BN, the FFN two 1x1 conv+BN with ReLU between and expansion 2, and the attention is cascaded
group attention in 7x7 windows (`zoo.layers.cascaded_attention`: one head per channel group, each head fed the
previous one's output, a depthwise conv on every head's queries, a learned bias per relative offset). Stages 1 and 2
start with a subsampling block: x + dw(x), x + FFN(x) at the input width, patch merging (1x1 conv+BN to 4x the width,
ReLU, depthwise 3x3/2 conv+BN, ReLU, squeeze-excite, 1x1 conv+BN to the stage width), then x + dw(x), x + FFN(x).
Every conv is followed by a BatchNorm (`zoo.layers.linear_bn.Conv2dBn`), so the deploy form (`deploy=True`,
`compress.deploy`) is plain convolutions with biases. The classifier is BatchNorm -> dropout -> Linear on the pooled
last stage (timm's NormLinear); deployed, the BatchNorm folds into the Linear.

Attention windows and resolution: as in timm, the window of a stage is min(7, its map size at `img_size`), where
`img_size` (224 by default, timm's) is a constructor argument and a stage's map size is img_size // 16 halved
(rounding up) per subsampling stage: 7x7, 7x7 and 4x4 windows at 224 (maps 14, 7, 4). The attention biases are
`(heads, window**2)`, so the parameters follow `img_size` and not the input: the model runs at any input size,
splitting maps into windows and padding them as timm's model built for `img_size` does (64x64 inputs: maps 4, 2 and 1
padded to 7, 7 and 4). Weights for img_size=224 load into models built for img_size 208-271 (the same windows);
another img_size gives other bias shapes, and loading names them (the zoo does not resize bias tables).

Named outputs (`features=True`): the patch embedding's first three convs (strides 2, 4, 8, after their ReLU) and the
first two stages (strides 16 and 32). The network has no stage at stride 4 or 8; its last stage (stride 64,
`stages_2`) is not a named output (the zoo's feature pyramids end at stride 32), it is what `pre_logits` pools.

Parameter names mirror timm's module names (`patch_embed/conv1/linear`, `stages_0/blocks_0/mixer/attn/qkvs_0/bn`,
`stages_1/downsample/patchmerge/se/conv_reduce`, `stages_2/blocks_2/ffn1/pw2/linear`); the timm key map is a few
substitutions (`timm_rename`). The head is `head/bn` and `head/fc` (timm's `head.linear`).
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
from zoo.layers.cascaded_attention import LocalWindowAttention
from zoo.layers.linear_bn import Conv2dBn, bn_affine, norm_eps
from zoo.layers.norm import BN_EPS_TORCH, batch_norm
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import PRE_LOGITS, feature_dict, layer_factories
from zoo.models.mobilenet_base import make_divisible
from zoo.registry import register_model

ModuleDef = Any


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage: `depth` sandwich blocks of width `dim` with `num_heads` attention heads. Every stage but the first
    starts with a subsampling block (stride 2) from the previous width to `dim`."""

    dim: int
    depth: int
    num_heads: int


# The model variants of arXiv:2305.07027 (widths C, depths L and heads H per stage; timm's efficientvit_m*), 224x224
# input. Key dim 16 and 7x7 windows in every stage; `KERNELS` below gives the query kernels of each head.
M0 = (
    Stage(dim=64, depth=1, num_heads=4),  # stage 0, 14x14 in
    Stage(dim=128, depth=2, num_heads=4),  # stage 1, 14x14 in
    Stage(dim=192, depth=3, num_heads=4),  # stage 2, 7x7 in
)
M1 = (
    Stage(dim=128, depth=1, num_heads=2),  # stage 0, 14x14 in
    Stage(dim=144, depth=2, num_heads=3),  # stage 1, 14x14 in
    Stage(dim=192, depth=3, num_heads=3),  # stage 2, 7x7 in
)
M2 = (
    Stage(dim=128, depth=1, num_heads=4),  # stage 0, 14x14 in
    Stage(dim=192, depth=2, num_heads=3),  # stage 1, 14x14 in
    Stage(dim=224, depth=3, num_heads=2),  # stage 2, 7x7 in
)
M3 = (
    Stage(dim=128, depth=1, num_heads=4),  # stage 0, 14x14 in
    Stage(dim=240, depth=2, num_heads=3),  # stage 1, 14x14 in
    Stage(dim=320, depth=3, num_heads=4),  # stage 2, 7x7 in
)
M4 = (
    Stage(dim=128, depth=1, num_heads=4),  # stage 0, 14x14 in
    Stage(dim=256, depth=2, num_heads=4),  # stage 1, 14x14 in
    Stage(dim=384, depth=3, num_heads=4),  # stage 2, 7x7 in
)
M5 = (
    Stage(dim=192, depth=1, num_heads=3),  # stage 0, 14x14 in
    Stage(dim=288, depth=3, num_heads=3),  # stage 1, 14x14 in
    Stage(dim=384, depth=4, num_heads=4),  # stage 2, 7x7 in
)

Stages = tuple[Stage, ...]

# Depthwise kernel size on each head's queries (head i uses entry i), the same in every stage
KERNELS_5 = (5, 5, 5, 5)
KERNELS_7533 = (7, 5, 3, 3)

KEY_DIM = 16
WINDOW = 7
PATCH = 16  # the patch embedding's stride
FFN_RATIO = 2
MERGE_RATIO = 4  # patch merging's hidden width over its input width
SE_RATIO = 0.25


def feature_info(stages: Stages) -> tuple[FeatureInfo, ...]:
    """The patch embedding's first three convs (strides 2, 4, 8) and the first two stages (16, 32); the last stage
    (stride 64) is left out (module doc)."""
    e = stages[0].dim
    return (FeatureInfo("patch_embed/conv1", 2, e // 8), FeatureInfo("patch_embed/conv2", 4, e // 4),
            FeatureInfo("patch_embed/conv3", 8, e // 2), FeatureInfo("stages_0", 16, stages[0].dim),
            FeatureInfo("stages_1", 32, stages[1].dim))


def stage_windows(img_size: int, num_stages: int, window: int = WINDOW) -> tuple[int, ...]:
    """Each stage's attention window for a model built for `img_size` (timm's): min(window, the stage's map size),
    the map img_size // 16 in stage 0, halved rounding up by each later (subsampling) stage."""
    if not isinstance(img_size, (int, np.integer)) or isinstance(img_size, bool) or img_size < PATCH:
        raise ValueError(f"EfficientViT: img_size (which sets the attention windows) must be an int >= {PATCH}, "
                         f"got {img_size!r}")
    res, out = int(img_size) // PATCH, []
    for i in range(num_stages):
        if i > 0:
            res = (res - 1) // 2 + 1
        out.append(min(window, res))
    return tuple(out)


class Ffn(nn.Module):
    """1x1 conv+BN to `hidden` -> ReLU -> 1x1 conv+BN back to the input width (timm's ConvMlp: `pw1`, `pw2`); the
    second BatchNorm's scale starts at zero, so a residual FFN starts as the identity."""

    hidden: int
    conv_bn: ModuleDef
    zero_conv_bn: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = self.conv_bn(self.hidden, 1, act="relu", name="pw1")(x, train)
        return self.zero_conv_bn(c, 1, name="pw2")(x, train)


class DwFfn(nn.Module):
    """x + dw(x), then x + FFN(x): a subsampling block's residual pair before and after its patch merging (timm's
    `res1` / `res2`, children `0` and `1` -> `dw`, `ffn`). The dw conv's BatchNorm starts at the default scale, the
    FFN's last at zero, as timm's."""

    conv_bn: ModuleDef
    ffn: ModuleDef  # Ffn with the network's layers bound

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = x + self.conv_bn(c, 3, groups=c, name="dw")(x, train)
        return x + self.ffn(c * FFN_RATIO, name="ffn")(x, train)


class PatchMerging(nn.Module):
    """1x1 conv+BN to 4x the width -> ReLU -> depthwise 3x3/2 conv+BN -> ReLU -> squeeze-excite -> 1x1 conv+BN to
    `out_dim`."""

    out_dim: int
    conv_bn: ModuleDef
    conv: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        hidden = x.shape[-1] * MERGE_RATIO
        x = self.conv_bn(hidden, 1, act="relu", name="conv1")(x, train)
        x = self.conv_bn(hidden, 3, 2, groups=hidden, act="relu", name="conv2")(x, train)
        # timm's SqueezeExcite(hidden, 0.25): a quarter of the channels rounded to a multiple of 8, never bumped up
        rd = make_divisible(hidden * SE_RATIO, 8, round_limit=0.0)
        x = SqueezeExcite(rd, self.conv, "relu", "sigmoid", name="se")(x)
        return self.conv_bn(self.out_dim, 1, name="conv3")(x, train)


class Subsample(nn.Module):
    """DwFfn at the input width, patch merging to `out_dim` (stride 2), DwFfn at `out_dim` (timm's `downsample`)."""

    out_dim: int
    conv_bn: ModuleDef
    ffn: ModuleDef
    conv: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = DwFfn(self.conv_bn, self.ffn, name="res1")(x, train)
        x = PatchMerging(self.out_dim, self.conv_bn, self.conv, name="patchmerge")(x, train)
        return DwFfn(self.conv_bn, self.ffn, name="res2")(x, train)


class Block(nn.Module):
    """The sandwich: x + dw0(x), x + ffn0(x), x + mixer(x), x + dw1(x), x + ffn1(x). Every branch's last BatchNorm
    starts at scale zero (timm's bn_weight_init=0), so a block starts as the identity."""

    num_heads: int
    window: int
    key_dim: int
    kernels: tuple[int, ...]
    conv_bn: ModuleDef
    zero_conv_bn: ModuleDef
    ffn: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = x + self.zero_conv_bn(c, 3, groups=c, name="dw0")(x, train)
        x = x + self.ffn(c * FFN_RATIO, name="ffn0")(x, train)
        x = x + LocalWindowAttention(self.window, self.num_heads, self.key_dim, self.kernels, self.conv_bn,
                                     self.zero_conv_bn, name="mixer")(x, train)
        x = x + self.zero_conv_bn(c, 3, groups=c, name="dw1")(x, train)
        return x + self.ffn(c * FFN_RATIO, name="ffn1")(x, train)


class EfficientVitStage(nn.Module):
    """[Subsample to `stage.dim`] then `stage.depth` blocks."""

    stage: Stage
    downsample: bool
    window: int
    key_dim: int
    kernels: tuple[int, ...]
    conv_bn: ModuleDef
    zero_conv_bn: ModuleDef
    ffn: ModuleDef
    conv: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.stage
        if self.downsample:
            x = Subsample(s.dim, self.conv_bn, self.ffn, self.conv, name="downsample")(x, train)
        elif x.shape[-1] != s.dim:
            raise ValueError(f"EfficientViT: a stage without subsampling keeps its width ({x.shape[-1]} in, "
                             f"{s.dim} asked)")
        for j in range(s.depth):
            x = Block(s.num_heads, self.window, self.key_dim, self.kernels, self.conv_bn, self.zero_conv_bn,
                      self.ffn, name=f"blocks_{j}")(x, train)
        return x


class PatchEmbed(nn.Module):
    """Four 3x3/2 conv+BN, widths dim/8, dim/4, dim/2, dim; ReLU after all but the last. Returns (x, [the first
    three outputs])."""

    dim: int
    conv_bn: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        feats = []
        for i, div in enumerate((8, 4, 2, 1)):
            last = div == 1
            x = self.conv_bn(self.dim // div, 3, 2, act=None if last else "relu", name=f"conv{i + 1}")(x, train)
            if not last:
                feats.append(x)
        return x, feats


class NormLinearHead(nn.Module):
    """`pre_logits` -> BatchNorm `bn` -> dropout -> Linear `fc` (timm's NormLinear, logits in float32).
    `deploy=True`: the BatchNorm folded into `fc`. `num_classes=0`: the pooled features."""

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
        if not self.deploy:
            x = self.norm(use_running_average=not train, name="bn")(x)
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        return self.dense(self.num_classes, name="fc")(x).astype(jnp.float32)

    @staticmethod
    def reparameterize(variables: dict, *, eps: float = BN_EPS_TORCH) -> dict:
        """Training-form variables (the head's subtree) -> {"params": {"fc": kernel, bias}}: x (t W) + (s W + b).
        float64, stored float32."""
        params, stats = variables["params"], variables.get("batch_stats", {})
        if "bn" not in params:
            raise ValueError("NormLinearHead.reparameterize: no `bn` in the variables (already deployed?)")
        t, s = bn_affine(params["bn"], stats["bn"], eps)
        w = np.asarray(params["fc"]["kernel"], np.float64)
        bias = s @ w + np.asarray(params["fc"]["bias"], np.float64)
        return {"params": {"fc": {"kernel": (t[:, None] * w).astype(np.float32), "bias": bias.astype(np.float32)}}}


def _reparameterize_head(module: NormLinearHead, variables: dict) -> dict:
    if module.num_classes <= 0:
        return {k: v for k, v in variables.items() if k == "params"}
    return NormLinearHead.reparameterize(variables, eps=norm_eps(module.norm))


kinds.register(NormLinearHead, kinds.LayerKind("reparam", reparameterize=_reparameterize_head))


class EfficientViTMsra(nn.Module):
    """Backbone (patch embedding -> three stages, strides 16-64 -> mean over positions: `pre_logits`) + BatchNorm/
    Linear head. `features=True`: the backbone's dict (`zoo.models.heads`). `deploy=True`: every conv+BN one conv
    with a bias, the head's BatchNorm folded into its Linear (the variables `compress.deploy.reparameterize` gives).
    `img_size` sets the attention windows (module doc), not the input size."""

    stages: Stages
    kernels: tuple[int, ...]
    key_dim: int = KEY_DIM
    window_size: int = WINDOW
    img_size: int = 224
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
        check_images(x, self.in_chans, "EfficientViT")
        windows = stage_windows(self.img_size, len(self.stages), self.window_size)
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        conv_bn = partial(Conv2dBn, conv=conv, norm=norm, deploy=self.deploy)
        zero_conv_bn = partial(conv_bn, norm=partial(norm, scale_init=nn.initializers.zeros))
        ffn = partial(Ffn, conv_bn=conv_bn, zero_conv_bn=zero_conv_bn)
        x, maps = PatchEmbed(self.stages[0].dim, conv_bn, name="patch_embed")(x, train)
        for i, s in enumerate(self.stages):
            x = EfficientVitStage(s, i > 0, windows[i], self.key_dim, tuple(self.kernels), conv_bn, zero_conv_bn,
                                  ffn, conv, name=f"stages_{i}")(x, train)
            maps.append(x)
        names = [f.name for f in feature_info(self.stages)]
        feats = feature_dict(names, maps[:len(names)], jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return NormLinearHead(self.num_classes, self.drop_rate, dense, norm, self.deploy, name="head")(feats, train)


def timm_rename(module: EfficientViTMsra):
    """timm EfficientVitMsra keys: `stages.{i}.blocks.{j}.` -> `stages_{i}/blocks_{j}/`, a residual wrapper's `.m`
    dropped, `downsample.res{1,2}.0` / `.1` -> `res{1,2}/dw` / `ffn`, `qkvs.{h}` / `dws.{h}` -> `qkvs_{h}` /
    `dws_{h}`, `proj.1` -> `proj`, a ConvNorm's `conv` -> `linear`, SE `fc1` / `fc2` -> `conv_reduce` /
    `conv_expand`, `head.linear` -> `head/fc`; the rest 1:1."""

    def rename(path: str) -> str | None:
        path = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages_\1/blocks_\2/", path)
        path = re.sub(r"^stages\.(\d+)\.downsample\.", r"stages_\1/downsample/", path)
        path = path.replace(".m.", ".")
        path = re.sub(r"(^|[./])res([12])\.0\.", r"\1res\2.dw.", path)
        path = re.sub(r"(^|[./])res([12])\.1\.", r"\1res\2.ffn.", path)
        path = re.sub(r"\.(qkvs|dws)\.(\d+)\.", r".\1_\2.", path)
        path = path.replace(".proj.1.", ".proj.")
        path = re.sub(r"\.conv$", ".linear", path)
        path = re.sub(r"\.se\.fc1$", ".se.conv_reduce", path)
        path = re.sub(r"\.se\.fc2$", ".se.conv_expand", path)
        path = {"head.linear": "head.fc"}.get(path, path)
        return path.replace(".", "/")

    return rename


# The authors' ImageNet-1k weights (github.com/microsoft/Cream, EfficientViT) as re-published by timm. timm's
# default_cfgs record no accuracy: top1 is the paper's (224x224).
_MSRA = dict(license="mit", origin="https://github.com/microsoft/Cream/tree/main/EfficientViT")

# name: (table, query kernels, pretrained weights)
VARIANTS = {
    "efficientvit_m0": (M0, KERNELS_5, (timm_weights("efficientvit_m0", "r224_in1k", top1=63.2, **_MSRA),)),
    "efficientvit_m1": (M1, KERNELS_7533, (timm_weights("efficientvit_m1", "r224_in1k", top1=68.4, **_MSRA),)),
    "efficientvit_m2": (M2, KERNELS_7533, (timm_weights("efficientvit_m2", "r224_in1k", top1=70.8, **_MSRA),)),
    "efficientvit_m3": (M3, KERNELS_5, (timm_weights("efficientvit_m3", "r224_in1k", top1=73.4, **_MSRA),)),
    "efficientvit_m4": (M4, KERNELS_7533, (timm_weights("efficientvit_m4", "r224_in1k", top1=74.3, **_MSRA),)),
    "efficientvit_m5": (M5, KERNELS_7533, (timm_weights("efficientvit_m5", "r224_in1k", top1=77.1, **_MSRA),)),
}


def _build(table: Stages, kernels: tuple[int, ...], **overrides) -> EfficientViTMsra:
    return EfficientViTMsra(**{**dict(stages=table, kernels=kernels), **overrides})


for _name, (_table, _kernels, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="efficientvit_msra", input_size=(224, 224), interpolation="bicubic", crop_pct=0.875,
            first_conv="patch_embed/conv1/linear", classifier="head/fc", feature_info=feature_info(_table),
            paper="arXiv:2305.07027 model variants", twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _table, _kernels))
