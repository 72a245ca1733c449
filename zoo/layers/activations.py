"""Activations by the names model tables use. Definitions follow PyTorch's so that converted weights match."""

from __future__ import annotations

from typing import Callable

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


def get_act(name: str) -> Callable:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
