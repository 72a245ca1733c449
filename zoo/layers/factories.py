"""The layer factories a network or head builds with: injected ones (quantized, sparse, slimmable layers) or the
defaults, with the compute dtype bound."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import flax.linen as nn

from zoo.layers.conv import Conv2d
from zoo.layers.norm import batch_norm


def layer_factories(conv: Callable | None, norm: Callable | None, dense: Callable | None, *, bn_eps: float,
                    dtype: Any = None, **conv_options) -> tuple[Callable, Callable, Callable]:
    """(conv, norm, dense) a family builds with: the injected factories or the defaults (`Conv2d`, BatchNorm with
    PyTorch's conventions and `bn_eps`, `nn.Dense`), each with the compute dtype bound, the conv also with
    `conv_options` (e.g. padding). An injected factory takes the default's arguments: `Conv2d`'s (features,
    kernel_size, stride=, groups=, use_bias=, padding=, dtype=), `nn.BatchNorm`'s (use_running_average=, dtype=),
    `nn.Dense`'s (features, use_bias=, dtype=)."""
    return (partial(conv or Conv2d, dtype=dtype, **conv_options), partial(norm or batch_norm(bn_eps), dtype=dtype),
            partial(dense or nn.Dense, dtype=dtype))
