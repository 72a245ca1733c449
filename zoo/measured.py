"""Measured LiteRT latency shipped with the package (`zoo/data/tflite_latency.csv`), as `model_info` reports it.

The table is written by `python bench/export_latency.py ... --publish`: per model, the median batch-1 latency of its
fp32 and full-int8 TFLite files (LiteRT with XNNPACK, at the stated thread count, default resolution; random weights
with BatchNorm statistics measured on photos: latency does not depend on the weights' values), the int8 file's XNNPACK
partitions, the CPU and the date. Figures from one CPU; another CPU gives other times, and mostly the same ratios.
"""

from __future__ import annotations

import csv
import functools
from importlib import resources

FIELDS = ("model", "res", "threads", "fp32_ms", "int8_ms", "int8_partitions", "cpu", "date")
TABLE = "data/tflite_latency.csv"


@functools.cache
def _table() -> dict[str, dict]:
    path = resources.files("zoo") / TABLE
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        return {row["model"]: row for row in csv.DictReader(f)}


def tflite_latency(name: str) -> dict | None:
    """{"fp32_ms", "int8_ms", "threads", "res", "int8_partitions", "cpu", "date"} of `name`, or None if not measured."""
    row = _table().get(name)
    if row is None:
        return None
    return {
        "fp32_ms": float(row["fp32_ms"]), "int8_ms": float(row["int8_ms"]) if row["int8_ms"] else None,
        "threads": int(row["threads"]), "res": int(row["res"]),
        "int8_partitions": int(row["int8_partitions"]) if row["int8_partitions"] else None,
        "cpu": row["cpu"], "date": row["date"],
    }
