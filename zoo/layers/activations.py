"""Activations by the names model tables use. Definitions follow PyTorch's so that converted weights match."""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp


def hard_sigmoid(x):
    """relu6(x + 3) / 6, as torch.nn.Hardsigmoid (and TFLite's HARD_SWISH building block)."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hard_swish(x):
    return x * hard_sigmoid(x)


def gelu(x):
    return jax.nn.gelu(x, approximate=False)  # torch.nn.GELU default is the exact erf form


ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "hard_swish": hard_swish,
    "hard_sigmoid": hard_sigmoid,
    "silu": nn.silu,
    "swish": nn.silu,
    "sigmoid": nn.sigmoid,
    "gelu": gelu,
    "identity": lambda x: x,
}


# Trace-time substitutions (e.g. the exporter swaps hard-swish for an int8-friendly equivalent). Read at trace time,
# like `depthwise_impl`, so a model never needs editing to be traced differently.
_OVERRIDES: contextvars.ContextVar[Mapping[str, Callable]] = contextvars.ContextVar("act_overrides", default={})


@contextlib.contextmanager
def override_activations(overrides: Mapping[str, Callable]):
    """Trace with `overrides` (activation name -> function) in place of the registered definitions."""
    unknown = set(overrides) - set(ACTIVATIONS)
    if unknown:
        raise ValueError(f"cannot override unknown activations {sorted(unknown)}; known: {sorted(ACTIVATIONS)}")
    token = _OVERRIDES.set({**_OVERRIDES.get(), **overrides})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def get_act(name: str) -> Callable:
    override = _OVERRIDES.get().get(name)
    if override is not None:
        return override
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
