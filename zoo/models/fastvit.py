"""FastViT (Vasu et al., "FastViT: A Fast Hybrid Vision Transformer using Structural Reparameterization",
arXiv:2303.14189, ICCV 2023), T8 / T12 / S12 / SA12 / SA24 / SA36 / MA36 as timm builds them
(`timm/models/fastvit.py`, `fastvit_*`).

A MetaFormer-style hybrid in which nearly every linear layer re-parameterizes:
- stem: three `MobileOneBlock`s (zoo/layers/reparam.py), a 3x3/2 conv, a depthwise 3x3/2 and a pointwise 1x1, GELU;
- stages at strides 4-32; stages 1-3 start with a patch embedding (`PatchEmbed`): a large-kernel 7x7/2 conv (one
  input channel per group, twice as many outputs) with a parallel 3x3 branch, both conv+BN (`ReparamLargeKernelConv`),
  then a pointwise `MobileOneBlock`;
- RepMixer blocks (`RepMixerBlock`): the token mixer x + gamma * (mixer(x) - BN(x)), mixer a depthwise 3x3
  `MobileOneBlock` without activation, then x + gamma' * ConvFFN(x), the ConvFFN a depthwise 7x7 conv+BN, 1x1 expand,
  GELU, 1x1 project;
- in the `sa`/`ma` variants the last stage has a conditional positional encoding after its patch embedding
  (`RepCPE`: x + depthwise 7x7(x)) and attention blocks (`AttentionBlock`): x + gamma * MHSA(BN(x)), head width 32,
  no qkv bias, then the ConvFFN branch;
- head: a grouped 3x3 `MobileOneBlock` (one input channel per group) to twice the last width with squeeze-excite,
  global average pool, Linear.

Deploy form (`deploy=True`, the variables `compress.deploy.reparameterize` gives): every MobileOne block one conv, the
large-kernel conv one 7x7 conv, every RepMixer one depthwise 3x3 conv with its LayerScale folded in, every RepCPE one
depthwise 7x7 conv. The rest is as timm's `reparameterize_model` leaves it: the ConvFFN's conv+BN, the attention
block's BatchNorm (`StandaloneBatchNorm`) and the LayerScales of the residual branches stay, so the deploy module has
timm's deploy parameter count; `compress.deploy` then folds each ConvFFN BatchNorm into its conv.

Parameter names mirror timm's module names (`stem_0/conv_kxk_0/conv`, `stages_1/downsample/proj_0/large_conv/bn`,
`stages_2/blocks_3/token_mixer/mixer/conv_scale/conv`, `stages_3/pos_emb/pos_enc`, `stages_3/blocks_0/norm/bn`,
`final_conv/se/conv_reduce`, `head/fc`); the timm key map is a few substitutions (`timm_rename`), and it maps timm's
re-parameterized checkpoints (`reparam_conv`) of the RepMixer-only variants onto `deploy=True` the same way (timm's
deploy form of the SA/MA variants keeps the attention blocks' BatchNorm statistics, which the zoo's deploy form holds
as a scale and shift: load their training-form checkpoint and deploy it). timm's LayerScale2d keeps gamma as a
(C, 1, 1) array; the zoo keeps that shape (`LayerScale2d`) so a checkpoint maps without reshaping.
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
from zoo.layers.activations import get_act
from zoo.layers.attention import Attention
from zoo.layers.blocks import drop_path
from zoo.layers.linear_bn import bn_affine, norm_eps
from zoo.layers.norm import BN_EPS_TORCH
from zoo.layers.reparam import ConvBn, MobileOneBlock, StandaloneBatchNorm
from zoo.layers.scale import LayerScale
from zoo.models._pretrained import timm_weights
from zoo.models.backbone import feature_dict, layer_factories
from zoo.models.heads import ClassifierHead
from zoo.registry import register_model

ModuleDef = Any


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One stage: `depth` blocks of width `dim` mixing tokens with `mixer` ("repmixer" or "attention"), ConvFFN
    expansion `mlp_ratio`; `pos_emb`: a RepCPE after the stage's patch embedding."""

    dim: int
    depth: int
    mlp_ratio: float
    mixer: str = "repmixer"
    pos_emb: bool = False


