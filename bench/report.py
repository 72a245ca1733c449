"""What the benchmark scripts record beside their figures: the machine, the framework versions, a steady training
rate, and progress lines on stderr. Imported by the scripts as `report` (they run as `python bench/NAME.py`, which
puts this folder on the path)."""

from __future__ import annotations

import os
import platform
import sys

FRAMEWORKS = ("jax", "flax", "torch", "torchvision", "tensorflow", "ai-edge-litert")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine() -> str:
    from export.latency import cpu_name

    return f"{cpu_name()}, {len(os.sched_getaffinity(0))} CPUs usable, Python {platform.python_version()}"


def versions(packages=FRAMEWORKS) -> str:
    """The installed versions of `packages`, the ones the figures depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in packages:
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


def steady_rate(history) -> float | None:
    """Training images/s of the last logged window (past compilation), from the run's metrics records."""
    rates = [r.get("images_per_sec") for r in history if r.get("images_per_sec")]
    return round(float(rates[-1]), 1) if rates else None


def pyplot():
    """matplotlib's pyplot drawing to files (the Agg backend: no display needed), or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
