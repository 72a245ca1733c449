"""BatchNorm with PyTorch's conventions, so converted running statistics mean the same thing."""

from __future__ import annotations

from functools import partial

import flax.linen as nn

# torch momentum 0.1 == flax momentum 0.9. eps: 1e-5 (PyTorch default) or 1e-3 (TF-ported weights, torchvision MNv3).
BN_EPS_TORCH = 1e-5
BN_EPS_TF = 1e-3


def batch_norm(eps: float = BN_EPS_TORCH):
    """A BatchNorm factory; call it with `use_running_average=not train`."""
    return partial(nn.BatchNorm, momentum=0.9, epsilon=eps)

LN_EPS_TORCH = 1e-5  # torch.nn.LayerNorm default