def _table(depths, dims, mlp_ratio, attention_last: bool = False) -> tuple[Stage, ...]:
    n = len(depths)
    return tuple(Stage(dim=c, depth=d, mlp_ratio=mlp_ratio,
                       mixer="attention" if attention_last and i == n - 1 else "repmixer",
                       pos_emb=attention_last and i == n - 1)
                 for i, (d, c) in enumerate(zip(depths, dims)))


# Table 2 of arXiv:2303.14189 (256x256 input): blocks and widths per stage, MLP expansion; stage i at 64x64 / 2**i in
# (stage 0, 64x64 in; stage 1, 64x64 in, embedded to 32x32; stage 2, 32x32 in; stage 3, 16x16 in). T8/T12 expand 3,
# the others 4; the SA/MA variants attend in the last stage, after a 7x7 conditional positional encoding.
T8 = _table((2, 2, 4, 2), (48, 96, 192, 384), 3)
T12 = _table((2, 2, 6, 2), (64, 128, 256, 512), 3)
S12 = _table((2, 2, 6, 2), (64, 128, 256, 512), 4)
SA12 = _table((2, 2, 6, 2), (64, 128, 256, 512), 4, attention_last=True)
SA24 = _table((4, 4, 12, 4), (64, 128, 256, 512), 4, attention_last=True)
SA36 = _table((6, 6, 18, 6), (64, 128, 256, 512), 4, attention_last=True)
MA36 = _table((6, 6, 18, 6), (76, 152, 304, 608), 4, attention_last=True)

Stages = tuple[Stage, ...]

HEAD_DIM = 32  # attention head width (timm's Attention default)
CLS_RATIO = 2.0  # the final conv widens the last stage by this
LAYER_SCALE_INIT = 1e-5


def se_channels(channels: int) -> int:
    """timm's SqueezeExcite(channels, rd_divisor=1) of the final conv: channels / 16, not rounded."""
    return int(round(channels / 16))


def feature_info(stages: Stages) -> tuple[FeatureInfo, ...]:
    """Every stage output: stage 0 at the stem's stride 4, each later stage's patch embedding halves the map."""
    return tuple(FeatureInfo(f"stages_{i}", 4 * 2 ** i, s.dim) for i, s in enumerate(stages))


def _identity_kernel(k: int, channels: int) -> np.ndarray:
    """The depthwise kxk HWIO kernel (k, k, 1, channels) that passes each channel through: 1 at the centre tap."""
    w = np.zeros((k, k, 1, channels), np.float64)
    w[k // 2, k // 2, 0, :] = 1.0
    return w


def _folded(branch_params: dict, branch_stats: dict, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """A `ConvBn` branch (`conv`, `bn`) as one kernel and bias, float64."""
    t, s = bn_affine(branch_params["bn"], branch_stats["bn"], eps)
    return np.asarray(branch_params["conv"]["kernel"], np.float64) * t, s


def _out(kernel: np.ndarray, bias: np.ndarray) -> dict:
    return {"params": {"reparam_conv": {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}}}


class LayerScale2d(LayerScale):
    """`x * gamma` per channel, gamma stored as (C, 1, 1): timm's LayerScale2d layout, so checkpoints map 1:1."""

    init_value: float = LAYER_SCALE_INIT

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1], 1, 1))
        return x * gamma.reshape(-1).astype(x.dtype)


class IdentityBn(nn.Module):
    """A BatchNorm of the input (child `identity`): timm's MobileOneBlock with neither conv nor scale branch, the
    `norm` RepMixer subtracts."""

    norm: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.norm(use_running_average=not train, name="identity")(x)


