"""Comparing an exported model's outputs with the JAX model's on the same inputs.

fp32: the maximum absolute difference of the logits must be within `atol + rtol * max|JAX logits|` (1e-4 + 1e-5 x the
logit scale by default). The relative part is there because float32 itself is no closer: on a deep random-weight
EfficientNet-Lite4 with logits up to 9.5, JAX's own fp32 logits are 9e-5 from a float64 evaluation of the same model,
and the TFLite ones 1.2e-4 (builtin kernels: 9.7e-5). For logits within a few units the bound stays close to 1e-4.

Quantized exports are judged by top-1 agreement (an optional threshold), and reported with the logit error, the signal-to-noise ratio of
the output (SQNR, in dB: 10 log10 of |ref|^2 / |ref - out|^2) and the largest JAX top-1/top-2 logit margin among the
inputs whose top-1 changed: flips at near-ties (margins well under one logit) are what quantization does to ambiguous
inputs; a flip at a large margin points at a broken graph. For the same reason agreement is also reported on the
inputs the JAX model classifies decisively (top-1 logit at least `DECISIVE_MARGIN` = 1 above the runner-up, i.e. the
top class e times as likely): post-training int8 of a MobileNetV2 agrees with float on ~83-88% of random crops of real
photos, where a quarter of the crops are near-ties (margin < 0.3), and on all of the decisive ones. With `labels`,
both models' accuracy is reported too.

What is checked is the task's choice (`OutputCheck`): `compare(reference, output, quantization)` gets both models'
outputs of one signature as dicts by output name and returns a report with `passed`, `summary()` and `as_dict()`.
`ClassificationCheck` (the above; the default for files whose signatures have one output), `PerOutputCheck` (every
output on its own: the fp32 tolerance above, SQNR for quantized files; the default for several outputs) and
`SegmentationCheck` (per-pixel agreement and mIoU of the argmax labelling) and `DetectionCheck` (detections matched
one to one by class and IoU, `export.detection`) are the ones here; a task passes one, or
its own, to `export.to_tflite(check=...)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from export.errors import ExportParityError

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-5  # relative to the largest |reference value|; see the module doc
DECISIVE_MARGIN = 1.0  # JAX top-1 minus top-2 logit from which an input counts as decisively classified
# An fp32 export whose difference from JAX exceeds the tolerance still passes when, against a float64 run of the same
# JAX model, it is no further off than JAX's own fp32 result times this factor: a model with tiny BatchNorm variances
# (dead channels after fine-tuning) amplifies float rounding beyond any fixed bound, JAX's own included. TFLite's
# kernels sum in other orders than XLA's: on a random FBNetV3-B (hard-swish, squeeze-excite, logits up to 674 at
# 64x64) the file was 2.06x as far from float64 as JAX's fp32 (0.291 vs 0.141), 1.52x at 128x128; on a random
# EfficientNetV2-B0 2.29x (1.51e-3 vs 6.6e-4). A wrong graph is off by orders of magnitude more.
FLOAT64_FACTOR = 3.0


@dataclass(frozen=True)
class VerifyReport:
    quantization: str  # "fp32", "fp16", "dynamic" or "int8"
    num_inputs: int
    data: str  # where the inputs came from: "caller", "calibration", "random"
    max_abs_diff: float
    mean_abs_diff: float
    reference_max_abs: float  # scale of the JAX logits, to read the differences against
    top1_agreement: float
    sqnr_db: float
    max_flip_margin: float  # largest JAX top-1/top-2 margin among inputs whose top-1 changed (0 when none did)
    num_decisive: int  # inputs whose JAX top-1 logit exceeds the runner-up by >= DECISIVE_MARGIN
    decisive_agreement: float | None  # top-1 agreement on those (None when there are none)
    atol: float | None  # fp32 tolerance applied: atol + rtol * reference_max_abs
    rtol: float
    min_agreement: float | None  # agreement threshold applied
    accuracy_jax: float | None = None
    accuracy_tflite: float | None = None
    jax_fp32_error: float | None = None  # max |JAX fp32 - JAX float64| (computed only when the tolerance is exceeded)
    tflite_fp64_error: float | None = None  # max |TFLite - JAX float64|

    @property
    def within_fp32_rounding(self) -> bool:
        """The export is as close to the float64 result as JAX's own fp32 run is (see FLOAT64_FACTOR)."""
        return (self.jax_fp32_error is not None and self.tflite_fp64_error is not None
                and self.tflite_fp64_error <= max(self.tolerance or 0.0, FLOAT64_FACTOR * self.jax_fp32_error))

    @property
    def tolerance(self) -> float | None:
        return None if self.atol is None else self.atol + self.rtol * self.reference_max_abs

    @property
    def passed(self) -> bool:
        ok = self.tolerance is None or self.max_abs_diff <= self.tolerance or self.within_fp32_rounding
        return ok and (self.min_agreement is None or self.top1_agreement >= self.min_agreement)

    def summary(self) -> str:
        s = (f"verified on {self.num_inputs} {self.data} input(s) against JAX: max |diff| {self.max_abs_diff:.3g}"
             + (f" (tolerance {self.tolerance:.3g})" if self.atol is not None else "")
             + f", mean |diff| {self.mean_abs_diff:.3g}, logits up to {self.reference_max_abs:.3g}; "
             f"top-1 agreement {self.top1_agreement:.1%}"
             + (f" (required {self.min_agreement:.0%})" if self.min_agreement is not None else "")
             + f", SQNR {self.sqnr_db:.1f} dB")
        if self.within_fp32_rounding and self.max_abs_diff > (self.tolerance or 0.0):
            s += (f" (above the fixed tolerance, but against float64 JAX the file is off by {self.tflite_fp64_error:.3g}"
                  f" and JAX fp32 itself by {self.jax_fp32_error:.3g})")
        if self.top1_agreement < 1.0:
            s += f", flips at JAX margins <= {self.max_flip_margin:.3g}"
        if self.decisive_agreement is not None and self.num_decisive < self.num_inputs:
            s += (f"; {self.decisive_agreement:.1%} on the {self.num_decisive} inputs JAX decides by a margin "
                  f">= {DECISIVE_MARGIN:g}")
        if self.accuracy_jax is not None:
            s += f"; accuracy JAX {self.accuracy_jax:.1%}, TFLite {self.accuracy_tflite:.1%}"
        return s

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def compare(reference: np.ndarray, output: np.ndarray, quantization: str, *, data: str = "caller",
            atol: float | None = None, rtol: float = 0.0, min_agreement: float | None = None,
            labels=None) -> VerifyReport:
    """Numbers comparing `output` (exported model) with `reference` (JAX); no checking (see `check`)."""
    ref = np.asarray(reference, np.float64).reshape(len(reference), -1)
    out = np.asarray(output, np.float64).reshape(len(output), -1)
    if ref.shape != out.shape:
        raise ExportParityError(f"exported model returns shape {out.shape}, JAX {ref.shape}")
    if not np.all(np.isfinite(out)):
        raise ExportParityError(f"exported model returned non-finite values on {int((~np.isfinite(out)).any(1).sum())}"
                                f" of {len(out)} inputs")
    diff = np.abs(ref - out)
    top_ref, top_out = ref.argmax(-1), out.argmax(-1)
    flips = top_ref != top_out
    srt = np.sort(ref, axis=-1)
    margins = srt[:, -1] - srt[:, -2] if ref.shape[1] > 1 else np.full(len(ref), np.inf)
    margin = float(margins[flips].max()) if flips.any() else 0.0
    decisive = margins >= DECISIVE_MARGIN
    dec_agree = float(np.mean(~flips[decisive])) if decisive.any() else None
    noise = float(np.sum((ref - out) ** 2))
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref ** 2) / noise))
    acc_j = acc_t = None
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        acc_j, acc_t = float(np.mean(top_ref == labels)), float(np.mean(top_out == labels))
    return VerifyReport(quantization, len(ref), data, float(diff.max()), float(diff.mean()), float(np.abs(ref).max()),
                        float(np.mean(~flips)), sqnr, margin, int(decisive.sum()), dec_agree, atol, rtol,
                        min_agreement, acc_j, acc_t)


