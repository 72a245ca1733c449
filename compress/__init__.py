"""Compression passes over zoo models: quantization, sparsity and pruning, distillation, BN folding and
re-parameterization, each a pure function of parameters (or a train-loop hook) that leaves the model an ordinary one.

    from compress import prune_channels, Sparsifier, quantize_aware
    from compress.fold_bn import fold_bn        # (module, variables) -> (module, variables)

In the training loop the same passes are the `compress` section of the run config (`compress.qat=true`,
`compress.sparsity=2:4`, `compress.prune_ratio=0.5`); distillation is the loop's `distill` section, so one recipe can
prune and distill, continue with QAT, then export (`export.to_tflite(..., quantization="int8")`). What reads or
rewrites TFLite files (PTQ range choice, N:M read-back, comparing files) lives in `export`: compress never imports it.
"""

from __future__ import annotations

import importlib

# name -> module; imported on first use, so `import compress` (and the `zoo` command line) stays light
_EXPORTS = {
    "FoldError": "compress.fold_bn",
    "quantize_aware": "compress.qat",
    "QuantAware": "compress.qat",
    "Sparsifier": "compress.sparsity",
    "format_sparsity_report": "compress.sparsity_report",
    "check_n_m": "compress.sparsity_masks",
    "prune_channels": "compress.prune",
    "save_pruned": "compress.prune_io",
    "load_pruned": "compress.prune_io",
}
_RENAMED: dict = {}

__all__ = sorted([*_EXPORTS, *_RENAMED])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _RENAMED:
        module, attr = _RENAMED[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
