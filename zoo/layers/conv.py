"""The one convolution every zoo model uses: PyTorch-symmetric or TF-"SAME" padding, and the depthwise formulation.

Why the depthwise choice lives here: XLA:CPU runs `conv_general_dilated` with `feature_group_count == channels` 10-100x
slower than oneDNN, while the same product written as k*k shifted slices times the kernel taps runs on par with PyTorch
(see FINDINGS). Exported graphs must keep the native grouped convolution (TFLite turns it into DEPTHWISE_CONV_2D), and
GPUs/TPUs run native depthwise well. The exporter traces `depthwise_impl("tiled")`: native, except that a kernel of
more taps than LiteRT's XNNPACK runs fast (7x7 in ConvNeXt and StarNet, up to 11x11 in MixNet) becomes a sum of native
convolutions over blocks of the kernel (`depthwise_tiles`). "auto" (shifted slices on CPU only) is used everywhere
else. All give the same parameters and the same numbers up to float rounding.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DepthwiseImpl = Literal["auto", "native", "shifted", "tiled"]
_DEPTHWISE_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("depthwise_impl", default="auto")

# timm/torch initialise convs with He-normal on fan-out (EfficientNet's `_init_weight_goog`).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@contextlib.contextmanager
def depthwise_impl(impl: DepthwiseImpl):
    """Select how depthwise convolutions are traced inside this block (read at trace time, so re-jit after): "native"
    (one grouped convolution), "shifted" (a sum over taps of shifted slices), "tiled" (native; kernels of more than
    `XNNPACK_MAX_DEPTHWISE_TAPS` taps as a sum of native convs over blocks of them), "auto" (shifted on CPU)."""
    if impl not in ("auto", "native", "shifted", "tiled"):
        raise ValueError(f"depthwise_impl must be 'auto', 'native', 'shifted' or 'tiled', got {impl!r}")
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


# The most taps (kh * kw) a depthwise kernel may have for the LiteRT XNNPACK delegate to run it with its fast
# single-pass kernels: beyond, fp32 and int8 alike fall to a generic path 7-60x slower (one 56x56x96 depthwise conv at
# 1 thread: 5x5 0.85 ms fp32 / 0.72 ms int8, 7x3 0.85 / 0.73, 6x6 6.1 / 35.6, 7x7 8.5 / 45.0; `bench/depthwise_taps.py`).
XNNPACK_MAX_DEPTHWISE_TAPS = 25


def depthwise_tiles(kh: int, kw: int, max_taps: int = XNNPACK_MAX_DEPTHWISE_TAPS) -> list[tuple[int, int, int, int]]:
    """Split a kh x kw kernel into the fewest row x column blocks of at most `max_taps` taps each, as
    (row0, row1, col0, col1) slices: 7x7 -> three 7x3/7x2/7x2 column blocks, 9x9 -> 5x5, 5x4, 4x5, 4x4 blocks."""
    best = None
    for r in range(1, kh + 1):
        rows = -(-kh // r)
        for c in range(1, kw + 1):
            cols = -(-kw // c)
            if rows * cols <= max_taps and (best is None or r * c < best[0] * best[1]):
                best = (r, c)
    r, c = best

    def cuts(n, parts):  # near-equal parts, larger first
        sizes = [n // parts + (i < n % parts) for i in range(parts)]
        return [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(parts)]

    return [(r0, r1, c0, c1) for r0, r1 in cuts(kh, r) for c0, c1 in cuts(kw, c)]


def _depthwise_tiled(x, kernel, bias, strides, dilation, pads):
    """A depthwise conv with more taps than XNNPACK runs fast, as a sum of depthwise convs over kernel blocks that it
    does run fast (`depthwise_tiles`); the bias goes with the first block, so the converter fuses it there."""
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    kh, kw = kernel.shape[:2]
    oh = (x.shape[1] - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    ow = (x.shape[2] - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    out = None
    for r0, r1, c0, c1 in depthwise_tiles(kh, kw):
        y0, x0 = r0 * dilation[0], c0 * dilation[1]
        part = jax.lax.slice(x, (0, y0, x0, 0), (x.shape[0], y0 + (oh - 1) * strides[0] + (r1 - r0 - 1) * dilation[0] + 1,
                                                  x0 + (ow - 1) * strides[1] + (c1 - c0 - 1) * dilation[1] + 1, x.shape[3]))
        y = jax.lax.conv_general_dilated(part, kernel[r0:r1, c0:c1], window_strides=strides, padding="VALID",
                                         rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=x.shape[3])
        if out is None:
            out = y if bias is None else y + bias
        else:
            out = out + y
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
        impl = resolved_depthwise_impl() if depthwise else "native"
        if impl == "shifted":
            y = _depthwise_shifted(x, kernel, strides, dil, pads)
        elif impl == "tiled" and ks[0] * ks[1] > XNNPACK_MAX_DEPTHWISE_TAPS:
            return _depthwise_tiled(x, kernel, None if bias is None else bias.astype(dtype), strides, dil, pads)
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
