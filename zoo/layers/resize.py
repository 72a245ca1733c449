"""Bilinear resize with half-pixel centers, in NHWC: torch `F.interpolate(mode="bilinear", align_corners=False)`
(no antialiasing), the upsampling of the segmentation heads (LR-ASPP, DeepLabV3) and of their logits to the input.

It is traced as one `stablehlo.composite` named "odml.upsample_bilinear2d" (attributes `size`, `align_corners=False`,
`is_nchw_op=False`), the name TensorFlow's TFLite converter lowers to one RESIZE_BILINEAR op (half_pixel_centers).
XLA runs the composite's decomposition: constant-index gathers and a lerp per axis, as torch's CPU kernel computes
them (float32 source coordinates, clamped at 0). The indices are computed from iota inside the decomposition: an
index array made in numpy would be captured as a second operand of the composite, which the converter then keeps
as a STABLEHLO_COMPOSITE op instead of lowering it.

Why not `jax.image.resize`: it antialiases when shrinking, which torch's default does not, and it contracts each axis
with a weight matrix, which the jaxpr's MAC count would take for a matrix product (and the converter turns into
FULLY_CONNECTED ops). Composites have no derivative rule of their own: the resize is linear, so its derivative is
the decomposition applied to the tangent (`custom_jvp`), which reverse mode transposes.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

COMPOSITE_NAME = "odml.upsample_bilinear2d"


def _resize_axis(x, axis: int, size_out: int):
    size_in = x.shape[axis]
    scale = np.float32(size_in) / np.float32(size_out)  # float32, as torch's CPU kernel
    src = jnp.maximum((jax.lax.iota(jnp.float32, size_out) + np.float32(0.5)) * scale - np.float32(0.5), 0.0)
    i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), size_in - 1)
    i1 = jnp.minimum(i0 + 1, size_in - 1)
    shape = [1] * x.ndim
    shape[axis] = size_out
    w1 = (src - i0).astype(x.dtype).reshape(shape)
    # in-range indices by construction: "clip" keeps the gather free of the bounds checks of the default mode
    return jnp.take(x, i0, axis=axis, mode="clip") * (1 - w1) + jnp.take(x, i1, axis=axis, mode="clip") * w1


def _decomposition(x, *, size, align_corners: bool, is_nchw_op: bool):
    if align_corners or is_nchw_op:  # the attributes only describe this function's one convention
        raise ValueError("the bilinear resize decomposition is NHWC with half-pixel centers")
    for axis, out in zip((1, 2), size):
        if x.shape[axis] != int(out):
            x = _resize_axis(x, axis, int(out))
    return x


@partial(jax.custom_jvp, nondiff_argnums=(1,))
def _composite(x, size: tuple[int, int]):
    return jax.lax.composite(_decomposition, name=COMPOSITE_NAME)(
        x, size=np.asarray(size, np.int64), align_corners=False, is_nchw_op=False)


@_composite.defjvp
def _composite_jvp(size, primals, tangents):
    return _composite(primals[0], size), _decomposition(tangents[0], size=size, align_corners=False, is_nchw_op=False)


def resize_bilinear(x, size: tuple[int, int]):
    """Resize an NHWC map to `size` (H, W) bilinearly with half-pixel centers (torch's `align_corners=False`)."""
    if x.ndim != 4:
        raise ValueError(f"resize_bilinear takes an NHWC map, got shape {x.shape}")
    size = (int(size[0]), int(size[1]))
    if min(size) < 1:
        raise ValueError(f"resize_bilinear: output size must be positive, got {size}")
    if tuple(x.shape[1:3]) == size:
        return x
    return _composite(x, size)
