"""Shared fixtures, and the guard that makes CI fail when a test tier was silently skipped.

With ZOO_REQUIRE_ALL_TIERS=1 (set by .ci/run) any skipped test fails the run, and so does a tier marker
(parity, slow, notebooks) under which no test ran.
"""

from __future__ import annotations

import os

# The reference implementations load before anything imports TensorFlow (the export tests): importing torchvision
# after tensorflow segfaults in triton's extension (torch 2.14.1 + tensorflow 2.21 in one process).
import timm  # noqa: F401
import torch  # noqa: F401
import torchvision  # noqa: F401

import numpy as np
import pytest

TIERS = ("parity", "slow", "notebooks")
_ran: dict[str, int] = {t: 0 for t in TIERS}
_skipped: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _skipped.append(report.nodeid)
    elif report.when == "call":
        for tier in TIERS:
            if tier in report.keywords:
                _ran[tier] += 1


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("ZOO_REQUIRE_ALL_TIERS") != "1" or session.config.option.collectonly:
        return
    problems = [f"skipped: {nodeid}" for nodeid in _skipped]
    problems += [f"tier '{t}' ran no test" for t, n in _ran.items() if n == 0]
    if problems:
        print("\nZOO_REQUIRE_ALL_TIERS: every tier must run and nothing may be skipped:\n  " + "\n  ".join(problems))
        session.exitstatus = 1


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch):
    """An empty weights cache and offline mode: what a user without network sees."""
    monkeypatch.setenv("ZOO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {name: getattr(data, name)() for name in ("chelsea", "coffee", "astronaut", "rocket")}