def check(report):
    """Raise ExportParityError, naming the numbers, unless the report passes its tolerance and threshold."""
    if not isinstance(report, VerifyReport):
        if not report.passed:
            raise ExportParityError(f"the TFLite model fails its check: {report.summary()}", report)
        return report
    if report.atol is not None and not report.max_abs_diff <= report.tolerance and not report.within_fp32_rounding:
        f64 = ""
        if report.jax_fp32_error is not None:
            f64 = (f"; against float64 JAX: TFLite {report.tflite_fp64_error:.3g}, JAX fp32 itself "
                   f"{report.jax_fp32_error:.3g}")
        raise ExportParityError(
            f"{report.quantization} TFLite model differs from JAX by up to {report.max_abs_diff:.3g} on the logits "
            f"(tolerance {report.tolerance:.3g} = {report.atol:g} + {report.rtol:g} x max|logit|; mean "
            f"{report.mean_abs_diff:.3g}, logits up to {report.reference_max_abs:.3g}"
            f", {report.num_inputs} {report.data} inputs, top-1 agreement {report.top1_agreement:.1%}{f64})", report)
    if report.min_agreement is not None and not report.top1_agreement >= report.min_agreement:
        raise ExportParityError(
            f"{report.quantization} TFLite model agrees with JAX on top-1 for {report.top1_agreement:.1%} of "
            f"{report.num_inputs} {report.data} inputs (required {report.min_agreement:.0%}; max |diff| "
            f"{report.max_abs_diff:.3g}, SQNR {report.sqnr_db:.1f} dB, flips at margins <= "
            f"{report.max_flip_margin:.3g})", report)
    return report


