"""Activation ranges for post-training int8: histograms of observed values and the clipping range chosen from them.

Three methods, all per tensor:
- "minmax": the observed minimum and maximum (what the TFLite converter calibrates). One outlier stretches the int8
  step for every other value. The converter's calibrator (TF 2.21) also records, for a tensor that an ADD overwrites
  in place, the sum's range: in MobileNetV2 (random weights, 128x128) a block's projection output (before the
  residual add) gets the residual stream's range, -8.7..9.6, where the tensor itself spans -4.9..5.0 (measured
  against the JAX model's intermediates). The other methods start from those ranges and never widen them.
- "percentile": each tail clipped at a percentile of the observed values (99.99 by default: 1 in 10,000 values
  saturates). A tail that does not cross zero stays at zero (ReLU outputs keep min 0).
- "mse": the range [a, b] that minimizes the expected int8 quantize-dequantize error of the observed values,
  clipping error `(x - clip(x, a, b))^2` plus uniform rounding noise `step^2 / 12` with `step = (b - a) / 255`,
  searched over a grid of shrunk lower and upper bounds on the histogram (as in TensorRT's and NNCF's MSE
  calibrators, here with both tails free because activations are quantized asymmetrically).

    hist = Histogram(-3.0, 40.0)
    hist.add(activations)
    lo, hi = choose_range(hist, "mse")

`export.ptq_tflite.range_hook(method)` plugs a method into `export.to_tflite(calibration=...)`.
"""

from __future__ import annotations

import numpy as np

METHODS = ("minmax", "percentile", "mse")
DEFAULT_BINS = 2048
DEFAULT_PERCENTILE = 99.99
LEVELS = 255  # int8 steps between the range's ends


def check_method(method) -> str:
    """The method name, lower-cased; ValueError listing the methods otherwise."""
    key = method.lower() if isinstance(method, str) else method
    if key not in METHODS:
        raise ValueError(f"unknown range method {method!r}; choose one of {', '.join(METHODS)}")
    return key


class Histogram:
    """Counts of values in `bins` equal bins over [lo, hi]; values outside land in the end bins (and move `min` /
    `max`), so a first guess of the range (the converter's calibrated min/max) suffices and memory stays fixed."""

    def __init__(self, lo: float, hi: float, bins: int = DEFAULT_BINS):
        lo, hi = float(lo), float(hi)
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
            raise ValueError(f"histogram range must be finite with lo <= hi, got [{lo}, {hi}]")
        if hi == lo:  # a constant tensor: any positive width keeps the arithmetic finite
            hi = lo + max(abs(lo), 1.0) * 1e-6
        self.lo, self.hi, self.bins = lo, hi, int(bins)
        self.counts = np.zeros(self.bins, np.int64)
        self.min, self.max = np.inf, -np.inf

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def centers(self) -> np.ndarray:
        e = self.edges
        return (e[:-1] + e[1:]) / 2

    def add(self, values) -> None:
        v = np.asarray(values).reshape(-1)
        if v.size == 0:
            return
        lo, hi = v.min(), v.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            v = v[np.isfinite(v)]  # an inf/nan (e.g. exp overflow on an outlier) has no place on a quantization grid
            if v.size == 0:
                return
            lo, hi = v.min(), v.max()
        self.min, self.max = min(self.min, float(lo)), max(self.max, float(hi))
        # bin positions in float64 (one pass, in place: calibration histograms every activation of every image);
        # clipped in float first: far outside a narrow first-guess range the bin index would overflow int64
        pos = np.subtract(v, self.lo, dtype=np.float64)
        pos *= self.bins / (self.hi - self.lo)
        np.clip(pos, 0, self.bins - 1, out=pos)
        self.counts += np.bincount(pos.astype(np.int64), minlength=self.bins)


def _observed(hist: Histogram) -> tuple[float, float]:
    if hist.total == 0:
        raise ValueError("the histogram is empty: no values were observed for this tensor")
    return hist.min, hist.max


def minmax_range(hist: Histogram) -> tuple[float, float]:
    return _observed(hist)


def percentile_range(hist: Histogram, percentile: float = DEFAULT_PERCENTILE) -> tuple[float, float]:
    """Clip each tail at `percentile` (e.g. 99.99: the lowest and highest 0.01% of values saturate); a side that does
    not cross zero keeps its observed end, so ReLU outputs keep min 0 (int8 ranges always contain zero)."""
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    mn, mx = _observed(hist)
    cdf = np.cumsum(hist.counts) / hist.total
    edges = hist.edges
    tail = 1.0 - percentile / 100.0
    # the ends of the bins holding the cut points: conservative by up to one bin
    lo = float(edges[np.searchsorted(cdf, tail, side="right")]) if mn < 0 else mn
    hi = float(edges[np.searchsorted(cdf, 1.0 - tail, side="left") + 1]) if mx > 0 else mx
    return max(mn, min(lo, 0.0)), min(mx, max(hi, 0.0))


def quantization_mse(hist: Histogram, lo, hi) -> np.ndarray:
    """Expected squared int8 error per observed value for ranges [lo, hi] (arrays broadcast): clipping error of the
    values outside plus rounding noise step^2/12 for those inside, over the histogram's bin centers."""
    c, n = hist.centers, hist.counts.astype(np.float64)
    lo, hi = np.asarray(lo, np.float64)[..., None], np.asarray(hi, np.float64)[..., None]
    step = (hi - lo) / LEVELS
    below, above = np.minimum(c - lo, 0.0), np.maximum(c - hi, 0.0)
    inside = (c >= lo) & (c <= hi)
    err = below ** 2 + above ** 2 + inside * (step ** 2 / 12)
    return (err * n).sum(-1) / max(n.sum(), 1.0)


def mse_range(hist: Histogram, candidates: int = 64) -> tuple[float, float]:
    """The [lo, hi] among `candidates` shrinks of each observed end (geometric, from the full end down to 1% of it;
    a side that does not cross zero stays put) with the least expected int8 error."""
    mn, mx = _observed(hist)
    shrink = np.concatenate([[1.0], np.geomspace(1.0, 0.01, candidates)[1:]])
    los = mn * shrink if mn < 0 else np.array([mn])
    his = mx * shrink if mx > 0 else np.array([mx])
    grid_lo, grid_hi = np.meshgrid(los, his, indexing="ij")
    err = np.stack([quantization_mse(hist, grid_lo[i], grid_hi[i]) for i in range(len(los))])
    i, j = np.unravel_index(int(np.argmin(err)), err.shape)
    return float(grid_lo[i, j]), float(grid_hi[i, j])


def choose_range(hist: Histogram, method: str, *, percentile: float = DEFAULT_PERCENTILE,
                 candidates: int = 64) -> tuple[float, float]:
    """(min, max) for `method` ("minmax", "percentile", "mse") from a tensor's histogram."""
    method = check_method(method)
    if method == "percentile":
        return percentile_range(hist, percentile)
    if method == "mse":
        return mse_range(hist, candidates)
    return minmax_range(hist)


def sqnr_db(values: np.ndarray, lo: float, hi: float) -> float:
    """Signal-to-quantization-noise ratio (dB) of `values` quantized to int8 over [lo, hi], as TFLite does it
    (scale (hi - lo) / 255, integer zero point, saturation at the ends)."""
    x = np.asarray(values, np.float64)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / LEVELS if hi > lo else 1.0
    zero = np.round(-128 - lo / scale)
    q = np.clip(np.round(x / scale + zero), -128, 127)
    noise = np.sum((x - (q - zero) * scale) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(x ** 2) / noise))

