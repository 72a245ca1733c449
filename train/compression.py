"""What the `compress` section of a run config does to the model and the step (the loop itself stays generic).

In order: channel pruning turns the built model into a smaller ordinary one (`compress.prune`), sparsity adds mask
hooks whose masks live in `TrainState.compression` (`compress.sparsity`), and QAT folds BatchNorm and wraps the network
(`compress.qat_train`). A pruned architecture is recorded in the run's metadata (`architecture`), so `load_run` and
`model.init_from` rebuild it without the caller passing the model.
"""

from __future__ import annotations

import logging

import zoo
from train.config import CompressConfig, ConfigError

log = logging.getLogger("train")


def prune(model: zoo.Model, c: CompressConfig) -> zoo.Model:
    """`model` with `c.prune_ratio` of its prunable channels removed (unchanged when pruning is off)."""
    if not c.prune_ratio:
        return model
    if not 0.0 < c.prune_ratio < 1.0:
        raise ConfigError(f"compress.prune_ratio must be in (0, 1), got {c.prune_ratio}")
    from compress.prune import prune_channels

    from zoo.counting import count_params

    before = count_params(model.variables["params"])
    small = prune_channels(model, c.prune_ratio, criterion=c.prune_criterion)
    log.info("pruned %s -> %s: %.2fM -> %.2fM parameters", model.cfg.name, small.cfg.name, before / 1e6,
             count_params(small.variables["params"]) / 1e6)
    return small


def quantization_aware(model: zoo.Model, c: CompressConfig) -> zoo.Model:
    if not c.qat:
        return model
    from compress.qat_train import quantization_aware_model

    return quantization_aware_model(model, c)


def sparsity(c: CompressConfig, params) -> tuple[list, list, dict]:
    """(hooks, EMA projections, initial compression state) for `c.sparsity` (all empty when off)."""
    if not c.sparsity:
        return [], [], {}
    from compress.sparsity import Sparsifier

    try:
        sp = Sparsifier.from_config(c.sparsity, target=c.sparsity_target, rules=c.sparsity_rules,
                                    scope=c.sparsity_scope, schedule=c.sparsity_schedule,
                                    begin_step=c.sparsity_begin_step, end_step=c.sparsity_end_step,
                                    frequency=c.sparsity_frequency, initial=c.sparsity_initial)
        state = sp.init(params)
    except ValueError as e:
        raise ConfigError(f"compress.sparsity: {e}") from None
    log.info("sparsity: %s", sp.describe(params).splitlines()[0])
    return [sp.hook], [sp.apply], state


def architecture(model: zoo.Model) -> dict | None:
    """The record that rebuilds a pruned MobileNet-family module (None for a registered architecture)."""
    from zoo.models.mobilenet_base import MobileNet

    module = model.module
    if not isinstance(module, MobileNet) or model.cfg.name in zoo.list_models():
        return None
    from compress.prune_arch import base_name, block_widths, module_fields

    base = base_name(model.cfg.name)
    return {"base": base, "widths": block_widths(module), "fields": module_fields(module, base)}


def rebuild(arch: dict, **overrides):
    """The module an `architecture` record describes (`overrides`: e.g. another `num_classes`)."""
    from compress.prune_arch import rebuild as rebuild_arch

    return rebuild_arch(arch["base"], arch["widths"], {**arch["fields"], **overrides})

