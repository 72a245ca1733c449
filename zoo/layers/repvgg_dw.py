"""RepViT's token mixer (Wang et al., "RepViT: Revisiting Mobile CNN From ViT Perspective", arXiv:2307.09283): a
structurally re-parameterized depthwise convolution.

Training form: BN(dw_kxk_bn(x) + dw_1x1(x) + x), the sum of a depthwise kxk conv+BN (`conv/linear`, `conv/bn`), a
depthwise 1x1 conv with a bias (`conv1`) and the identity, followed by one BatchNorm of the sum (`bn`). Deploy form
(`deploy=True`): one depthwise kxk conv with a bias (`reparam_conv`), from `RepVggDw.reparameterize`.

It differs from `zoo.layers.reparam.MobileOneBlock` where the parameter count shows: the 1x1 branch has a bias instead
of a BatchNorm, the identity branch is bare, and the only other BatchNorm follows the sum. The names mirror timm's
`RepVggDw` (`conv.c`, `conv.bn`, `conv1`, `bn`; `c` maps onto `linear`, the name of `Conv2dBn`'s kernel).

Stride 1 and PyTorch-symmetric padding: the 1x1 and identity branches sit at the centre tap of the kxk kernel.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import numpy as np

from zoo.layers import kinds
from zoo.layers.conv import Conv2d
from zoo.layers.linear_bn import Conv2dBn, bn_affine, norm_eps
from zoo.layers.norm import BN_EPS_TORCH, batch_norm

ModuleDef = Any


class RepVggDw(nn.Module):
    """Depthwise kxk conv+BN + depthwise 1x1 conv (bias) + identity -> BN; `deploy=True`: one depthwise kxk conv."""

    kernel_size: int = 3
    conv: ModuleDef = Conv2d
    norm: ModuleDef = batch_norm(BN_EPS_TORCH)
    deploy: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        c, k = x.shape[-1], self.kernel_size
        if self.deploy:
            return self.conv(c, k, groups=c, use_bias=True, name="reparam_conv")(x)
        y = Conv2dBn(c, k, groups=c, conv=self.conv, norm=self.norm, name="conv")(x, train)
        y = y + self.conv(c, 1, groups=c, use_bias=True, name="conv1")(x) + x
        return self.norm(use_running_average=not train, name="bn")(y)

    @staticmethod
    def reparameterize(variables: dict, *, eps: float = BN_EPS_TORCH) -> dict:
        """Training-form variables ({"params", "batch_stats"}, the layer's own subtree) -> the deploy form's
        ({"params": {"reparam_conv": {"kernel", "bias"}}}). Computed in float64, stored float32."""
        params, stats = variables["params"], variables.get("batch_stats", {})
        if "conv1" not in params:
            raise ValueError("RepVggDw.reparameterize: no `conv1` in the variables (already deployed?)")
        t, s = bn_affine(params["conv"]["bn"], stats["conv"]["bn"], eps)
        kernel = np.asarray(params["conv"]["linear"]["kernel"], np.float64) * t  # (k, k, 1, C)
        bias = s + np.asarray(params["conv1"]["bias"], np.float64)
        kh, kw = kernel.shape[:2]
        # the 1x1 branch and the identity act on the centre tap only
        kernel[kh // 2, kw // 2] += np.asarray(params["conv1"]["kernel"], np.float64)[0, 0] + 1.0
        t, s = bn_affine(params["bn"], stats["bn"], eps)
        return {"params": {"reparam_conv": {"kernel": (kernel * t).astype(np.float32),
                                            "bias": (bias * t + s).astype(np.float32)}}}


def _reparameterize(module: RepVggDw, variables: dict) -> dict:
    return RepVggDw.reparameterize(variables, eps=norm_eps(module.norm))


kinds.register(RepVggDw, kinds.LayerKind("reparam", reparameterize=_reparameterize))
