"""PyTorch state dicts -> zoo variables.

Each family supplies only a key map: `rename(torch_module_path) -> zoo_module_path | None` (None drops the entry).
This module does the rest, the same way for every family: OIHW conv weights -> HWIO kernels, (out, in) linear
weights -> (in, out) kernels (reshaped to a 1x1 conv where the zoo uses one), BatchNorm weight/bias/running stats ->
params scale/bias and batch_stats mean/var, LayerNorm weight -> scale. Target shapes come from the zoo model, so a
mismatch is reported by parameter name instead of surfacing as a broadcasting error later.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import numpy as np

from zoo.weights.errors import WeightsMismatchError

Rename = Callable[[str], "str | None"]

# Checkpoint buffers the zoo computes instead of storing: BatchNorm's step counter, and the index into attention
# biases by relative offset that timm's EfficientFormer keeps as a persistent buffer (a function of the map size).
DERIVED_BUFFERS = ("num_batches_tracked", "attention_bias_idxs")


def flatten_variables(variables) -> dict[str, tuple[int, ...]]:
    """{'params/stem/conv/kernel': shape, ...} of a (possibly abstract) variables tree."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        key = "/".join(str(getattr(p, "key", p)) for p in path)
        flat[key] = tuple(leaf.shape)
    return flat


def _torch_to_zoo_array(name: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    if name.endswith("kernel"):
        if value.ndim == 4:  # OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:  # (out, in) -> (in, out)
            value = value.T
    if value.shape != target_shape:
        if value.size == int(np.prod(target_shape)) and value.ndim == 2 and len(target_shape) == 4:
            value = value.reshape(target_shape)  # a Linear stored as a 1x1 conv
        elif value.shape[:2] == (1, 1) and value.ndim == 4 and value.shape[2:] == tuple(target_shape):
            value = value.reshape(target_shape)  # a 1x1 conv stored where the model has a Linear (timm's conv forms)
        else:
            raise WeightsMismatchError(f"'{name}': checkpoint shape {value.shape} does not match model shape {target_shape}")
    return np.ascontiguousarray(value, dtype=np.float32)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray], rename: Rename, target: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """Map a flat torch state dict onto flat zoo variable names (`params/...`, `batch_stats/...`).

    `target` is `flatten_variables(model variables)`. Raises `WeightsMismatchError` listing unmapped checkpoint
    entries and mis-shaped arrays; missing model entries are checked by the caller's merge.
    """
    out: dict[str, np.ndarray] = {}
    unmapped, errors = [], []
    for key, value in state_dict.items():
        mod, _, leaf = key.rpartition(".")
        if leaf in DERIVED_BUFFERS:
            continue
        zoo_mod = rename(mod)
        if zoo_mod is None:
            continue
        value = np.asarray(value)
        is_bn = f"{mod}.running_mean" in state_dict
        if leaf == "running_mean":
            name = f"batch_stats/{zoo_mod}/mean"
        elif leaf == "running_var":
            name = f"batch_stats/{zoo_mod}/var"
        elif leaf == "weight":
            name = f"params/{zoo_mod}/" + ("scale" if is_bn or value.ndim == 1 else "kernel")
        elif leaf == "bias":
            name = f"params/{zoo_mod}/bias"
        else:  # e.g. a raw nn.Parameter such as a position embedding
            name = f"params/{zoo_mod}/{leaf}"
        if name not in target:
            unmapped.append(f"{key} -> {name}")
            continue
        try:
            out[name] = _torch_to_zoo_array(name, value, target[name])
        except WeightsMismatchError as e:
            errors.append(f"{key}: {e}")
    if unmapped or errors:
        lines = [f"  unexpected: {u}" for u in unmapped[:20]] + [f"  shape: {e}" for e in errors[:20]]
        hidden = max(len(unmapped) - 20, 0) + max(len(errors) - 20, 0)
        if hidden:
            lines.append(f"  ... and {hidden} more")
        raise WeightsMismatchError("checkpoint does not fit the model:\n" + "\n".join(lines))
    return out
