"""QAT in the shared training loop: what `compress.qat=True` does to the model, and how a finished run comes back.

    zoo train --config mnist5k_lite0 --set model.init_from=runs/mnist5k_lite0 compress.qat=true steps=40 \\
        optim.lr=1e-4 --workdir runs/mnist5k_lite0_qat

The loop builds the model as usual (pretrained weights or `model.init_from`, a float run), then
`quantization_aware_model` folds BatchNorm into the convolutions (`compress.fold_bn=True`, the default: the graph the
converter deploys, BN statistics frozen) and wraps the result in `compress.qat.QuantAware`. The run's `config.json`
and checkpoints record the `compress` section, so `train.load_run` rebuilds the same wrapping around the registered
architecture (`rebuild_module`) and gets back the trained QAT network; `finalize` puts its kernels on the int8 grid
(what the loop returns and `load_run` gives back), ready for `export.to_tflite(model, quantization="int8", ...)`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

import zoo
from compress import qat
from compress.fold_bn import fold_bn, folded_module


def _input_shape(cfg) -> tuple[int, int, int, int]:
    return (1, *cfg.input_size, cfg.in_chans)


def _options(compress_cfg) -> dict:
    return dict(weight_bits=compress_cfg.qat_weight_bits, activation_bits=compress_cfg.qat_activation_bits,
                ema_decay=compress_cfg.qat_ema_decay, exclude=compress_cfg.qat_exclude)


def quantization_aware_model(model: zoo.Model, compress_cfg) -> zoo.Model:
    """`model` (float) folded (when `compress_cfg.fold_bn`) and wrapped for QAT, with empty activation ranges."""
    if isinstance(model.module, qat.QuantAware) or qat.STATS in model.variables:
        raise ValueError("the model is quantization-aware already (model.init_from a QAT run?); continue that run "
                         "from its workdir, or start QAT from its float parent run")
    shape = _input_shape(model.cfg)
    module, variables = model.module, model.variables
    if compress_cfg.fold_bn:
        module, variables = fold_bn(module, variables, input_shape=shape)
    module, variables = qat.quantize_aware(module, variables, input_shape=shape, **_options(compress_cfg))
    return dataclasses.replace(model, module=module, variables=variables)


def rebuild_module(module: nn.Module, compress_cfg, model_cfg) -> nn.Module:
    """The QAT module that `quantization_aware_model` made from `module`, without needing its variables (`module`
    itself when it is quantization-aware already)."""
    if isinstance(module, qat.QuantAware):
        return module
    shape = _input_shape(model_cfg)
    if compress_cfg.fold_bn:
        module = folded_module(module, shape)
    options = _options(compress_cfg)
    return qat.QuantAware(module, options["weight_bits"], options["activation_bits"], float(options["ema_decay"]),
                          options["exclude"])


def finalize(model: zoo.Model) -> zoo.Model:
    """The QAT model with its kernels on the int8 grid (`compress.qat.bake`): same outputs, exact int8 export."""
    if not isinstance(model.module, qat.QuantAware):
        raise TypeError(f"finalize takes a quantization-aware model, got a {type(model.module).__name__}")
    return dataclasses.replace(model, variables=qat.bake(model.module, model.variables, _input_shape(model.cfg)))

