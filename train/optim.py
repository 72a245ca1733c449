"""Optimizers, learning-rate schedules and parameter selection (freezing, per-group learning rates) from `OptimConfig`.

Parameters are addressed by their path, `/`-joined (`stages_3/block_0/conv_pw/kernel`), the same names the zoo uses as
its checkpoint format. Frozen parameters get no gradient computed and no optimizer state; a per-group learning rate is a
multiplier on the updates of the matching parameters (exactly a different lr for SGD, RMSProp and Adam-family rules).
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import jax.numpy as jnp
import optax

from train.config import ConfigError, OptimConfig

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def make_schedule(cfg: OptimConfig, total_steps: int) -> Schedule:
    """The learning rate as a function of the step (0-based), peaking at `cfg.lr`."""
    if total_steps <= 0:
        raise ConfigError("the run has no steps: set steps or epochs")
    warmup = cfg.warmup_steps or int(round(cfg.warmup_fraction * total_steps))
    if warmup >= total_steps and cfg.schedule not in ("onecycle", "constant"):
        raise ConfigError(f"warmup ({warmup} steps) must be shorter than the run ({total_steps} steps)")
    lr, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    kind = cfg.schedule
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total_steps, floor)
    if kind == "onecycle":  # Smith & Topin, arXiv:1708.07120; PyTorch OneCycleLR's cosine annealing defaults
        return optax.cosine_onecycle_schedule(total_steps, lr, pct_start=cfg.onecycle_pct_start)
    if kind == "constant":
        body = optax.constant_schedule(lr)
    elif kind == "linear":
        body = optax.linear_schedule(lr, floor, total_steps - warmup)
    elif kind == "exponential":  # staircase decay of the TF MobileNet/EfficientNet recipes (0.97 every 2.4 epochs)
        every = cfg.decay_every_steps or max(1, total_steps // 100)
        body = optax.exponential_decay(lr, every, cfg.decay_rate, staircase=True)
    else:
        raise ConfigError(f"optim.schedule must be cosine, onecycle, constant, linear or exponential, not '{kind}'")
    if not warmup:
        return body
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), body], [warmup])


def make_optimizer(cfg: OptimConfig, schedule: Schedule, decay_mask: Mapping[str, bool],
                   lr_scale: Mapping[str, float]) -> optax.GradientTransformation:
    """The update rule over a flat {path: array} dict of the trained parameters.

    `decay_mask[path]` says whether weight decay applies; `lr_scale[path]` multiplies that parameter's updates.
    """
    wd, name = cfg.weight_decay, cfg.optimizer
    mask = dict(decay_mask)
    if name == "adamw":
        tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps or 1e-8, weight_decay=wd, mask=mask)
    elif name == "lamb":
        tx = optax.lamb(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps or 1e-6, weight_decay=wd, mask=mask)
    elif name in ("adam", "sgd", "rmsprop"):
        if name == "adam":
            rule = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps or 1e-8)
        elif name == "sgd":
            rule = optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov and cfg.momentum > 0)
        else:
            # TF's RMSProp as the MobileNet/EfficientNet papers used it: eps 1e-3 inside the square root, the
            # squared-gradient average starting at 1, momentum 0.9 (tf.compat.v1.train.RMSPropOptimizer).
            rule = optax.rmsprop(schedule, decay=cfg.rmsprop_decay, eps=cfg.eps or 1e-3, initial_scale=1.0,
                                 eps_in_sqrt=True, momentum=cfg.momentum or None)
        # Coupled L2 (added to the gradient), as these recipes define weight decay.
        tx = optax.chain(optax.add_decayed_weights(wd, mask=mask), rule) if wd else rule
    else:
        raise ConfigError(f"optim.optimizer must be adamw, adam, sgd, rmsprop or lamb, not '{name}'")
    chain = []
    if cfg.clip_grad_norm:
        chain.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    chain.append(tx)
    if any(s != 1.0 for s in lr_scale.values()):
        scale = dict(lr_scale)
        chain.append(optax.GradientTransformation(
            lambda params: optax.EmptyState(),
            lambda updates, state, params=None: ({k: u * scale[k] for k, u in updates.items()}, state)))
    return optax.chain(*chain) if len(chain) > 1 else chain[0]


def select_trainable(paths: list[str], cfg: OptimConfig) -> list[str]:
    """The parameter paths that are trained, given `cfg.trainable` and `cfg.freeze` regexes (re.search)."""
    keep = paths
    if cfg.trainable:
        pattern = _compile(cfg.trainable, "optim.trainable")
        keep = [p for p in keep if pattern.search(p)]
    if cfg.freeze:
        pattern = _compile(cfg.freeze, "optim.freeze")
        keep = [p for p in keep if not pattern.search(p)]
    if not keep:
        raise ConfigError(f"optim.trainable={cfg.trainable!r} / optim.freeze={cfg.freeze!r} leave no parameter to "
                          f"train; parameter paths look like: {', '.join(paths[:3])}, ..., {paths[-1]}")
    return keep


def lr_multipliers(paths: list[str], groups: Mapping[str, float]) -> dict[str, float]:
    """{path: multiplier}: the first regex in `groups` that matches a path sets it, else 1."""
    compiled = [(_compile(k, f"optim.lr_groups[{k!r}]"), float(v)) for k, v in groups.items()]
    for pattern, _ in compiled:
        if not any(pattern.search(p) for p in paths):
            raise ConfigError(f"optim.lr_groups pattern {pattern.pattern!r} matches no trained parameter")
    out = {}
    for p in paths:
        out[p] = next((v for pattern, v in compiled if pattern.search(p)), 1.0)
    return out


# Parameters that are not weights of a layer although they have more than one dimension: position embeddings, the
# class/distillation tokens and attention bias tables. timm's models exclude them from weight decay
# (`no_weight_decay`), as the papers' recipes do.
NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token", "dist_token", "attention_biases"})


def decay_mask(shapes: Mapping[str, tuple], cfg: OptimConfig) -> dict[str, bool]:
    """Weight decay on matrices and kernels; not on biases and norm scales unless `decay_norm_and_bias`, and never on
    position embeddings, prefix tokens and attention biases (`NO_DECAY_NAMES`)."""
    return {p: p.rsplit("/", 1)[-1] not in NO_DECAY_NAMES and (cfg.decay_norm_and_bias or len(s) > 1)
            for p, s in shapes.items()}


def _compile(pattern: str, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"{key}: invalid regular expression {pattern!r}: {e}") from None
