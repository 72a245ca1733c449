"""Export zoo models to TFLite / LiteRT, verified against JAX, with the ops they use and their on-CPU latency.

    import zoo, export
    model = zoo.load("tf_efficientnet_lite0")
    res = export.to_tflite(model, quantization="int8", representative_data=model.preprocess(images),
                           out="lite0_int8.tflite")
    print(res.summary())                                   # ops, XNNPACK partitions, parity with JAX
    export.predict_tflite("lite0_int8.tflite", "cat.jpg")  # classify with the sidecar's preprocessing and labels
    export.segment_tflite("lraspp.tflite", "cat.jpg")      # a segmentation model's class per pixel
    export.detect_tflite("ssdlite.tflite", "cat.jpg")      # a detection model's boxes, classes and scores
    export.benchmark_tflite("lite0_int8.tflite", threads=(1, 2))

Models returning a dict export named outputs; `to_tflite(signatures={...})` puts several functions in one file, and
`check=` (an `export.verify.OutputCheck`) says how a task's outputs are verified.

TensorFlow is imported only by `to_tflite`; running and timing exported models needs only `ai-edge-litert`.
"""

from export.compare import compare_tflite
from export.detect import detect_tflite
from export.errors import ExportError, ExportParityError, UnsupportedOpsError
from export.latency import benchmark_jax, benchmark_tflite
from export.metadata import predict_tflite
from export.ops_report import OpsReport, analyze
from export.ptq import quantize as quantize_ptq
from export.runtime import LiteRTRunner
from export.segment import segment_tflite
from export.sparsity_tflite import check_tflite_n_m, tflite_kernels
from export.tflite import QUANTIZATIONS, ExportResult, to_tflite
from export.verify import (ClassificationCheck, DetectionCheck, OutputCheck, PerOutputCheck, SegmentationCheck,
                           VerifyReport)

__all__ = [
    "ExportError", "ExportParityError", "UnsupportedOpsError", "ExportResult", "OpsReport", "VerifyReport",
    "LiteRTRunner", "QUANTIZATIONS", "analyze", "benchmark_jax", "benchmark_tflite", "check_tflite_n_m",
    "compare_tflite", "detect_tflite", "predict_tflite", "segment_tflite", "quantize_ptq", "tflite_kernels",
    "to_tflite", "OutputCheck", "ClassificationCheck", "DetectionCheck", "PerOutputCheck", "SegmentationCheck",
]
