"""Linear+BatchNorm and conv+BatchNorm: a weight layer without a bias followed by a BatchNorm of its output.

LeViT (Graham et al., arXiv:2104.01136) builds every projection this way (timm's `LinearNorm` / `ConvNorm`): BatchNorm
instead of LayerNorm, so that at inference it folds into the layer before it and the transformer runs as plain matrix
products. `LinearBn` applies to the last axis of any rank (tokens (B, N, C) included; the BatchNorm's statistics are
over every other axis, which is timm's `bn(x.flatten(0, 1))`); `Conv2dBn` is the NHWC convolution.

Both have a deploy form (`deploy=True`: one `Dense` / `Conv2d` with a bias, in place of the kernel of the training
form, under the same name `linear`) and a registered `reparameterize` that computes it (`compress.deploy`). The child
names `linear` and `bn` are timm's.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import numpy as np

from zoo.layers import kinds
from zoo.layers.activations import get_act
from zoo.layers.conv import Conv2d
from zoo.layers.norm import BN_EPS_TORCH, batch_norm

ModuleDef = Any


class LinearBn(nn.Module):
    """Dense (no bias) -> BatchNorm over the last axis; `deploy=True`: one Dense with a bias."""

    features: int
    dense: ModuleDef = nn.Dense
    norm: ModuleDef = batch_norm(BN_EPS_TORCH)
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.deploy:
            return self.dense(self.features, use_bias=True, name="linear")(x)
        x = self.dense(self.features, use_bias=False, name="linear")(x)
        return self.norm(use_running_average=not train, name="bn")(x)


class Conv2dBn(nn.Module):
    """Conv2d (no bias) -> BatchNorm [-> act]; `deploy=True`: one Conv2d with a bias [-> act].

    The optional activation makes the module's output the feature map a stem stage hands on (LeViT's `stem/conv1`
    feature is this module's output); it is not part of the fusion.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    groups: int = 1
    act: str | None = None
    conv: ModuleDef = Conv2d
    norm: ModuleDef = batch_norm(BN_EPS_TORCH)
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        conv = self.conv(self.features, self.kernel_size, stride=self.stride, groups=self.groups,
                         use_bias=self.deploy, name="linear")
        x = conv(x)
        if not self.deploy:
            x = self.norm(use_running_average=not train, name="bn")(x)
        return get_act(self.act)(x) if self.act else x


def bn_affine(bn_params: dict, bn_stats: dict, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """The inference BatchNorm as y = x * t + s per channel: (t, s) in float64."""
    gamma = np.asarray(bn_params["scale"], np.float64)
    beta = np.asarray(bn_params["bias"], np.float64)
    mean = np.asarray(bn_stats["mean"], np.float64)
    var = np.asarray(bn_stats["var"], np.float64)
    t = gamma / np.sqrt(var + eps)
    return t, beta - mean * t


def fold_into_kernel(variables: dict, eps: float) -> dict:
    """Training-form variables of a `LinearBn` / `Conv2dBn` ({"params", "batch_stats"}, its own subtree) -> the
    deploy form's ({"params": {"linear": {"kernel", "bias"}}}). The kernel's output channels are its last axis
    ((in, out) dense, HWIO conv). Computed in float64, stored float32."""
    params, stats = variables["params"], variables.get("batch_stats", {})
    if "bn" not in params:
        raise ValueError("fold_into_kernel: no `bn` in the variables (already deployed?)")
    t, s = bn_affine(params["bn"], stats["bn"], eps)
    kernel = np.asarray(params["linear"]["kernel"], np.float64) * t
    return {"params": {"linear": {"kernel": kernel.astype(np.float32), "bias": s.astype(np.float32)}}}


def norm_eps(norm: ModuleDef) -> float:
    """The epsilon of the BatchNorm a `norm` factory builds (an unbound module is a plain dataclass)."""
    return float(norm(use_running_average=True).epsilon)


def _reparameterize(module: LinearBn | Conv2dBn, variables: dict) -> dict:
    return fold_into_kernel(variables, norm_eps(module.norm))


kinds.register(LinearBn, kinds.LayerKind("reparam", reparameterize=_reparameterize))
kinds.register(Conv2dBn, kinds.LayerKind("reparam", reparameterize=_reparameterize))


class LinearBnMlp(nn.Module):
    """`linear` to `hidden` -> act -> `linear` back to the input width (timm LeViT's LevitMlp: children `ln1`, `ln2`).
    `linear` is `LinearBn` with the network's dense, norm and form bound."""

    hidden: int
    linear: ModuleDef
    act: str = "hard_swish"

    @nn.compact
    def __call__(self, x, train: bool = False):
        c = x.shape[-1]
        x = get_act(self.act)(self.linear(self.hidden, name="ln1")(x, train))
        return self.linear(c, name="ln2")(x, train)
