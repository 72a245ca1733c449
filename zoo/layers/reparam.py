"""Re-parameterizable blocks: several linear branches while training, one convolution when deployed.

`MobileOneBlock` (Vasu et al., "MobileOne: An Improved One millisecond Mobile Backbone", arXiv:2206.04040, Fig. 3):
in its training form the block sums
  - `num_conv_branches` kxk conv + BN branches (`conv_kxk_{i}/conv`, `conv_kxk_{i}/bn`),
  - a 1x1 conv + BN "scale" branch when k > 1 (`conv_scale/conv`, `conv_scale/bn`),
  - a BatchNorm of the input itself when the block keeps width and resolution (`identity`),
then applies optional squeeze-excite (`se`) and the activation. Every branch is linear at inference, so their sum is
one kxk convolution with a bias (`reparam_conv`): the deploy form, built with `deploy=True`. The names mirror timm's
(`conv_kxk.{i}.conv`, `conv_scale.bn`, `identity`, `reparam_conv`), so a timm checkpoint of either form maps 1:1.

RepVGG's block (Ding et al., arXiv:2101.03697, Fig. 2) is this block with one 3x3 branch (`num_conv_branches=1`):
timm's RepVggBlock names its branches `conv_kxk`/`conv_1x1`, which `zoo.models.repvgg.timm_rename` maps onto
`conv_kxk_0`/`conv_scale`.

MobileOne stacks these as a depthwise kxk block (groups == channels) followed by a pointwise 1x1 block; the fusion is
written for any grouping: a grouped kernel is (k, k, in/groups, out) in HWIO, and the identity is the kxk kernel that
picks input channel `o` (position `o % (in/groups)` within its group) for output `o` at the centre tap.

`StandaloneBatchNorm` is the degenerate case: a BatchNorm with no weight layer right before it to fold into (after a
residual sum), deployed as the per-channel affine map it computes at inference.

The fusion assumes centred taps, i.e. PyTorch-symmetric padding (the 1x1 branch of a strided block reads the pixel at
the centre of the kxk window). TF "SAME" padding of a strided kxk conv is not centred, so it is not supported here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import numpy as np

from zoo.layers import kinds
from zoo.layers.activations import get_act
from zoo.layers.blocks import SqueezeExcite, drop_path
from zoo.layers.conv import Conv2d
from zoo.layers.norm import BN_EPS_TORCH, batch_norm

ModuleDef = Any


class ConvBn(nn.Module):
    """conv -> BN, no activation (one branch of a re-parameterizable block; children `conv`, `bn`). `use_bias`: a
    conv bias before the BN (StarNet's ConvBN layers have one)."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    kernel_size: int = 3
    stride: int = 1
    groups: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(self.features, self.kernel_size, stride=self.stride, groups=self.groups, use_bias=self.use_bias,
                      name="conv")(x)
        return self.norm(use_running_average=not train, name="bn")(x)


class MobileOneBlock(nn.Module):
    """MobileOne block: branches summed -> [SE] -> act in training form, one conv -> [SE] -> act when deployed.

    `groups` as in `Conv2d` (the number of groups, channels for a depthwise block). `se_chs`: reduced channels of the
    squeeze-excite (0: none). `drop_path_rate` drops the sum of the conv branches (not the identity branch), and only
    in blocks that have an identity branch, as timm does.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    groups: int = 1
    num_conv_branches: int = 1
    se_chs: int = 0
    act: str = "relu"
    drop_path_rate: float = 0.0
    conv: ModuleDef = Conv2d
    norm: ModuleDef = batch_norm(BN_EPS_TORCH)
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        k, s, g = self.kernel_size, self.stride, self.groups
        if self.deploy:
            x = self.conv(self.features, k, stride=s, groups=g, use_bias=True, name="reparam_conv")(x)
        else:
            use_identity = x.shape[-1] == self.features and s == 1
            identity = self.norm(use_running_average=not train, name="identity")(x) if use_identity else None
            out = None
            if k > 1:
                out = ConvBn(self.features, self.conv, self.norm, 1, s, g, name="conv_scale")(x, train)
            for i in range(self.num_conv_branches):
                y = ConvBn(self.features, self.conv, self.norm, k, s, g, name=f"conv_kxk_{i}")(x, train)
                out = y if out is None else out + y
            if identity is not None:
                out = drop_path(out, self.drop_path_rate, train, self) + identity
            x = out
        if self.se_chs:
            x = SqueezeExcite(self.se_chs, self.conv, "relu", "sigmoid", name="se")(x)
        return get_act(self.act)(x)

    @staticmethod
    def reparameterize(variables: dict, *, eps: float = BN_EPS_TORCH) -> dict:
        """Training-form variables of one block ({"params", "batch_stats"}, the block's own subtree) -> the deploy
        form's ({"params"}: `reparam_conv` kernel and bias, `se` unchanged).

        Pure and static: which branches exist, the kernel size and the grouping are read from the variables' names
        and shapes; `eps` is the BatchNorm epsilon the block was built with. Computed in float64, stored float32.
        """
        params, stats = variables["params"], variables.get("batch_stats", {})

        def folded(kernel, bn_params, bn_stats):
            """kernel * gamma / sqrt(var + eps) per output channel, and the matching bias."""
            gamma = np.asarray(bn_params["scale"], np.float64)
            beta = np.asarray(bn_params["bias"], np.float64)
            mean = np.asarray(bn_stats["mean"], np.float64)
            var = np.asarray(bn_stats["var"], np.float64)
            t = gamma / np.sqrt(var + eps)
            return kernel * t, beta - mean * t

        branches = sorted((n for n in params if n.startswith("conv_kxk_")), key=lambda n: int(n.rsplit("_", 1)[1]))
        if not branches:
            raise ValueError("MobileOneBlock.reparameterize: no conv_kxk_* branch in the variables (already deployed?)")
        kh, kw, in_per_group, out_chs = np.shape(params[branches[0]]["conv"]["kernel"])
        kernel = np.zeros((kh, kw, in_per_group, out_chs), np.float64)
        bias = np.zeros((out_chs,), np.float64)
        for name in branches + (["conv_scale"] if "conv_scale" in params else []):
            w = np.asarray(params[name]["conv"]["kernel"], np.float64)
            ph, pw = (kh - w.shape[0]) // 2, (kw - w.shape[1]) // 2  # a 1x1 kernel at the centre tap
            w = np.pad(w, ((ph, kh - w.shape[0] - ph), (pw, kw - w.shape[1] - pw), (0, 0), (0, 0)))
            w, b = folded(w, params[name]["bn"], stats[name]["bn"])
            kernel += w
            bias += b
        if "identity" in params:
            ident = np.zeros((kh, kw, in_per_group, out_chs), np.float64)
            o = np.arange(out_chs)
            ident[kh // 2, kw // 2, o % in_per_group, o] = 1.0
            w, b = folded(ident, params["identity"], stats["identity"])
            kernel += w
            bias += b
        out = {"reparam_conv": {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}}
        if "se" in params:
            out["se"] = params["se"]
        return {"params": out}


def _norm_eps(norm: ModuleDef) -> float:
    """The epsilon of the BatchNorm a `norm` factory builds (an unbound module is a plain dataclass)."""
    return float(norm(use_running_average=True).epsilon)


def _reparameterize_mobileone(module: MobileOneBlock, variables: dict) -> dict:
    return MobileOneBlock.reparameterize(variables, eps=_norm_eps(module.norm))


kinds.register(MobileOneBlock, kinds.LayerKind("reparam", reparameterize=_reparameterize_mobileone))


class StandaloneBatchNorm(nn.Module):
    """A BatchNorm that no weight layer before it can absorb (it follows a residual sum, e.g. StarNet's last `norm`).

    Training form: the BatchNorm itself (child `bn`). Deploy form (`deploy=True`): the per-channel affine map it
    computes at inference, `x * scale + bias` (own parameters `scale`, `bias`; no statistics), from `reparameterize`.
    """

    norm: ModuleDef = batch_norm(BN_EPS_TORCH)
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not self.deploy:
            return self.norm(use_running_average=not train, name="bn")(x)
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return x * scale.astype(x.dtype) + bias.astype(x.dtype)

    @staticmethod
    def reparameterize(variables: dict, *, eps: float = BN_EPS_TORCH) -> dict:
        """Training-form variables ({"params": {"bn": ...}, "batch_stats": {"bn": ...}}) -> {"params": scale, bias}."""
        bn, stats = variables["params"]["bn"], variables["batch_stats"]["bn"]
        t = np.asarray(bn["scale"], np.float64) / np.sqrt(np.asarray(stats["var"], np.float64) + eps)
        bias = np.asarray(bn["bias"], np.float64) - np.asarray(stats["mean"], np.float64) * t
        return {"params": {"scale": t.astype(np.float32), "bias": bias.astype(np.float32)}}


def _reparameterize_standalone_bn(module: StandaloneBatchNorm, variables: dict) -> dict:
    return StandaloneBatchNorm.reparameterize(variables, eps=_norm_eps(module.norm))


kinds.register(StandaloneBatchNorm, kinds.LayerKind("reparam", reparameterize=_reparameterize_standalone_bn))
