"""One trace of a model's inference forward per (model, input shape), shared by the per-model tests of a process: the
MAC count of test_models.py reads its jaxpr and test_parity.py compiles it (the two run in one worker, per family:
conftest.py). Tracing a network costs 0.3-1 s on CPU, about as much as compiling it at the quick-compile setting."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import zoo
from zoo.abstract import abstract_variables
from zoo.layers.conv import depthwise_impl


@functools.lru_cache(maxsize=32)  # a family's models (RegNet: 16): the two files run them in turn
def inference_trace(name: str, shape: tuple[int, ...]):
    """`jax.jit(apply).trace` of registered model `name` on a float32 NHWC `shape`, depthwise convolutions native
    (what `zoo info` counts, and the faster compile): `.jaxpr` for counting, `.lower().compile()` to run it."""
    module = zoo.create_model(name)
    variables = abstract_variables(module, shape)
    with depthwise_impl("native"):
        return jax.jit(lambda v, x: module.apply(v, x)).trace(variables, jax.ShapeDtypeStruct(shape, jnp.float32))
