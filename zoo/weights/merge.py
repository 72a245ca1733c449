"""Strict merge of checkpoint arrays into freshly initialized variables."""

from __future__ import annotations

from typing import Mapping

from flax import traverse_util
import jax
import numpy as np

from zoo.convert import flatten_variables
from zoo.weights.errors import WeightsMismatchError


def _flat(variables) -> dict[str, np.ndarray]:
    return {k: v for k, v in zip(flatten_variables(variables), jax.tree_util.tree_leaves(variables))}


def adapt_input_conv(kernel: np.ndarray, in_chans: int) -> np.ndarray:
    """An RGB first-conv kernel (H, W, 3, O) for `in_chans` inputs: summed for 1 channel, else tiled and rescaled
    so activations keep their magnitude (timm's rule)."""
    if in_chans == 1:
        return kernel.sum(axis=2, keepdims=True)
    reps = -(-in_chans // kernel.shape[2])
    return np.tile(kernel, (1, 1, reps, 1))[:, :, :in_chans] * (kernel.shape[2] / in_chans)


def merge_variables(
    init_variables,
    checkpoint: Mapping[str, np.ndarray],
    *,
    reset: tuple[str, ...] = (),
    first_conv: str | tuple[str, ...] | None = None,
) -> dict:
    """Replace every leaf of `init_variables` by the checkpoint array of the same flat name.

    `init_variables` may be abstract (`jax.eval_shape` of init): no random initialization is needed to load weights.
    `reset`: module paths (e.g. the classifier) that keep their initialized values, or become zeros when abstract
    (a zero-initialized head is big_vision's default for fine-tuning). `first_conv`: module path(s)
    whose kernel may differ in input channels and is adapted. Any other missing, unexpected or mis-shaped array
    raises `WeightsMismatchError` listing them all.
    """
    init = _flat(init_variables)
    first_convs = {first_conv} if isinstance(first_conv, str) else set(first_conv or ())
    adapted = {f"params/{path}/kernel" for path in first_convs}

    def is_reset(key: str) -> bool:
        path = key.split("/", 1)[1]
        return any(path == r or path.startswith(r + "/") for r in reset)

    missing = [k for k in init if k not in checkpoint and not is_reset(k)]
    unexpected = [k for k in checkpoint if k not in init]
    merged, misshaped = {}, []
    for key, value in init.items():
        if is_reset(key) or key not in checkpoint:
            merged[key] = np.zeros(value.shape, value.dtype) if isinstance(value, jax.ShapeDtypeStruct) else value
            continue
        ckpt = np.asarray(checkpoint[key])
        if key in adapted and ckpt.shape[2] != value.shape[2]:
            ckpt = adapt_input_conv(ckpt, value.shape[2])
        if ckpt.shape != tuple(value.shape):
            misshaped.append(f"{key}: checkpoint {ckpt.shape} vs model {tuple(value.shape)}")
            continue
        merged[key] = ckpt.astype(value.dtype)
    if missing or unexpected or misshaped:
        lines = (
            [f"  in model but not in checkpoint: {k}" for k in missing[:20]]
            + [f"  in checkpoint but not in model: {k}" for k in unexpected[:20]]
            + [f"  shape mismatch: {m}" for m in misshaped[:20]]
        )
        raise WeightsMismatchError("weights do not fit the model:\n" + "\n".join(lines))
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in merged.items()})