class RepMixer(nn.Module):
    """x + gamma * (mixer(x) - BN(x)), `mixer` a depthwise kxk `MobileOneBlock` without activation (Sec. 3.2.1 of
    arXiv:2303.14189). `deploy=True`: one depthwise kxk conv with a bias (`reparameterize`)."""

    kernel_size: int
    conv: ModuleDef
    norm: ModuleDef
    layer_scale_init: float = LAYER_SCALE_INIT
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        c, k = x.shape[-1], self.kernel_size
        if self.deploy:
            return self.conv(c, k, groups=c, use_bias=True, name="reparam_conv")(x)
        mixed = MobileOneBlock(c, k, 1, groups=c, act="identity", conv=self.conv, norm=self.norm,
                               name="mixer")(x, train)
        normed = IdentityBn(self.norm, name="norm")(x, train)
        return x + LayerScale2d(self.layer_scale_init, name="layer_scale")(mixed - normed)

    @staticmethod
    def reparameterize(variables: dict, *, eps: float = BN_EPS_TORCH) -> dict:
        """Training-form variables (the mixer's subtree) -> {"params": {"reparam_conv": kernel, bias}}: the
        identity plus gamma times the difference of the mixer's and the norm's fused kernels. float64, stored
        float32."""
        params, stats = variables["params"], variables.get("batch_stats", {})
        if "mixer" not in params:
            raise ValueError("RepMixer.reparameterize: no `mixer` in the variables (already deployed?)")
        mixer = MobileOneBlock.reparameterize({"params": params["mixer"], "batch_stats": stats["mixer"]}, eps=eps)
        w_mix = np.asarray(mixer["params"]["reparam_conv"]["kernel"], np.float64)
        b_mix = np.asarray(mixer["params"]["reparam_conv"]["bias"], np.float64)
        k, c = w_mix.shape[0], w_mix.shape[-1]
        t, s = bn_affine(params["norm"]["identity"], stats["norm"]["identity"], eps)
        ident = _identity_kernel(k, c)
        gamma = np.asarray(params["layer_scale"]["gamma"], np.float64).reshape(-1)
        return _out(ident + gamma * (w_mix - ident * t), gamma * (b_mix - s))


class ReparamLargeKernelConv(nn.Module):
    """kxk conv+BN (`large_conv`) + small_kxsmall_k conv+BN (`small_conv`), same stride and grouping (RepLKNet's
    block, Ding et al., arXiv:2203.06717). `deploy=True`: one kxk conv with a bias."""

    features: int
    kernel_size: int
    stride: int
    groups: int
    small_kernel: int
    conv: ModuleDef
    norm: ModuleDef
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.deploy:
            return self.conv(self.features, self.kernel_size, stride=self.stride, groups=self.groups, use_bias=True,
                             name="reparam_conv")(x)
        branch = partial(ConvBn, self.features, self.conv, self.norm, stride=self.stride, groups=self.groups)
        return (branch(kernel_size=self.kernel_size, name="large_conv")(x, train)
                + branch(kernel_size=self.small_kernel, name="small_conv")(x, train))

    @staticmethod
    def reparameterize(variables: dict, *, eps: float = BN_EPS_TORCH) -> dict:
        """Training-form variables -> {"params": {"reparam_conv": kernel, bias}}: both branches folded, the small
        kernel at the centre of the large one. float64, stored float32."""
        params, stats = variables["params"], variables.get("batch_stats", {})
        if "large_conv" not in params:
            raise ValueError("ReparamLargeKernelConv.reparameterize: no `large_conv` (already deployed?)")
        kernel, bias = _folded(params["large_conv"], stats["large_conv"], eps)
        small, small_bias = _folded(params["small_conv"], stats["small_conv"], eps)
        p = (kernel.shape[0] - small.shape[0]) // 2
        kernel = kernel + np.pad(small, ((p, p), (p, p), (0, 0), (0, 0)))
        return _out(kernel, bias + small_bias)


