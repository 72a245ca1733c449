"""Sparsity masks as pure `jnp` functions (they trace inside jit): magnitude, per layer or global, and N:M groups.

A mask is a bool array of the parameter's shape, True where the weight is kept.

    w = jnp.asarray(np.random.default_rng(0).normal(size=(1, 1, 64, 32)))
    keep = n_m_mask(w, 2, 4, axis=2)          # 2 of every 4 consecutive input channels, per output channel
    assert check_n_m(w * keep, 2, 4, axis=2)
    keep = magnitude_mask(w, 0.75)             # the 75% smallest |w| pruned
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def check_ratio(value, name: str = "sparsity") -> float:
    """`value` as a float in [0, 1), else a ValueError naming `name`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name}={value!r} is outside [0, 1): it is the fraction of weights set to zero "
                         "(0.5 prunes half; 1.0 would prune everything)")
    return v


def parse_n_m(spec) -> tuple[int, int]:
    """"2:4" (or (2, 4)) -> (2, 4): keep N of every M consecutive weights; 1 <= N < M."""
    if isinstance(spec, str):
        parts = spec.strip().split(":")
        try:
            n, m = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"N:M sparsity must look like '2:4', got {spec!r}") from None
    else:
        n, m = spec
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer)) and 1 <= n < m):
        raise ValueError(f"N:M sparsity needs integers 1 <= N < M (keep N of every M weights), got {n}:{m}")
    return int(n), int(m)


def _ranks(x: jnp.ndarray) -> jnp.ndarray:
    """Rank of every element of a 1-D array in ascending order (ties: earlier index first)."""
    order = jnp.argsort(x, stable=True)
    return jnp.zeros(x.shape, jnp.int32).at[order].set(jnp.arange(x.size, dtype=jnp.int32))


def _count(sparsity, size: int) -> jnp.ndarray:
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


def magnitude_mask(w, sparsity) -> jnp.ndarray:
    """Keep all but the round(sparsity * size) smallest |w| (`sparsity` may be traced)."""
    a = jnp.abs(w).astype(jnp.float32).reshape(-1)
    return (_ranks(a) >= _count(sparsity, a.size)).reshape(w.shape)


def global_magnitude_masks(ws: Sequence, sparsity) -> list[jnp.ndarray]:
    """One threshold over all of `ws` together: the round(sparsity * total) smallest |w| anywhere are pruned, so
    layers with many small weights lose more than others (Zhu & Gupta 2017 prune per layer; global ranking is what
    torch.nn.utils.prune.global_unstructured does)."""
    if not ws:
        return []
    flat = jnp.concatenate([jnp.abs(w).astype(jnp.float32).reshape(-1) for w in ws])
    keep = _ranks(flat) >= _count(sparsity, flat.size)
    out, start = [], 0
    for w in ws:
        out.append(keep[start:start + w.size].reshape(w.shape))
        start += w.size
    return out


def n_m_mask(w, n: int, m: int, axis: int) -> jnp.ndarray:
    """Keep the n largest |w| in every group of m consecutive entries along `axis` (ties: the earlier entry)."""
    axis = axis % w.ndim
    if w.shape[axis] % m:
        raise ValueError(f"N:M groups of {m} do not divide axis {axis} of shape {tuple(w.shape)}")
    x = jnp.moveaxis(jnp.abs(w).astype(jnp.float32), axis, -1)
    groups = x.reshape(*x.shape[:-1], x.shape[-1] // m, m)
    order = jnp.argsort(-groups, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)  # 0 for the largest in each group
    return jnp.moveaxis((rank < n).reshape(x.shape), -1, axis)


def n_m_group_nonzeros(array, m: int, axis: int) -> np.ndarray:
    """Non-zeros in every group of m consecutive entries along `axis` (numpy), shape (..., size // m)."""
    a = np.asarray(array)
    if a.ndim == 0:
        raise ValueError("N:M groups need an array with at least one axis, got a scalar")
    if not -a.ndim <= axis < a.ndim:
        raise ValueError(f"axis {axis} is out of range for shape {a.shape}")
    axis = axis % a.ndim
    if a.shape[axis] % m:
        raise ValueError(f"M={m} does not divide axis {axis} (size {a.shape[axis]}) of shape {a.shape}")
    nz = np.moveaxis(a != 0, axis, -1)
    return nz.reshape(*nz.shape[:-1], nz.shape[-1] // m, m).sum(-1)


def check_n_m(array, n: int, m: int, axis: int) -> bool:
    """Whether every group of m consecutive entries along `axis` holds at most n non-zeros."""
    n, m = parse_n_m((n, m))
    return bool((n_m_group_nonzeros(array, m, axis) <= n).all())
