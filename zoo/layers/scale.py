"""Layer scale (Touvron et al., "Going deeper with Image Transformers", arXiv:2103.17239, Sec. 3): a learned
per-channel gain on a residual branch, `x * gamma` over the last (channel) axis. ConvNeXt multiplies its MLP output by
it before the residual add; timm stores it as the block's `gamma` parameter.
"""

from __future__ import annotations

import flax.linen as nn

from zoo.layers import kinds


class LayerScale(nn.Module):
    """`x * gamma`, `gamma` of shape (channels,), initialised to `init_value`."""

    init_value: float = 1e-6

    @nn.compact
    def __call__(self, x):
        gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


# A per-channel affine map without shift or statistics: a norm-like layer that no pass folds (a deploy form keeps it).
kinds.register(LayerScale, kinds.LayerKind("norm"))
