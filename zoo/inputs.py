"""Input checks that run before tracing a model, so mistakes read as what they are."""

from __future__ import annotations

import jax.numpy as jnp


def check_images(x, in_chans: int, model: str = "model") -> None:
    """Raise a clear error unless `x` is a float NHWC batch with `in_chans` channels."""
    shape = tuple(getattr(x, "shape", ()))
    dtype = getattr(x, "dtype", None)
    if len(shape) != 4:
        hint = " (add a batch axis: x[None])" if len(shape) == 3 else ""
        raise ValueError(f"{model} expects a 4-D NHWC batch (N, H, W, {in_chans}), got shape {shape}{hint}")
    if shape[-1] != in_chans:
        layout = " - the input looks NCHW; transpose to NHWC" if shape[1] == in_chans else ""
        raise ValueError(
            f"{model} expects {in_chans} channels in the last axis (NHWC), got shape {shape}{layout}; "
            f"pass in_chans={shape[-1]} to create_model/load to adapt the first convolution"
        )
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{model} expects floating-point images normalized by the model's mean/std, got dtype {dtype}; "
            "use `model.preprocess(images)` (zoo.load) or zoo.preprocess.preprocess(images, cfg)"
        )
    if min(shape[1:3]) < 1:
        raise ValueError(f"{model} got an empty image of shape {shape}")