class RepCPE(nn.Module):
    """Conditional positional encoding x + depthwise kxk(x) (with a bias; Chu et al., arXiv:2102.10882).
    `deploy=True`: one depthwise kxk conv with the identity in its centre tap."""

    kernel_size: int
    conv: ModuleDef
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        c, k = x.shape[-1], self.kernel_size
        if self.deploy:
            return self.conv(c, k, groups=c, use_bias=True, name="reparam_conv")(x)
        return x + self.conv(c, k, groups=c, use_bias=True, name="pos_enc")(x)

    @staticmethod
    def reparameterize(variables: dict) -> dict:
        params = variables["params"]
        if "pos_enc" not in params:
            raise ValueError("RepCPE.reparameterize: no `pos_enc` in the variables (already deployed?)")
        w = np.asarray(params["pos_enc"]["kernel"], np.float64)
        return _out(w + _identity_kernel(w.shape[0], w.shape[-1]), np.asarray(params["pos_enc"]["bias"], np.float64))


kinds.register(RepMixer, kinds.LayerKind(
    "reparam", reparameterize=lambda m, v: RepMixer.reparameterize(v, eps=norm_eps(m.norm))))
kinds.register(ReparamLargeKernelConv, kinds.LayerKind(
    "reparam", reparameterize=lambda m, v: ReparamLargeKernelConv.reparameterize(v, eps=norm_eps(m.norm))))
kinds.register(RepCPE, kinds.LayerKind("reparam", reparameterize=lambda m, v: RepCPE.reparameterize(v)))


class PatchEmbed(nn.Module):
    """7x7/2 large-kernel conv from the input width (one input channel per group) to `dim`, no activation, then a
    pointwise GELU `MobileOneBlock` (`proj_0`, `proj_1`)."""

    dim: int
    block: ModuleDef  # `MobileOneBlock` with the network's conv, norm, act, form bound
    large_kernel: ModuleDef  # `ReparamLargeKernelConv` likewise
    patch_size: int = 7
    stride: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.large_kernel(self.dim, self.patch_size, self.stride, x.shape[-1], 3, name="proj_0")(x, train)
        return self.block(self.dim, 1, 1, name="proj_1")(x, train)


class ConvMlp(nn.Module):
    """ConvFFN: depthwise 7x7 conv+BN -> 1x1 to `hidden` -> act -> 1x1 back (`conv`, `fc1`, `fc2`)."""

    hidden: int
    conv: ModuleDef
    norm: ModuleDef
    act: str = "gelu"
    drop: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = ConvBn(c, self.conv, self.norm, 7, groups=c, name="conv")(x, train)
        x = get_act(self.act)(self.conv(self.hidden, 1, use_bias=True, name="fc1")(x))
        x = nn.Dropout(self.drop)(x, deterministic=not train)
        x = self.conv(c, 1, use_bias=True, name="fc2")(x)
        return nn.Dropout(self.drop)(x, deterministic=not train)


class RepMixerBlock(nn.Module):
    """RepMixer token mixer, then x + gamma * ConvFFN(x)."""

    mlp_ratio: float
    token_mixer: ModuleDef  # `RepMixer` with the network's layers and form bound
    mlp: ModuleDef  # `ConvMlp` likewise
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.token_mixer(name="token_mixer")(x, train)
        y = LayerScale2d(name="layer_scale")(self.mlp(int(x.shape[-1] * self.mlp_ratio), name="mlp")(x, train))
        return x + drop_path(y, self.drop_path_rate, train, self)


def _dense_without_qkv_bias(dense: ModuleDef):
    """The dense factory with the attention's `qkv` built without a bias (timm's `qkv_bias=False`)."""

    def make(features: int, *, name: str, **kwargs):
        return dense(features, use_bias=name != "qkv", name=name, **kwargs)

    return make


