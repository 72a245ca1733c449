"""`TrainState`: everything a step reads and writes, as one pytree (what a checkpoint holds)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from flax import traverse_util

from zoo.tree import flatten, unflatten  # noqa: F401  (re-exported for train's modules)

TASK_PREFIX = "@task/"


@struct.dataclass
class TrainState:
    """Parameters and everything else that changes while training.

    `params` are the model's parameters; `model_state` its other collections ({"batch_stats": ...}, updated in
    training only); `opt_state` covers only the trained parameters (frozen ones have none); `task_params` are trainable
    parameters the task owns (distillation adapters); `ema_params` the moving average of `params` ({} when off);
    `compression` a slot for compression state (quantization statistics, sparsity masks) that the loop carries,
    checkpoints and hands to step hooks without reading it.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    task_params: Any = struct.field(default_factory=dict)
    ema_params: Any = struct.field(default_factory=dict)
    compression: Any = struct.field(default_factory=dict)

    @property
    def batch_stats(self):
        return self.model_state.get("batch_stats", {})

    def variables(self, ema: bool = False) -> dict:
        """`{"params", "batch_stats", ...}` for `module.apply` (the EMA weights when `ema` and kept)."""
        params = self.ema_params if (ema and self.ema_params) else self.params
        return {"params": params, **self.model_state}



def split_trainable(params, task_params, trainable: tuple[str, ...]) -> tuple[dict, dict]:
    """(trained leaves, frozen leaves) as flat dicts; task parameters are always trained, under `@task/`."""
    flat = flatten(params)
    keep = set(trainable)
    train = {k: v for k, v in flat.items() if k in keep}
    train.update({TASK_PREFIX + k: v for k, v in flatten(task_params).items()})
    frozen = {k: v for k, v in flat.items() if k not in keep}
    return train, frozen


def merge_trainable(train: dict, frozen: dict) -> tuple[dict, dict]:
    """Inverse of `split_trainable`: (params, task_params) trees."""
    model = {**frozen, **{k: v for k, v in train.items() if not k.startswith(TASK_PREFIX)}}
    task = {k[len(TASK_PREFIX):]: v for k, v in train.items() if k.startswith(TASK_PREFIX)}
    return unflatten(model), unflatten(task)


def create_state(variables: dict, tx, trainable: tuple[str, ...], *, task_params: dict | None = None,
                 ema: bool = False, compression: dict | None = None) -> TrainState:
    variables = dict(variables)
    params = variables.pop("params")
    task_params = task_params or {}
    train, _ = split_trainable(params, task_params, trainable)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=variables,
        opt_state=tx.init(train),
        task_params=task_params,
        ema_params=jax.tree.map(jnp.copy, params) if ema else {},
        compression=compression or {},
    )
