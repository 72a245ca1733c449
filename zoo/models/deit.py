"""DeiT (Touvron et al., "Training data-efficient image transformers & distillation through attention",
arXiv:2012.12877): DeiT-Ti and DeiT-S, plain and distilled, as timm builds them (`timm/models/deit.py`,
`deit_*_patch16_224`: timm's `VisionTransformer` and `VisionTransformerDistilled`).

A plain ViT: a 16x16/16 conv embeds the patches (`patch_embed/proj`); the class token (and in the distilled
models the distillation token) goes before the patch tokens and a learned position embedding is added to all of them
(`zoo.layers.pos_embed`, module `tokens`); then 12 pre-norm transformer blocks (`zoo.layers.transformer`: LayerNorm,
multi-head softmax attention, LayerNorm, MLP of ratio 4 with exact GELU; LayerNorm eps 1e-6 as timm's) and a final
LayerNorm (`norm`). Without BatchNorm nothing folds: the deploy form (`deploy=True`) differs only in the distilled
head.

Heads. The plain model classifies the class token (`head/fc`). The distilled model has two Linears: `head/fc/head`
on the class token and `head/fc/head_dist` on the distillation token (trained against a teacher's hard labels in
the paper); `model(x)` returns the average of their logits, in training and in eval (timm's output in eval, and in
training unless `distilled_training` is set, which the zoo does not offer). `pre_logits` in the backbone's dict is
what timm's `forward_head(x, pre_logits=True)` gives: the class token, or in the distilled model the mean of the two
tokens (a network built with `num_classes=0` returns it). The two Linears read different tokens, so the distilled
head takes the tokens themselves, not `pre_logits`. Deployed, it is one Linear on the two tokens side by side,
[x_cls, x_dist] [W; W_dist] / 2 + (b + b_dist) / 2: the average in one matrix product, one bias fewer.

Input sizes. The position embedding is learned for 14x14 patches (224x224). Any input whose sides are multiples of
16 runs: its position embedding's patch part is resampled bicubically to the patch grid, the tokens' entries kept
(timm's `dynamic_img_size=True`, `zoo.layers.pos_embed` says what matches torch). Other sizes raise, naming the
nearest valid ones.

Feature maps. A ViT has one resolution: its tokens are a stride-16 map after every block. The backbone's dict
follows the zoo's stride 4-32 pyramid by taking the blocks at a quarter, half, three quarters and all of the depth
(`blocks_2`, `blocks_5`, `blocks_8`, `blocks_11`: the hooks DPT takes from ViT-B, arXiv:2103.13413) as patch maps
(prefix tokens dropped, no final norm: timm's `forward_intermediates`) and resampling them without parameters:
`blocks_2` upsampled 4x (stride 4) and `blocks_5` 2x (stride 8), both bilinear (torch's, align_corners=False),
`blocks_8` as it is (stride 16), `blocks_11` max-pooled 2x2/2 (stride 32, as ViTDet's simple pyramid takes it,
arXiv:2203.16527; an odd grid is padded at the end). The finer maps are interpolated, not computed at their stride:
they hold no more detail than the stride-16 tokens (ViTDet learns deconvolutions there, which a task head can add).
The pyramid is built only when asked for (`features=True`).

Parameter names mirror timm's module names (`patch_embed/proj`, `blocks_3/attn/qkv`, `blocks_3/mlp/fc1`, `norm`);
timm's top-level `cls_token`, `dist_token` and `pos_embed` live in `tokens`; the timm key map is a few
substitutions (`timm_rename`).
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
from zoo.layers.patches import resize_bilinear
from zoo.layers.pos_embed import PrefixTokensPosEmbed
from zoo.layers.token_merging import merge_schedule
from zoo.layers.transformer import TransformerBlock
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import PRE_LOGITS, feature_dict, layer_factories
from zoo.models.heads import ClassifierHead, HeadPair
from zoo.registry import register_model

ModuleDef = Any

LN_EPS = 1e-6  # timm's LayerNorm in its VisionTransformer


@dataclass(frozen=True, kw_only=True)
class ViTSpec:
    """A ViT's shape: `depth` blocks of width `embed_dim` with `num_heads` heads and MLPs `mlp_ratio` times as wide,
    on 16x16 patches (`PATCH`)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0


