"""The sidecar that travels with an exported model, and classification with it (`predict_tflite`).

`model.tflite.json` next to `model.tflite` holds what a caller needs to feed the model and read its output: input
size, mean/std, interpolation, crop_pct, labels, the quantization and the input/output dtypes with their scale and
zero point, plus the verification and op reports of the export and the sha256 of the .tflite bytes it describes (so a
stale sidecar is caught instead of silently misclassifying). `signatures` lists every signature of the file with its
input and output names, and what its verification checked (`check`) with the check's report; `input`, `output` and
`verification` repeat the first signature's for single-output readers. `task` is the model's (`ModelCfg.task`) when
the file holds its forward; a segmentation file's `segmentation` entry says which output it holds and which heads it
left out (`export.segmentation`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT = "zoo-tflite-metadata"
VERSION = 1


def sidecar_path(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_name(p.name + ".json")


def sha256_bytes(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _finite(obj):
    """JSON has no inf/nan: those floats (e.g. the SQNR of an exact match) become null."""
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def build(*, name: str, cfg, labels, quantization: str, int8_io: bool, batch: int, input_hw: tuple[int, int],
          ops, verification, content: bytes, versions: dict, calibration: str | None = None,
          bias_correction: bool = False, equalization: bool = False, int8_keep_float: str | None = None,
          int8_split_top_row: str | None = None, signatures: dict | None = None,
          checks: dict | None = None, task: str | None = None, segmentation: dict | None = None) -> dict:
    """The sidecar dictionary of one export (`ops`: OpsReport, `verification`: the first signature's report;
    `signatures`: key -> {"inputs", "outputs"} TensorInfo lists, `export.signatures.read`; `checks`: key ->
    (OutputCheck, its report, where the verify inputs came from); `task`: the model's `ModelCfg.task` when the file
    holds its forward (None for signatures of the caller's); `segmentation`: `export.segmentation.sidecar`)."""
    first = next(iter(signatures.values())) if signatures else None
    inp = first["inputs"][0] if first else ops.inputs[0]
    out = first["outputs"][0] if first else ops.outputs[0]
    checks = checks or {}
    listed = {k: {"inputs": [t.as_dict() for t in v["inputs"]], "outputs": [t.as_dict() for t in v["outputs"]],
                  "check": getattr(checks[k][0], "name", type(checks[k][0]).__name__) if k in checks else None,
                  "verification": _finite(checks[k][1].as_dict()) if k in checks else None,
                  "data": checks[k][2] if k in checks else None}
              for k, v in (signatures or {}).items()}
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": name,
        "model": cfg.name,
        "family": cfg.family,
        "input_hw": list(input_hw),
        "in_chans": cfg.in_chans,
        "batch": batch,
        "layout": "NHWC",
        "mean": list(cfg.mean),
        "std": list(cfg.std),
        "interpolation": cfg.interpolation,
        "crop_pct": cfg.crop_pct,
        "task": task,
        "num_classes": cfg.num_classes,
        "labels": list(labels) if labels is not None else None,
        "quantization": quantization,
        "int8_io": int8_io,
        "calibration": calibration,  # how int8 activation ranges were set (None: no calibration)
        "bias_correction": bias_correction,  # int8-grid kernels with corrected biases (compress.bias_correction)
        "equalization": equalization,  # channel scales moved for per-tensor int8 ranges (compress.equalize)
        "int8_keep_float": int8_keep_float,  # regex over module paths whose ops an int8 export kept float
        "int8_split_top_row": int8_split_top_row,  # stages whose residual stream was split by rows (export.row_split)
        "input": inp.as_dict(),
        "output": out.as_dict(),
        "size_bytes": len(content),
        "sha256": sha256_bytes(content),
        "verification": _finite(verification.as_dict()) if verification is not None else None,
        "check": next(iter(listed.values()))["check"] if listed else None,
        "signatures": listed,
        "ops": ops.ops,
        "float_islands": [list(i) for i in ops.float_islands],
        "exporter": versions,
        **({"segmentation": segmentation} if segmentation is not None else {}),
    }


def read(model_path: str | Path, check_hash: bool = True) -> dict:
    """The sidecar of `model_path`; raises if it is missing, not ours, or describes other bytes."""
    side = sidecar_path(model_path)
    if not side.is_file():
        raise FileNotFoundError(f"no metadata sidecar {side}: export with `zoo export` / export.to_tflite(out=...), "
                                "which writes it next to the model")
    meta = json.loads(side.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{side} is not a zoo TFLite metadata file")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{side} has metadata version {meta['version']}; this zoo reads up to {VERSION}")
    if check_hash and Path(model_path).is_file():
        digest = sha256_bytes(Path(model_path).read_bytes())
        if digest != meta.get("sha256"):
            raise ValueError(f"{side} describes a different model file (sha256 mismatch): re-export the model")
    return meta


def _cfg(meta: dict):
    from zoo.config import ModelCfg

    return ModelCfg(name=meta["model"], family=meta.get("family", ""), input_size=tuple(meta["input_hw"]),
                    in_chans=meta.get("in_chans", 3), num_classes=meta["num_classes"], mean=tuple(meta["mean"]),
                    std=tuple(meta["std"]), interpolation=meta["interpolation"], crop_pct=meta["crop_pct"])


def preprocess_for(meta: dict, images) -> np.ndarray:
    """Images (paths, PIL images, uint8 arrays) -> the float NHWC batch the exported model expects."""
    from zoo.preprocess import preprocess

    if isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating) and images.ndim == 4:
        return images.astype(np.float32)  # already normalized
    return preprocess(images, _cfg(meta))


def predict_tflite(model_path: str | Path, images, top_k: int = 5,
                   num_threads: int | None = None) -> list[list[tuple[str, float]]]:
    """Top-k (label, probability) per image from an exported .tflite and its sidecar (what `zoo predict --tflite` runs).

    `images`: one or a list of paths, PIL images or uint8 HxWxC arrays (resized, center-cropped and normalized as the
    sidecar says), or an already-normalized float NHWC array.
    """
    from export.runtime import LiteRTRunner

    meta = read(model_path)
    if meta.get("task") == "segmentation":
        raise ValueError(f"{model_path} is a segmentation model: its classes per pixel come from "
                         "export.segment_tflite (`zoo segment --tflite`, `zoo predict --tflite`)")
    x = preprocess_for(meta, images)
    runner = LiteRTRunner(model_path, num_threads=num_threads)
    if runner.output is None:
        raise ValueError(f"{model_path} has outputs {list(runner.outputs)}: top-k classes need one logits output; "
                         "run it with export.LiteRTRunner(path).run(x), which returns them by name")
    logits = runner.run(x).reshape(len(x), -1)
    z = logits - logits.max(-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    names = meta.get("labels") or [str(i) for i in range(probs.shape[-1])]
    out = []
    for p in probs:
        idx = np.argsort(-p)[:top_k]
        out.append([(names[i], float(p[i])) for i in idx])
    return out
