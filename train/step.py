"""The pure training step `(state, batch, rng) -> (state, metrics)` and the evaluation step.

One function does one optimizer update: forward and loss through the task, gradients of the trained parameters only
(frozen ones are closed over, so XLA never computes their gradients), optional gradient accumulation over micro-batches
(a scan, so memory stays that of one micro-batch), the update, compression hooks, the EMA, and the metrics big_vision
logs (l2 norms of gradients, parameters and updates, and the learning rate). `jit_train_step` compiles it with the
state donated and shardings from the mesh.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from train.state import TrainState, merge_trainable, split_trainable
from train.forward import Forward
from train.tasks import Task

# A compression hook: (params, compression_state) -> (params, compression_state), applied after every update
# (e.g. re-applying sparsity masks). Pure; traced into the step.
Hook = Callable[[dict, dict], tuple[dict, dict]]
# A projection of the EMA weights onto the same constraint, `(ema_params, compression_state) -> ema_params` (sparsity
# masks): the average of masked weights is not masked itself, because it remembers the weights before the mask.
EmaHook = Callable[[dict, dict], dict]


def make_train_step(module, task: Task, tx: optax.GradientTransformation, schedule, trainable: Sequence[str], *,
                    accum_steps: int = 1, ema_decay: float = 0.0, hooks: Sequence[Hook] = (),
                    ema_hooks: Sequence[EmaHook] = ()):
    """The step as a pure function `step(state, batch, rng, consts) -> (state, metrics)`."""
    trainable = tuple(trainable)

    def loss_fn(train, frozen, model_state, batch, rng, consts):
        params, task_params = merge_trainable(train, frozen)
        forward = Forward(module, params, model_state, train=True, rng=rng)
        loss, metrics = task.loss(forward, batch, task_params=task_params, consts=consts, rng=rng)
        return loss, (metrics, forward.model_state)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: dict, rng: jax.Array, consts: dict):
        rng = jax.random.fold_in(rng, state.step)
        train, frozen = split_trainable(state.params, state.task_params, trainable)
        if accum_steps == 1:
            (_, (metrics, model_state)), grads = grad_fn(train, frozen, state.model_state, batch, rng, consts)
        else:
            micro = jax.tree.map(lambda x: _micro_batches(x, accum_steps), batch)

            def body(carry, xs):
                grads, model_state = carry
                i, mb = xs
                (_, (m, model_state)), g = grad_fn(train, frozen, model_state, mb, jax.random.fold_in(rng, i),
                                                   consts)
                return (jax.tree.map(jnp.add, grads, g), model_state), m

            zeros = jax.tree.map(jnp.zeros_like, train)
            (grads, model_state), ms = jax.lax.scan(body, (zeros, state.model_state),
                                                    (jnp.arange(accum_steps), micro))
            grads = jax.tree.map(lambda g: g / accum_steps, grads)
            metrics = jax.tree.map(jnp.mean, ms)
        updates, opt_state = tx.update(grads, state.opt_state, train)
        new_train = optax.apply_updates(train, updates)
        params, task_params = merge_trainable(new_train, frozen)
        compression = state.compression
        for hook in hooks:
            params, compression = hook(params, compression)
        ema = state.ema_params
        if ema_decay:
            # warm the average up: early on the weights move fast and the raw decay would keep the init for long
            decay = jnp.minimum(ema_decay, (1.0 + state.step) / (10.0 + state.step))
            ema = jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema, params)
            for project in ema_hooks:
                ema = project(ema, compression)
        metrics = {
            **metrics,
            "lr": schedule(state.step),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(state.params),
            "update_norm": optax.tree.norm(updates),
        }
        new_state = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                                  task_params=task_params, ema_params=ema, compression=compression)
        return new_state, metrics

    return step


def _micro_batches(x: jax.Array, k: int) -> jax.Array:
    """(B, ...) -> (k, B/k, ...), micro-batch j taking every k-th example (keeps each device's shard local)."""
    if x.shape[0] % k:
        raise ValueError(f"batch of {x.shape[0]} does not split into {k} micro-batches (optim.accum_steps)")
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def make_eval_step(module, task: Task):
    """`eval_step(params, model_state, batch) -> sums` (inference mode)."""

    def eval_step(params, model_state, batch):
        return task.eval_sums(Forward(module, params, model_state, train=False), batch)

    return eval_step


def jit_train_step(step, mesh_shardings):
    """`step` compiled with the state donated; `mesh_shardings` = (replicated, batch) NamedShardings."""
    replicated, batched = mesh_shardings
    return jax.jit(step, in_shardings=(replicated, batched, replicated, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


def jit_eval_step(eval_step, mesh_shardings):
    replicated, batched = mesh_shardings
    return jax.jit(eval_step, in_shardings=(replicated, replicated, batched), out_shardings=replicated)