@runtime_checkable
class OutputCheck(Protocol):
    """How an export is verified: both models' outputs of one signature (dicts by output name, float arrays with the
    samples first) -> a report with `passed`, `summary()` and `as_dict()`; `check` raises when it did not pass.

    A check may also define `with_float64(report, reference, reference64, output) -> report`: for an fp32 file
    that failed, it gets the JAX outputs computed in float64 too, to judge whether the model itself is that sensitive
    to float rounding (see FLOAT64_FACTOR).
    """

    name: str

    def compare(self, reference: Mapping[str, np.ndarray], output: Mapping[str, np.ndarray], quantization: str): ...


def _same_names(reference: Mapping, output: Mapping) -> None:
    if list(reference) != list(output):
        raise ExportParityError(f"exported model returns outputs {list(output)}, JAX {list(reference)}")


@dataclass(frozen=True)
class ClassificationCheck:
    """Top-1 agreement and SQNR of one logits output (`compare` above): the fp32 logits within `atol + rtol *
    max|logit|`, quantized files with top-1 agreement >= `min_agreement` when given. `output` names the logits among
    several outputs; `labels` add accuracy; `data` says where the inputs came from (set by the exporter)."""

    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    min_agreement: float | None = None
    labels: object = None
    output: str | None = None
    data: str | None = None
    name: str = "classification"

    def _pick(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        if self.output is not None:
            if self.output not in outputs:
                raise ValueError(f"ClassificationCheck(output={self.output!r}): the outputs are {list(outputs)}")
            return outputs[self.output]
        if len(outputs) != 1:
            raise ValueError(f"a classification check compares one logits output; these are {list(outputs)}: name "
                             "it with ClassificationCheck(output=...) or check every output with PerOutputCheck()")
        return next(iter(outputs.values()))

    def compare(self, reference, output, quantization: str) -> VerifyReport:
        _same_names(reference, output)
        fp32 = quantization == "fp32"
        return compare(self._pick(reference), self._pick(output), quantization, data=self.data or "caller",
                       atol=self.atol if fp32 else None, rtol=self.rtol,
                       min_agreement=None if fp32 else self.min_agreement, labels=self.labels)

    def with_float64(self, report: VerifyReport, reference, reference64, output) -> VerifyReport:
        ref64 = np.asarray(self._pick(reference64), np.float64)
        ref, out = (np.asarray(self._pick(d), np.float64).reshape(ref64.shape) for d in (reference, output))
        return dataclasses.replace(report, jax_fp32_error=float(np.abs(ref - ref64).max()),
                                   tflite_fp64_error=float(np.abs(out - ref64).max()))


@dataclass(frozen=True)
class OutputStats:
    """One output compared: differences, the reference's scale, SQNR (dB) and the fp32 tolerance applied."""

    shape: tuple[int, ...]
    max_abs_diff: float
    mean_abs_diff: float
    reference_max_abs: float
    sqnr_db: float
    tolerance: float | None
    jax_fp32_error: float | None = None  # max |JAX fp32 - JAX float64| (only when the tolerance is exceeded)
    tflite_fp64_error: float | None = None

    @property
    def within_tolerance(self) -> bool:
        if self.tolerance is None or self.max_abs_diff <= self.tolerance:
            return True
        return (self.jax_fp32_error is not None and self.tflite_fp64_error is not None
                and self.tflite_fp64_error <= max(self.tolerance, FLOAT64_FACTOR * self.jax_fp32_error))


@dataclass(frozen=True)
class OutputsReport:
    """`PerOutputCheck`'s report: every output's numbers, and what passing required."""

    quantization: str
    num_inputs: int
    outputs: dict[str, OutputStats]
    atol: float | None
    rtol: float
    min_sqnr_db: float | None
    check: str = "per-output"

    @property
    def passed(self) -> bool:
        return all(s.within_tolerance and (self.min_sqnr_db is None or s.sqnr_db >= self.min_sqnr_db)
                   for s in self.outputs.values())

    def summary(self) -> str:
        need = []
        if self.atol is not None:
            need.append(f"max |diff| <= {self.atol:g} + {self.rtol:g} x max|ref|")
        if self.min_sqnr_db is not None:
            need.append(f"SQNR >= {self.min_sqnr_db:g} dB")
        parts = []
        for k, s in self.outputs.items():
            part = (f"{k} {list(s.shape)}: max |diff| {s.max_abs_diff:.3g}"
                    + (f" (tolerance {s.tolerance:.3g})" if s.tolerance is not None else "")
                    + f", values up to {s.reference_max_abs:.3g}, SQNR {s.sqnr_db:.1f} dB")
            if s.tflite_fp64_error is not None:
                part += (f" (against float64 JAX: TFLite {s.tflite_fp64_error:.3g}, JAX fp32 itself "
                         f"{s.jax_fp32_error:.3g})")
            parts.append(part)
        return (f"verified {len(self.outputs)} output(s) on {self.num_inputs} input(s) against JAX"
                + (f" ({'; '.join(need)})" if need else "") + ": " + "; ".join(parts))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _stats(ref: np.ndarray, out: np.ndarray, tolerance) -> OutputStats:
    diff = np.abs(ref - out)
    noise = float(np.sum((ref - out) ** 2))
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(max(np.sum(ref ** 2), 1e-300) / noise))
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    tol = None if tolerance is None else tolerance[0] + tolerance[1] * scale
    return OutputStats(tuple(ref.shape), float(diff.max()) if diff.size else 0.0,
                       float(diff.mean()) if diff.size else 0.0, scale, sqnr, tol)


