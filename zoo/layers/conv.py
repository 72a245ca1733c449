"""The one convolution every zoo model uses: PyTorch-symmetric or TF-"SAME" padding, and the depthwise formulation.

Why the depthwise choice lives here: XLA:CPU runs `conv_general_dilated` with `feature_group_count == channels` 10-100x
slower than oneDNN, while the same product written as k*k shifted slices times the kernel taps runs on par with PyTorch
(see FINDINGS). Exported graphs must keep the native grouped convolution (TFLite turns it into DEPTHWISE_CONV_2D), and
GPUs/TPUs run native depthwise well. So the choice is made in one place, explicitly: `depthwise_impl("native")` in the
exporter, "auto" (shifted slices on CPU only) everywhere else. Both give the same parameters and the same numbers.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DepthwiseImpl = Literal["auto", "native", "shifted"]
_DEPTHWISE_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("depthwise_impl", default="auto")

# timm/torch initialise convs with He-normal on fan-out (EfficientNet's `_init_weight_goog`).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@contextlib.contextmanager
def depthwise_impl(impl: DepthwiseImpl):
    """Select how depthwise convolutions are traced inside this block (read at trace time, so re-jit after)."""
    if impl not in ("auto", "native", "shifted"):
        raise ValueError(f"depthwise_impl must be 'auto', 'native' or 'shifted', got {impl!r}")
    token = _DEPTHWISE_IMPL.set(impl)
    try:
        yield
    finally:
        _DEPTHWISE_IMPL.reset(token)


def resolved_depthwise_impl() -> str:
    impl = _DEPTHWISE_IMPL.get()
    if impl == "auto":
        return "shifted" if jax.default_backend() == "cpu" else "native"
    return impl


def pad_amounts(size: int, kernel: int, stride: int, dilation: int, padding: str | int) -> tuple[int, int]:
    """(before, after) padding of one spatial dim. 'same' is TF's asymmetric SAME (extra pixel after)."""
    eff = (kernel - 1) * dilation + 1
    if padding == "same":
        out = -(-size // stride)
        total = max((out - 1) * stride + eff - size, 0)
        return total // 2, total - total // 2
    if padding == "symmetric":
        p = ((stride - 1) + dilation * (kernel - 1)) // 2  # timm's get_padding
        return p, p
    return int(padding), int(padding)


def _depthwise_shifted(x, kernel, strides, dilation, pads):
    """Depthwise conv as a sum over kernel taps of strided slices times per-channel weights."""
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    kh, kw = kernel.shape[:2]
    oh = (x.shape[1] - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    ow = (x.shape[2] - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation[0], j * dilation[1]
            patch = jax.lax.slice(
                x,
                (0, r0, c0, 0),
                (x.shape[0], r0 + (oh - 1) * strides[0] + 1, c0 + (ow - 1) * strides[1] + 1, x.shape[3]),
                (1, strides[0], strides[1], 1),
            )
            term = patch * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


class Conv2d(nn.Module):
    """NHWC 2-D convolution with an HWIO `kernel` (and optional `bias`), grouped or depthwise."""

    features: int
    kernel_size: int | Sequence[int] = 3
    stride: int = 1
    dilation: int = 1
    groups: int = 1
    padding: str | int = "symmetric"  # "symmetric" (PyTorch), "same" (TF dynamic SAME) or an int
    use_bias: bool = False
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        ks = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        in_ch = x.shape[-1]
        if in_ch % self.groups or self.features % self.groups:
            raise ValueError(f"{self.name}: channels in={in_ch} out={self.features} not divisible by groups={self.groups}")
        kernel = self.param("kernel", conv_init, (*ks, in_ch // self.groups, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        strides, dil = (self.stride, self.stride), (self.dilation, self.dilation)
        pads = [pad_amounts(x.shape[1 + a], ks[a], strides[a], dil[a], self.padding) for a in range(2)]
        depthwise = self.groups == in_ch == self.features and self.groups > 1
        if depthwise and resolved_depthwise_impl() == "shifted":
            y = _depthwise_shifted(x, kernel, strides, dil, pads)
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=strides,
                padding=pads,
                rhs_dilation=dil,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups,
            )
        if bias is not None:
            y = y + bias.astype(dtype)
        return y