class AttentionBlock(nn.Module):
    """x + gamma_1 * MHSA(BN(x)) over the H*W positions, then x + gamma_2 * ConvFFN(x)."""

    mlp_ratio: float
    mlp: ModuleDef
    dense: ModuleDef
    norm: ModuleDef
    deploy: bool = False
    drop_path_rate: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, h, w, c = x.shape
        y = StandaloneBatchNorm(self.norm, self.deploy, name="norm")(x, train)
        y = Attention(c // HEAD_DIM, self.dtype, _dense_without_qkv_bias(self.dense),
                      name="token_mixer")(y.reshape(b, h * w, c)).reshape(b, h, w, c)
        x = x + drop_path(LayerScale2d(name="layer_scale_1")(y), self.drop_path_rate, train, self)
        y = LayerScale2d(name="layer_scale_2")(self.mlp(int(c * self.mlp_ratio), name="mlp")(x, train))
        return x + drop_path(y, self.drop_path_rate, train, self)


class FastVitStage(nn.Module):
    """[PatchEmbed `downsample`] -> [RepCPE `pos_emb`] -> `depth` blocks (`blocks_{j}`)."""

    stage: Stage
    downsample: bool
    drop_path_rates: tuple[float, ...]
    patch_embed: ModuleDef
    pos_emb: ModuleDef
    repmixer_block: ModuleDef
    attention_block: ModuleDef

    @nn.compact
    def __call__(self, x, train: bool = False):
        s = self.stage
        if self.downsample:
            x = self.patch_embed(s.dim, name="downsample")(x, train)
        if s.pos_emb:
            x = self.pos_emb(name="pos_emb")(x, train)
        block = {"repmixer": self.repmixer_block, "attention": self.attention_block}[s.mixer]
        for j in range(s.depth):
            x = block(s.mlp_ratio, drop_path_rate=self.drop_path_rates[j], name=f"blocks_{j}")(x, train)
        return x


