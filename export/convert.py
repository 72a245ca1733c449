"""TensorFlow concrete functions -> a .tflite flatbuffer: the converter's settings per quantization, its full-int8
calibration (one input or several signatures), and the two-step path for float islands and custom activation ranges.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from export import calibration as calib_io
from export.errors import ExportError

RangeHook = Callable[[bytes, list], bytes]


def calibration_samples(data: dict[str, dict[str, np.ndarray]], batch: dict[str, int]) -> list:
    """What the converter's representative dataset yields: per signature key, its inputs (name -> float array) in
    model-sized chunks. A one-signature file takes the list of its inputs; a file of several signatures takes
    `(key, {input name: chunk})`, the converter's way of calibrating each signature on its own data."""
    out = []
    for key, inputs in data.items():
        chunks = {name: calib_io.chunks(x, batch[key]) for name, x in inputs.items()}
        for i in range(len(next(iter(chunks.values())))):
            sample = {name: c[i] for name, c in chunks.items()}
            out.append((key, sample) if len(data) > 1 else list(sample.values()))
    return out


def _tensor_names(content: bytes) -> list[str]:
    from export.ops_report import _schema

    model = _schema().Model.GetRootAs(content, 0)
    names = []
    for si in range(model.SubgraphsLength()):
        g = model.Subgraphs(si)
        names += [(g.Tensors(i).Name() or b"").decode() for i in range(g.TensorsLength())]
    return names


def convert(tf, holder, concretes: list, q: str, samples: list | None, batches: list[np.ndarray] | None,
            int8_io: bool, allow_flex: bool, progress: bool, keep_float: str | None = None,
            ranges: RangeHook | None = None) -> bytes:
    """The concrete functions (one signature each) as a .tflite flatbuffer of quantization `q`. For "int8",
    `samples` are what the converter's representative dataset yields (`calibration_samples`) and `batches` the
    model-sized calibration batches a `ranges` hook sees (one-input files)."""
    conv = tf.lite.TFLiteConverter.from_concrete_functions(list(concretes), holder)
    ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if q != "fp32":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if q == "fp16":
        conv.target_spec.supported_types = [tf.float16]
    if q == "int8":
        def representative():
            it = samples
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(samples, desc="calibrating", unit="batch", leave=False)
            yield from it

        conv.representative_dataset = representative
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
    if allow_flex:
        ops = ops + [tf.lite.OpsSet.SELECT_TF_OPS]
    conv.target_spec.supported_ops = ops
    try:
        if q == "int8" and (keep_float or ranges is not None):
            return _quantize_two_step(tf, conv, keep_float, int8_io, ranges, batches)
        return conv.convert()
    except ExportError:
        raise
    except Exception as e:  # the converter raises ConverterError / RuntimeError with pages of MLIR diagnostics
        text = str(e).strip()
        hint = ""
        if "deserialize portable artifact" in text or "neither a custom op nor a flex op" in text:
            hint = (" (the StableHLO in the exported module is newer than this TensorFlow reads; see "
                    "export.trace.stablehlo_versions())")
        elif q == "int8" and ("quantiz" in text.lower()):
            hint = " (an op has no int8 kernel; try quantization='dynamic' or report the op)"
        first = "\n".join(text.splitlines()[:12])
        raise ExportError(f"TFLite conversion ({q}) failed{hint}:\n{first}") from e


def _quantize_two_step(tf, conv, keep_float: str | None, int8_io: bool, ranges: RangeHook | None,
                       batches: list[np.ndarray]) -> bytes:
    """Full-int8 conversion in two steps - calibrate, then quantize - as the converter does internally, with two
    things possible in between: `ranges(calibrated, batches)` replaces the calibrated activation min/max (see
    `resolve_calibration`), and ops whose output tensor names (the flax module paths) match `keep_float` stay float
    (the converter's own deny-list, what TF's QuantizationDebugger does for selective quantization)."""
    try:
        from tensorflow.lite.python import convert as tfl_convert
        from tensorflow.lite.python import util as tfl_util
    except ImportError as e:  # pragma: no cover - a future TF
        raise ExportError(f"this TensorFlow has no two-step quantization entry point ({e}); pass "
                          "int8_keep_float=None and calibration='minmax'") from e
    conv._experimental_calibrate_only = True  # noqa: SLF001
    calibrated = conv.convert()
    if ranges is not None:
        calibrated = ranges(calibrated, batches)
    nodes = []
    if keep_float:
        pat = re.compile(keep_float)
        nodes = sorted({n for n in _tensor_names(calibrated) if pat.search(n)})
    model = tfl_convert.mlir_quantize(calibrated, input_data_type=tf.float32, output_data_type=tf.float32,
                                      denylisted_nodes=nodes)
    if int8_io:
        model = tfl_util.modify_model_io_type(model, tf.int8, tf.int8)
    return model