# Table 1 of arXiv:2012.12877 (DeiT-Ti, DeiT-S: embedding dimension, heads, layers), 224x224 input, 14x14 patches.
DEIT_TINY = ViTSpec(embed_dim=192, depth=12, num_heads=3)
DEIT_SMALL = ViTSpec(embed_dim=384, depth=12, num_heads=6)

PATCH = 16  # every DeiT here: the tokens are a stride-16 map
TRAINED_GRID = (14, 14)  # the position embedding's grid: 224x224 input
PYRAMID_STRIDES = (4, 8, 16, 32)


def pyramid_blocks(depth: int) -> tuple[int, ...]:
    """The blocks whose outputs make the stride 4, 8, 16, 32 maps: the last of each quarter of the depth."""
    return tuple(depth * (k + 1) // 4 - 1 for k in range(len(PYRAMID_STRIDES)))


def feature_info(spec: ViTSpec) -> tuple[FeatureInfo, ...]:
    """The stride 4-32 pyramid built from four blocks' stride-16 token maps (module docstring)."""
    return tuple(FeatureInfo(f"blocks_{b}", s, spec.embed_dim)
                 for b, s in zip(pyramid_blocks(spec.depth), PYRAMID_STRIDES))


def check_patch_grid(h: int, w: int, patch: int, model: str = "DeiT") -> tuple[int, int]:
    """The (rows, cols) of patches of an h x w input; raise naming valid sizes unless both are positive multiples of
    `patch`."""
    if h % patch == 0 and w % patch == 0 and h >= patch and w >= patch:
        return h // patch, w // patch

    def near(n: int) -> str:
        lo, hi = (n // patch) * patch, (n // patch + 1) * patch
        return f"{n}" if n == lo and lo else f"{hi}" if lo == 0 else f"{lo} or {hi}"

    raise ValueError(
        f"{model} takes images whose height and width are multiples of its patch size {patch} (224x224 as trained; "
        f"the position embedding is resampled for any other multiple, e.g. 160, 192, 256); got {h}x{w}: use a "
        f"height of {near(h)} and a width of {near(w)}")


class PatchEmbed(nn.Module):
    """kxk/k conv with a bias to `dim` (timm's `patch_embed.proj`), on an input whose sides are multiples of k."""

    dim: int
    patch_size: int
    conv: ModuleDef

    @nn.compact
    def __call__(self, x):
        check_patch_grid(x.shape[1], x.shape[2], self.patch_size)
        return self.conv(self.dim, self.patch_size, stride=self.patch_size, padding=0, use_bias=True,
                         name="proj")(x)


def token_pyramid(maps, token_stride: int = PATCH, strides=PYRAMID_STRIDES) -> list:
    """Token maps (NHWC, at `token_stride`) -> maps at `strides` (module docstring): bilinear upsampling to the finer
    strides, the map as it is at its own, 2x2/2 max pooling to twice it (an odd side padded at its end)."""
    out = []
    for x, s in zip(maps, strides):
        h, w = x.shape[1:3]
        if s < token_stride and token_stride % s == 0:
            x = resize_bilinear(x, (h * token_stride // s, w * token_stride // s))
        elif s == 2 * token_stride:
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding=((0, h % 2), (0, w % 2)))
        elif s != token_stride:
            raise ValueError(f"token_pyramid: stride {s} is neither a divisor of the tokens' stride {token_stride} "
                             f"nor twice it")
        out.append(x)
    return out


class DistilledTokenHead(nn.Module):
    """The class and distillation tokens (B, 2, C) -> dropout -> Linear `fc/head` on the class token and
    `fc/head_dist` on the distillation token, logits averaged (timm's `VisionTransformerDistilled.forward_head`).
    `deploy=True`: one Linear `fc` on the two tokens side by side computing that average. `num_classes=0`: the mean
    of the two tokens (timm's pre-logits)."""

    num_classes: int
    drop_rate: float = 0.0
    dense: ModuleDef = nn.Dense
    deploy: bool = False

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        if self.num_classes <= 0:
            return ((tokens[:, 0] + tokens[:, 1]) / 2).astype(jnp.float32)
        tokens = nn.Dropout(self.drop_rate)(tokens, deterministic=not train)
        if self.deploy:
            b, n, c = tokens.shape
            return self.dense(self.num_classes, name="fc")(tokens.reshape(b, n * c)).astype(jnp.float32)
        y, y_dist = HeadPair(self.num_classes, self.dense, name="fc")(tokens[:, 0], tokens[:, 1])
        return ((y + y_dist) / 2).astype(jnp.float32)

    @staticmethod
    def reparameterize(variables: dict) -> dict:
        """Training-form variables (the head's subtree) -> {"params": {"fc": kernel (2C, classes), bias}}: the two
        kernels stacked and halved, the biases averaged. float64, stored float32."""
        params = variables["params"]
        if "head" not in params.get("fc", {}):
            raise ValueError("DistilledTokenHead.reparameterize: no `fc/head` in the variables (already deployed?)")
        fc = {k: {n: np.asarray(a, np.float64) for n, a in params["fc"][k].items()} for k in ("head", "head_dist")}
        kernel = np.concatenate([fc["head"]["kernel"], fc["head_dist"]["kernel"]], axis=0) / 2
        bias = (fc["head"]["bias"] + fc["head_dist"]["bias"]) / 2
        return {"params": {"fc": {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}}}


def _reparameterize_head(module: DistilledTokenHead, variables: dict) -> dict:
    if module.num_classes <= 0:
        return {k: v for k, v in variables.items() if k == "params"}
    return DistilledTokenHead.reparameterize(variables)


kinds.register(DistilledTokenHead, kinds.LayerKind("reparam", reparameterize=_reparameterize_head))


class DeiT(nn.Module):
    """Backbone (patch embedding -> prefix tokens + position embedding -> blocks -> LayerNorm; `pre_logits`: the
    class token, or the mean of the class and distillation tokens) + head (module docstring). `features=True`: the
    backbone's dict (`zoo.models.heads`). `deploy=True`: the distilled head as one Linear; the rest unchanged."""

    spec: ViTSpec
    distilled: bool = False
    deploy: bool = False
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # grows linearly over the blocks to this rate, as timm's
    # token merging (ToMe, `zoo.layers.token_merging`): patch tokens merged by every block, or one count per block
    merge_tokens: int | tuple[int, ...] = 0
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); parameters stay float32
    # injected layer factories (None: the defaults; see `zoo.models.backbone.layer_factories`); no BatchNorm here
    conv: Any = None
    norm: Any = None
    dense: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        check_images(x, self.in_chans, "DeiT")
        s = self.spec
        conv, _, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=LN_EPS, dtype=self.dtype)
        ln = partial(nn.LayerNorm, epsilon=LN_EPS, use_fast_variance=False, dtype=self.dtype)
        num_prefix = 2 if self.distilled else 1
        x = PatchEmbed(s.embed_dim, PATCH, conv, name="patch_embed")(x)
        grid = x.shape[1:3]
        x = PrefixTokensPosEmbed(TRAINED_GRID, num_prefix, name="tokens")(x)
        taps, maps = pyramid_blocks(s.depth), []
        merges = merge_schedule(self.merge_tokens, s.depth, grid[0] * grid[1], num_prefix)
        if features and any(merges):
            raise ValueError("features=True needs every patch token: a model that merges tokens (merge_tokens="
                             f"{self.merge_tokens!r}) has no feature maps; build it with merge_tokens=0 for features")
        size = jnp.ones((*x.shape[:2], 1), jnp.float32) if any(merges) else None  # patches per token
        for i in range(s.depth):
            rate = self.drop_path_rate * i / max(s.depth - 1, 1)
            block = TransformerBlock(s.num_heads, s.mlp_ratio, "gelu", rate, self.dtype, dense, ln, merge=merges[i],
                                     num_prefix=num_prefix, name=f"blocks_{i}")
            if size is None:
                x = block(x, train)
            else:
                x, size = block(x, train, size)
            if features and i in taps:
                maps.append(x[:, num_prefix:].reshape(x.shape[0], *grid, x.shape[-1]))
        x = ln(name="norm")(x)
        tokens = x[:, :num_prefix]
        pre_logits = ((tokens[:, 0] + tokens[:, 1]) / 2 if self.distilled else tokens[:, 0]).astype(jnp.float32)
        if features:
            return feature_dict([f.name for f in feature_info(s)], token_pyramid(maps), pre_logits)
        if self.distilled:
            return DistilledTokenHead(self.num_classes, self.drop_rate, dense, self.deploy, name="head")(
                tokens, train)
        return ClassifierHead(self.num_classes, self.drop_rate, dense, name="head")({PRE_LOGITS: pre_logits}, train)


def timm_rename(module: DeiT):
    """timm VisionTransformer(Distilled) keys: the top-level `cls_token` / `dist_token` / `pos_embed` -> `tokens/...`,
    `blocks.{i}.` -> `blocks_{i}/`, the classifier `head` -> `head/fc`, or in the distilled model `head` / `head_dist`
    -> `head/fc/head` / `head/fc/head_dist`; the rest 1:1."""

    def rename(path: str) -> str | None:
        if path == "":  # the raw parameters of the model itself
            return "tokens"
        path = re.sub(r"^blocks\.(\d+)\.", r"blocks_\1/", path)
        if module.distilled:
            path = {"head": "head.fc.head", "head_dist": "head.fc.head_dist"}.get(path, path)
        elif path == "head":
            path = "head.fc"
        return path.replace(".", "/")

    return rename


# Facebook's ImageNet-1k weights (github.com/facebookresearch/deit), re-published by timm; the distilled ones learned
# from a RegNetY-16GF teacher. timm's default_cfgs record no accuracy: top1/top5 are the authors' evaluation of these
# files (README_deit.md of that repository).
_FB = dict(crop_pct=0.9, origin="https://github.com/facebookresearch/deit")
_DL = "https://dl.fbaipublicfiles.com/deit/"

# name: (spec, distilled, pretrained weights)
VARIANTS = {
    "deit_tiny_patch16_224": (DEIT_TINY, False, (
        timm_weights("deit_tiny_patch16_224", "fb_in1k", _DL + "deit_tiny_patch16_224-a1311bcf.pth",
                     top1=72.202, top5=91.124, **_FB),)),
    "deit_small_patch16_224": (DEIT_SMALL, False, (
        timm_weights("deit_small_patch16_224", "fb_in1k", _DL + "deit_small_patch16_224-cd65a155.pth",
                     top1=79.854, top5=94.968, **_FB),)),
    "deit_tiny_distilled_patch16_224": (DEIT_TINY, True, (
        timm_weights("deit_tiny_distilled_patch16_224", "fb_in1k",
                     _DL + "deit_tiny_distilled_patch16_224-b40b3cf7.pth", top1=74.476, top5=91.920, **_FB),)),
    "deit_small_distilled_patch16_224": (DEIT_SMALL, True, (
        timm_weights("deit_small_distilled_patch16_224", "fb_in1k",
                     _DL + "deit_small_distilled_patch16_224-649709d9.pth", top1=81.164, top5=95.376, **_FB),)),
}


def _build(spec: ViTSpec, distilled: bool, **overrides) -> DeiT:
    return DeiT(**{**dict(spec=spec, distilled=distilled), **overrides})


for _name, (_spec, _distilled, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="deit", input_size=(224, 224), interpolation="bicubic", crop_pct=0.9,
            first_conv="patch_embed/proj", classifier="head/fc", feature_info=feature_info(_spec),
            paper="arXiv:2012.12877 Table 1", twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _spec, _distilled))
