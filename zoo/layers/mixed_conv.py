"""Mixed convolution (MixNet's MDConv and grouped pointwise conv, Tan & Le, arXiv:1907.09595 Section 3).

Channels are split into as many groups as there are kernel sizes; group i runs its own conv with kernel i (depthwise
with 3x3, 5x5, 7x7... kernels side by side, or 1x1 convs on channel groups) and the outputs are concatenated. The
children are named "0", "1", ... as timm's `MixedConv2d` entries are, so checkpoints map generically.

Blocks ask for one by passing `MixedKernels` as the kernel size to a conv factory wrapped by `mixing`: the block code
stays the same for a plain and a mixed conv, and the injected factory builds every group (quantized or sparse groups
come with it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp


@dataclass(frozen=True)
class MixedKernels:
    """Kernel sizes of a mixed conv, one per channel group. Its own type, not a tuple: a tuple kernel size reads as
    (height, width), and flax turns tuple subclasses in module fields into plain tuples."""

    sizes: tuple[int, ...]

    def __post_init__(self):
        sizes = tuple(int(k) for k in self.sizes)
        if len(sizes) < 2 or any(k < 1 for k in sizes):
            raise ValueError(f"a mixed conv takes two or more positive kernel sizes, got {self.sizes}")
        object.__setattr__(self, "sizes", sizes)


def split_channels(channels: int, groups: int) -> list[int]:
    """Equal groups, the remainder added to the first (timm's `_split_channels`, the TF MixNet rule)."""
    split = [channels // groups] * groups
    split[0] += channels - sum(split)
    return split


class MixedConv2d(nn.Module):
    """Convs of different kernel sizes on channel groups, concatenated: `features` outputs, stride `stride`.

    depthwise: each group is a depthwise conv (MDConv); otherwise each is a full conv from its input group to its
    output group (a grouped conv whose groups may differ in size).
    """

    features: int
    kernels: tuple[int, ...]
    conv: Callable[..., nn.Module]
    stride: int = 1
    depthwise: bool = False
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        n = len(self.kernels)
        in_splits, out_splits = split_channels(x.shape[-1], n), split_channels(self.features, n)
        if self.depthwise and in_splits != out_splits:
            raise ValueError(f"{self.name}: a depthwise mixed conv keeps its width, got {x.shape[-1]} -> "
                             f"{self.features} channels")
        outs, start = [], 0
        for i, (k, cin, cout) in enumerate(zip(self.kernels, in_splits, out_splits)):
            part = x[..., start:start + cin]
            start += cin
            outs.append(self.conv(cout, k, stride=self.stride, groups=cin if self.depthwise else 1,
                                  use_bias=self.use_bias, name=str(i))(part))
        return jnp.concatenate(outs, axis=-1)


def mixing(conv: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """`conv` as a factory that also builds `MixedConv2d` when the kernel size is `MixedKernels` (depthwise when
    `groups` equals the output width, as a block asks for a depthwise conv); any other call goes to `conv` as is."""

    def make(features: int, kernel_size: Any, stride: int = 1, groups: int = 1, use_bias: bool = False,
             name: str | None = None, **kwargs) -> nn.Module:
        if not isinstance(kernel_size, MixedKernels):
            return conv(features, kernel_size, stride=stride, groups=groups, use_bias=use_bias, name=name, **kwargs)
        if kwargs:
            raise TypeError(f"a mixed conv takes no options {sorted(kwargs)}; bind them to the group conv factory")
        if groups not in (1, features):
            raise ValueError(f"a mixed conv is depthwise (groups == features) or dense per group, got groups={groups}")
        return MixedConv2d(features, kernel_size.sizes, conv, stride=stride, depthwise=groups > 1,
                           use_bias=use_bias, name=name)

    return make