class FastViT(nn.Module):
    """Backbone (MobileOne stem -> four stages, strides 4-32 -> final MobileOne conv with SE -> mean over positions:
    `pre_logits`) + classifier (`ClassifierHead`: fc). `features=True`: the backbone's dict (`zoo.models.heads`).
    `deploy=True`: the re-parameterized form (module doc)."""

    stages: Stages
    repmixer_kernel: int = 3
    act: str = "gelu"
    bn_eps: float = BN_EPS_TORCH
    deploy: bool = False
    num_classes: int = 1000
    in_chans: int = 3
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = None  # compute dtype (e.g. jnp.bfloat16); parameters stay float32
    # injected layer factories (None: the defaults; see `zoo.models.backbone.layer_factories`)
    conv: Any = None
    norm: Any = None
    dense: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        check_images(x, self.in_chans, "FastViT")
        conv, norm, dense = layer_factories(self.conv, self.norm, self.dense, bn_eps=self.bn_eps, dtype=self.dtype)
        block = partial(MobileOneBlock, conv=conv, norm=norm, act=self.act, deploy=self.deploy)
        c0 = self.stages[0].dim
        x = block(c0, 3, 2, name="stem_0")(x, train)
        x = block(c0, 3, 2, groups=c0, name="stem_1")(x, train)
        x = block(c0, 1, 1, name="stem_2")(x, train)
        mlp = partial(ConvMlp, conv=conv, norm=norm, act=self.act, drop=self.proj_drop_rate)
        token_mixer = partial(RepMixer, self.repmixer_kernel, conv, norm, deploy=self.deploy)
        stage_parts = dict(
            patch_embed=partial(PatchEmbed, block=block,
                                large_kernel=partial(ReparamLargeKernelConv, conv=conv, norm=norm,
                                                     deploy=self.deploy)),
            pos_emb=partial(RepCPE, 7, conv, deploy=self.deploy),
            repmixer_block=partial(RepMixerBlock, token_mixer=token_mixer, mlp=mlp),
            attention_block=partial(AttentionBlock, mlp=mlp, dense=dense, norm=norm, deploy=self.deploy,
                                    dtype=self.dtype),
        )
        # stochastic depth grows linearly over all blocks of the network (timm's stage-wise split of one linspace)
        n_blocks = sum(s.depth for s in self.stages)
        rates = [self.drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        maps, seen, prev = [], 0, c0
        for i, s in enumerate(self.stages):
            x = FastVitStage(s, i > 0 or s.dim != prev, tuple(rates[seen:seen + s.depth]), **stage_parts,
                             name=f"stages_{i}")(x, train)
            seen += s.depth
            prev = s.dim
            maps.append(x)
        # one input channel per group, twice as many outputs (timm's group_size=1)
        final = int(prev * CLS_RATIO)
        x = block(final, 3, 1, groups=prev, se_chs=se_channels(final), name="final_conv")(x, train)
        feats = feature_dict([f.name for f in feature_info(self.stages)], maps,
                             jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        if features:
            return feats
        return ClassifierHead(self.num_classes, self.drop_rate, dense, name="head")(feats, train)


def timm_rename(module: FastViT):
    """timm FastVit keys: `stem.{i}.` -> `stem_{i}/`, `stages.{i}.blocks.{j}.` -> `stages_{i}/blocks_{j}/`,
    `proj.{n}.` -> `proj_{n}/`, `conv_kxk.{n}.` -> `conv_kxk_{n}/`, SE `fc1/fc2` -> `conv_reduce/conv_expand`, an
    attention block's `norm` -> `norm/bn`; the rest 1:1 (`reparam_conv` and `layer_scale*.gamma` included)."""

    def rename(path: str) -> str | None:
        path = re.sub(r"^stem\.(\d+)\.", r"stem_\1/", path)
        path = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages_\1/blocks_\2/", path)
        path = re.sub(r"^stages\.(\d+)\.", r"stages_\1/", path)
        path = re.sub(r"(^|[./])proj\.(\d+)\.", r"\1proj_\2/", path)
        path = re.sub(r"(^|[./])conv_kxk\.(\d+)\.", r"\1conv_kxk_\2/", path)
        path = re.sub(r"(^|[./])se\.fc1$", r"\1se/conv_reduce", path)
        path = re.sub(r"(^|[./])se\.fc2$", r"\1se/conv_expand", path)
        path = re.sub(r"^(stages_\d+/blocks_\d+/)norm$", r"\1norm/bn", path)
        return path.replace(".", "/")

    return rename


# Apple's ImageNet-1k weights (github.com/apple/ml-fastvit) as re-published by timm, training form, trained plain
# (`apple_in1k`) and distilled (`apple_dist_in1k`); timm's default_cfgs record no accuracy for them.
_APPLE = dict(license="fastvit-license", origin="https://github.com/apple/ml-fastvit")


def _apple(name: str, crop_pct: float = 0.9) -> tuple:
    return tuple(timm_weights(name, tag, crop_pct=crop_pct, **_APPLE) for tag in ("apple_in1k", "apple_dist_in1k"))


# name: (table, pretrained weights; timm's default tag first)
VARIANTS = {
    "fastvit_t8": (T8, _apple("fastvit_t8")),
    "fastvit_t12": (T12, _apple("fastvit_t12")),
    "fastvit_s12": (S12, _apple("fastvit_s12")),
    "fastvit_sa12": (SA12, _apple("fastvit_sa12")),
    "fastvit_sa24": (SA24, _apple("fastvit_sa24")),
    "fastvit_sa36": (SA36, _apple("fastvit_sa36")),
    "fastvit_ma36": (MA36, _apple("fastvit_ma36", crop_pct=0.95)),
}


def _build(table: Stages, **overrides) -> FastViT:
    return FastViT(**{**dict(stages=table), **overrides})


for _name, (_table, _weights) in VARIANTS.items():
    register_model(
        ModelCfg(
            name=_name, family="fastvit", input_size=(256, 256), interpolation="bicubic",
            crop_pct=_weights[0].crop_pct, first_conv=("stem_0/conv_kxk_0/conv", "stem_0/conv_scale/conv"),
            classifier="head/fc", feature_info=feature_info(_table), paper="arXiv:2303.14189 Table 2",
            twin=f"timm:{_name}",
        ),
        _weights,
        converters={"timm": timm_rename},
    )(partial(_build, _table))