@dataclass(frozen=True)
class PerOutputCheck:
    """Every output on its own: fp32 within `atol + rtol * max|output|` (the classification tolerance, with the same
    float64 fallback); quantized files reported by SQNR, and held to `min_sqnr_db` when given."""

    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    min_sqnr_db: float | None = None
    name: str = "per-output"

    def compare(self, reference, output, quantization: str) -> OutputsReport:
        _same_names(reference, output)
        stats, n = {}, 0
        for k in reference:
            ref, out = np.asarray(reference[k], np.float64), np.asarray(output[k], np.float64)
            if ref.shape != out.shape:
                raise ExportParityError(f"exported model's output {k!r} has shape {out.shape}, JAX {ref.shape}")
            if not np.all(np.isfinite(out)):
                raise ExportParityError(f"exported model's output {k!r} has {int((~np.isfinite(out)).sum())} "
                                        "non-finite values")
            n = len(ref) if ref.ndim else 1
            stats[k] = _stats(ref, out, (self.atol, self.rtol) if quantization == "fp32" else None)
        return OutputsReport(quantization, n, stats, self.atol if quantization == "fp32" else None, self.rtol,
                             None if quantization == "fp32" else self.min_sqnr_db, self.name)

    def with_float64(self, report: OutputsReport, reference, reference64, output) -> OutputsReport:
        stats = {k: _with_float64(s, k, reference, reference64, output) for k, s in report.outputs.items()}
        return dataclasses.replace(report, outputs=stats)


