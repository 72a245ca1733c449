"""The variable tree of a module (shapes and dtypes, no arrays) for an input shape, traced once per module and shape.

Loading weights, counting parameters, deploying, pruning and exporting all need the structure of `module.init`'s
variables without computing them. Tracing init runs every layer's Python (0.3-1 s per network on CPU), and one
workflow asks for the same structure several times (load, then deploy, then export). Linen modules are frozen
dataclasses, equal when their fields are equal, so the trace is cached by (module, input shape, dtype), the batch
size left out: no layer's variables depend on it.

    from zoo.abstract import abstract_variables

    tree = abstract_variables(zoo.create_model("mobilenet_v2"), (1, 224, 224, 3))  # jax.ShapeDtypeStruct leaves

`per_module_and_shape` caches other facts read from one abstract trace of a forward pass the same way (which layers
an int8 export keeps float, which activations a network uses).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_CACHED_TREES = 64  # structures only: a few kilobytes each


def abstract_variables(module: nn.Module, input_shape, dtype=jnp.float32) -> dict:
    """`jax.eval_shape` of `module.init` on zeros of `input_shape` (NHWC, batch first; traced with batch 1): a fresh
    tree each call (the caller may edit its dicts), its leaves shared with the cache (immutable
    `jax.ShapeDtypeStruct`s)."""
    shape = (1, *(int(d) for d in input_shape[1:]))
    dtype = np.dtype(dtype).name
    try:
        hash(module)
    except TypeError:  # a field that cannot be hashed (a list, a dict): trace without the cache
        return _trace(module, shape, dtype)
    return _copy(_cached(module, shape, dtype))


@functools.lru_cache(maxsize=_CACHED_TREES)
def _cached(module: nn.Module, shape: tuple[int, ...], dtype: str) -> dict:
    return _trace(module, shape, dtype)


def _trace(module: nn.Module, shape: tuple[int, ...], dtype: str) -> dict:
    with structure_trace():
        return jax.eval_shape(lambda x: module.init(jax.random.key(0), x),
                              jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))


def structure_trace():
    """How a trace read for structure only (variables, module paths, ops used) runs: depthwise convolutions as one
    native op, which no structure depends on, instead of the CPU default's sum of shifted slices (a trace of 40% fewer
    seconds over the zoo)."""
    from zoo.layers.conv import depthwise_impl

    return depthwise_impl("native")


def per_module_and_shape(fn):
    """`fn(module, variables, x)`, a fact about the trace of `module` on inputs shaped like `x` (its batch left out),
    cached by (module, shape, dtype): `variables` is read for its structure only, which the module and shape decide.
    The result must be immutable (a string, None, a frozenset). Unhashable modules are traced each call."""
    @functools.lru_cache(maxsize=_CACHED_TREES)
    def cache(module, shape, dtype, variables):
        with structure_trace():
            return fn(module, variables.value, jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))

    @functools.wraps(fn)
    def wrapper(module, variables, x):
        shape, dtype = (1, *(int(d) for d in x.shape[1:])), np.dtype(x.dtype).name
        try:
            hash(module)
        except TypeError:
            with structure_trace():
                return fn(module, variables, x)
        return cache(module, shape, dtype, _Unhashed(variables))

    wrapper.cache_clear = cache.cache_clear
    return wrapper


class _Unhashed:
    """Passes a value through `lru_cache` without entering the key (every instance compares equal)."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return 0

    def __eq__(self, other):
        return isinstance(other, _Unhashed)


def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree
