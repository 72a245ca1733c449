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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from export.errors import ExportParityError

DECISIVE_MARGIN = 1.0  # JAX top-1 minus top-2 logit from which an input counts as decisively classified
# An fp32 export whose difference from JAX exceeds the tolerance still passes when, against a float64 run of the same
# JAX model, it is no further off than JAX's own fp32 result times this factor: a model with tiny BatchNorm variances
# (dead channels after fine-tuning) amplifies float rounding beyond any fixed bound, JAX's own included.
FLOAT64_FACTOR = 1.5


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


def check(report: VerifyReport) -> VerifyReport:
    """Raise ExportParityError, naming the numbers, unless the report passes its tolerance and threshold."""
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