def _with_float64(stats: OutputStats, key: str, reference, reference64, output) -> OutputStats:
    def err(a, b):
        return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())

    return dataclasses.replace(stats, jax_fp32_error=err(reference[key], reference64[key]),
                               tflite_fp64_error=err(output[key], reference64[key]))


@dataclass(frozen=True)
class SegmentationReport:
    """`SegmentationCheck`'s report: how the file's per-pixel labelling matches JAX's, and the logits' numbers."""

    quantization: str
    num_inputs: int
    output: str
    pixel_agreement: float  # fraction of pixels whose argmax class is the same
    miou: float  # mean over classes either model predicts of the IoU of their pixel sets (1.0: the same labelling)
    logits: OutputStats
    min_pixel_agreement: float | None
    min_miou: float | None
    check: str = "segmentation"

    @property
    def sqnr_db(self) -> float:
        return self.logits.sqnr_db

    @property
    def top1_agreement(self) -> float:
        """The pixel agreement, under the name the int8 sensitivity ranking and `export.mixed` read."""
        return self.pixel_agreement

    @property
    def passed(self) -> bool:
        return (self.logits.within_tolerance
                and (self.min_pixel_agreement is None or self.pixel_agreement >= self.min_pixel_agreement)
                and (self.min_miou is None or self.miou >= self.min_miou))

    def summary(self) -> str:
        need = [f"{k} >= {v:g}" for k, v in (("pixel agreement", self.min_pixel_agreement),
                                             ("mIoU", self.min_miou)) if v is not None]
        s = self.logits
        return (f"verified {self.output} on {self.num_inputs} input(s) against JAX: pixel agreement "
                f"{self.pixel_agreement:.2%}, mIoU {self.miou:.3f}" + (f" (required {', '.join(need)})" if need else "")
                + f"; max |diff| {s.max_abs_diff:.3g}" + (f" (tolerance {s.tolerance:.3g})" if s.tolerance is not None else "")
                + f", SQNR {s.sqnr_db:.1f} dB")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def mean_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Mean IoU of two integer labellings of the same pixels, over the classes that either uses."""
    classes = np.union1d(np.unique(a), np.unique(b))
    ious = [np.sum((a == c) & (b == c)) / np.sum((a == c) | (b == c)) for c in classes]
    return float(np.mean(ious)) if ious else 1.0


@dataclass(frozen=True)
class SegmentationCheck:
    """Per-pixel logits (classes on the last axis): the file's labelling (argmax) against JAX's by pixel agreement and
    mean IoU, held to `min_pixel_agreement` / `min_miou` when given; fp32 logits also within `atol + rtol * max|logit|`.
    `output` names the logits among several outputs."""

    min_pixel_agreement: float | None = None
    min_miou: float | None = None
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    output: str | None = None
    name: str = "segmentation"

    def compare(self, reference, output, quantization: str) -> SegmentationReport:
        _same_names(reference, output)
        key = self.output if self.output is not None else next(iter(reference))
        if key not in reference or (self.output is None and len(reference) != 1):
            raise ValueError(f"a segmentation check compares one per-pixel logits output; the outputs are "
                             f"{list(reference)}: name it with SegmentationCheck(output=...)")
        ref, out = np.asarray(reference[key], np.float64), np.asarray(output[key], np.float64)
        if ref.shape != out.shape or ref.ndim < 3:
            raise ExportParityError(f"output {key!r}: exported shape {out.shape}, JAX {ref.shape}; a segmentation "
                                    "check needs (N, ..., classes) logits of one shape")
        if not np.all(np.isfinite(out)):
            raise ExportParityError(f"output {key!r} has {int((~np.isfinite(out)).sum())} non-finite values")
        a, b = ref.argmax(-1), out.argmax(-1)
        stats = _stats(ref, out, (self.atol, self.rtol) if quantization == "fp32" else None)
        return SegmentationReport(quantization, len(ref), key, float(np.mean(a == b)), mean_iou(a, b), stats,
                                  self.min_pixel_agreement, self.min_miou, self.name)

    def with_float64(self, report: SegmentationReport, reference, reference64, output) -> SegmentationReport:
        return dataclasses.replace(report, logits=_with_float64(report.logits, report.output, reference, reference64,
                                                                output))


DETECTION_SCORE_THRESHOLD = 0.3  # JAX detections compared: those a viewer would draw, not the 0.001-score tail


@dataclass(frozen=True)
class DetectionReport:
    """`DetectionCheck`'s report: JAX's detections scoring >= `score_threshold` matched one to one to the file's (same
    class, IoU >= `min_iou`), and how far the matched boxes and scores moved."""

    quantization: str
    num_inputs: int
    score_threshold: float
    min_iou: float
    reference_detections: int  # JAX's detections at or above the threshold, all images
    matched: int
    mean_iou: float  # over the matched pairs (1.0 when none)
    max_score_diff: float  # |file - JAX| score over the matched pairs
    mean_score_diff: float
    extra: int  # the file's detections at or above the threshold that match none of JAX's
    min_matched: float | None  # matched fraction required (fp32: all)
    max_fp32_score_diff: float | None
    check: str = "detection"

    @property
    def matched_fraction(self) -> float:
        return self.matched / self.reference_detections if self.reference_detections else 1.0

    @property
    def top1_agreement(self) -> float:
        """The matched fraction, under the name the int8 sensitivity ranking and `export.mixed` read."""
        return self.matched_fraction

    @property
    def passed(self) -> bool:
        return ((self.min_matched is None or self.matched_fraction >= self.min_matched)
                and (self.max_fp32_score_diff is None or self.max_score_diff <= self.max_fp32_score_diff))

    def summary(self) -> str:
        need = [f"matched >= {self.min_matched:.0%}"] if self.min_matched is not None else []
        if self.max_fp32_score_diff is not None:
            need.append(f"score diff <= {self.max_fp32_score_diff:g}")
        return (f"verified detections on {self.num_inputs} input(s) against JAX: {self.matched}/"
                f"{self.reference_detections} of JAX's detections with score >= {self.score_threshold:g} matched "
                f"(same class, IoU >= {self.min_iou:g}; {self.matched_fraction:.1%})"
                + (f" (required {', '.join(need)})" if need else "")
                + f", mean IoU {self.mean_iou:.4f}, score diff max {self.max_score_diff:.3g} mean "
                f"{self.mean_score_diff:.3g}, {self.extra} unmatched file detection(s)")

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "matched_fraction": self.matched_fraction}


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt, rb = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), -1)
    area = lambda b: np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), -1)  # noqa: E731
    union = area(box) + area(boxes) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def match_detections(reference: Mapping[str, np.ndarray], output: Mapping[str, np.ndarray], score_threshold: float,
                     min_iou: float) -> tuple[list[tuple[float, float, float]], int, int]:
    """Detections (`boxes` (N, D, 4), `classes`, `scores`, `valid` (N, D)) matched per image, JAX's by decreasing
    score, each to the unmatched file detection of its class with the largest IoU (any file score: one just under
    the threshold still matches). Returns the matched pairs' (IoU, JAX score, file score), the number of JAX
    detections compared and the file's unmatched detections at or above the threshold."""
    pairs, total, extra = [], 0, 0
    for i in range(len(reference["scores"])):
        rv = np.asarray(reference["valid"][i]).astype(bool) & (np.asarray(reference["scores"][i]) >= score_threshold)
        ov = np.asarray(output["valid"][i]).astype(bool)
        free = ov.copy()
        for r in np.flatnonzero(rv)[np.argsort(-np.asarray(reference["scores"][i])[rv], kind="stable")]:
            total += 1
            same = free & (np.asarray(output["classes"][i]) == reference["classes"][i][r])
            if not same.any():
                continue
            ious = np.where(same, _iou(np.asarray(reference["boxes"][i][r], np.float64),
                                       np.asarray(output["boxes"][i], np.float64)), -1.0)
            j = int(ious.argmax())
            if ious[j] >= min_iou:
                free[j] = False
                pairs.append((float(ious[j]), float(reference["scores"][i][r]), float(output["scores"][i][j])))
        extra += int(np.sum(free & (np.asarray(output["scores"][i]) >= score_threshold)))
    return pairs, total, extra


