"""Post-training full-int8 quantization to TFLite with calibrated activation ranges (min/max, percentile or MSE).

    import zoo
    from export import ptq
    model = zoo.load("tf_efficientnet_lite0")
    res = ptq.quantize(model, model.preprocess(images), method="mse", out="lite0_int8.tflite")
    print(res.verification.summary())      # top-1 agreement and SQNR against the float JAX model

Weights are quantized per output channel by the converter, activations per tensor from the calibration data; the
method only changes how each activation tensor's range is chosen (`export.ptq_ranges`, `export.ptq_tflite`).
Cheaper alternatives that need no calibration: `export.to_tflite(model, quantization="dynamic" | "fp16")`.
"""

from __future__ import annotations

import os
from pathlib import Path

from export.ptq_ranges import DEFAULT_PERCENTILE, METHODS, check_method

DEFAULT_METHOD = "mse"

__all__ = ["METHODS", "DEFAULT_METHOD", "quantize", "calibration_data"]


def calibration_data(source, cfg, limit: int | None = None):
    """Float NHWC calibration inputs for `cfg` (a `zoo.ModelCfg`) from an image folder, a .npy file or `mnist5k`
    (`export.compare.labelled_images`; at most `limit`, spread over the classes)."""
    import numpy as np

    from export.compare import labelled_images
    from zoo.preprocess import preprocess

    images, _, _ = labelled_images(source, limit)
    return images if isinstance(images, np.ndarray) else preprocess(images, cfg)


def quantize(model, data, method: str = DEFAULT_METHOD, *, percentile: float = DEFAULT_PERCENTILE,
             candidates: int = 64, out: str | os.PathLike | None = None, **export_kwargs):
    """Full-int8 TFLite export of `model` calibrated on `data` with activation ranges from `method`.

    model: a `zoo.Model`, a model name, or a linen module with `variables=` (passed on to `export.to_tflite`).
    data: float NHWC calibration inputs normalized like the model's input (`model.preprocess(images)`), an iterable
        of such batches, or a path (image folder, .npy, `mnist5k`) read with the model's preprocessing.
    method: "minmax", "percentile" (clip each tail at `percentile`) or "mse" (the range minimizing each tensor's
        int8 error, searched over `candidates` shrinks per end).
    export_kwargs: any other `export.to_tflite` argument (verify_data, verify_labels, min_agreement, int8_io, ...).
    Returns the verified `export.ExportResult`; the file is written to `out` only if verification passed.
    """
    method = check_method(method)
    for key in ("quantization", "representative_data", "calibration"):
        if key in export_kwargs:
            raise TypeError(f"quantize() sets {key} itself; pass the data as `data` and the method as `method`")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    if not isinstance(candidates, int) or candidates < 2:
        raise ValueError(f"candidates must be an int >= 2, got {candidates!r}")
    from export.tflite import to_tflite

    if isinstance(data, (str, Path)):
        import zoo

        if isinstance(model, str):
            model = zoo.load(model, progress=export_kwargs.get("progress", True))
        cfg = export_kwargs.get("cfg") or getattr(model, "cfg", None)
        if cfg is None:
            raise ValueError("reading calibration data from a path needs the model's preprocessing: pass a "
                             "zoo.Model or cfg=ModelCfg(...)")
        hw = export_kwargs.get("input_hw")
        data = calibration_data(data, cfg.replace(input_size=tuple(hw)) if hw else cfg)
    hook = method
    if method != "minmax" and (percentile != DEFAULT_PERCENTILE or candidates != 64):
        from export.ptq_tflite import recalibrate

        def hook(calibrated, batches):
            return recalibrate(calibrated, batches, method, percentile=percentile, candidates=candidates)
    return to_tflite(model, quantization="int8", representative_data=data, calibration=hook, out=out,
                     **export_kwargs)