@dataclass(frozen=True)
class DetectionCheck:
    """A detection file's outputs (`boxes`, `classes`, `scores`, `valid`; `export.detection`) against JAX's:
    every JAX detection scoring >= `score_threshold` matched one to one (`match_detections`) by class and IoU >=
    `min_iou` (fp32) or `quantized_min_iou`. fp32 must match all of them with scores within `fp32_score_atol`;
    quantized files report the numbers and are held to `min_matched` (a fraction) when given."""

    score_threshold: float = DETECTION_SCORE_THRESHOLD
    min_iou: float = 0.9
    quantized_min_iou: float = 0.5
    min_matched: float | None = None
    fp32_score_atol: float = 1e-3
    name: str = "detection"

    def compare(self, reference, output, quantization: str) -> DetectionReport:
        _same_names(reference, output)
        missing = sorted({"boxes", "classes", "scores", "valid"} - set(reference))
        if missing:
            raise ValueError(f"a detection check compares boxes, classes, scores and valid; the outputs are "
                             f"{list(reference)}")
        for k in reference:
            if np.shape(reference[k]) != np.shape(output[k]):
                raise ExportParityError(f"output {k!r}: exported shape {np.shape(output[k])}, JAX "
                                        f"{np.shape(reference[k])}")
        if not np.all(np.isfinite(output["boxes"])) or not np.all(np.isfinite(output["scores"])):
            raise ExportParityError("the exported model's boxes or scores have non-finite values")
        fp32 = quantization == "fp32"
        iou = self.min_iou if fp32 else self.quantized_min_iou
        pairs, total, extra = match_detections(reference, output, self.score_threshold, iou)
        p = np.asarray(pairs, np.float64).reshape(-1, 3)
        diff = np.abs(p[:, 2] - p[:, 1])
        return DetectionReport(quantization, len(reference["scores"]), self.score_threshold, iou, total, len(p),
                               float(p[:, 0].mean()) if len(p) else 1.0, float(diff.max()) if len(p) else 0.0,
                               float(diff.mean()) if len(p) else 0.0, extra, 1.0 if fp32 else self.min_matched,
                               self.fp32_score_atol if fp32 else None)
