"""Runs that need their own process: 8 simulated devices against 1, and SIGKILL at any moment then resume.

Each run trains the tiny model of test_train_support.py for 30 steps (checkpoint every 5, async saves, EMA, dropout,
BatchNorm) and dumps its final TrainState; the comparisons are on every leaf of that state.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_train_support import subprocess_env

SCRIPT = str(Path(__file__).with_name("test_train_support.py"))
STEPS, EVERY = 30, 5


def _cmd(workdir, *extra):
    return [sys.executable, SCRIPT, str(workdir), str(STEPS), "--checkpoint-every", str(EVERY), *extra]


def _run(workdir, dump, devices=1):
    out = subprocess.run(_cmd(workdir, "--dump", str(dump)), env=subprocess_env(devices), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"DEVICES {devices} STEP {STEPS}" in out.stdout
    return dict(np.load(dump))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    d = tmp_path_factory.mktemp("one_device")
    return _run(d / "run", d / "state.npz")


def _last_step(metrics: Path) -> int:
    try:
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0
    return lines[-1]["step"] if lines else 0


def test_eight_devices_equal_one(baseline, tmp_path):
    eight = _run(tmp_path / "run", tmp_path / "state.npz", devices=8)
    assert eight.keys() == baseline.keys()
    for k in baseline:
        np.testing.assert_allclose(eight[k], baseline[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_sigkill_at_any_moment_then_resume_is_exact(baseline, tmp_path):
    workdir = tmp_path / "run"
    # SIGKILL right when a checkpoint is being written (step 10); SIGTERM (preemption: checkpoint, then exit);
    # SIGKILL between checkpoints
    for sig, target in ((signal.SIGKILL, 10), (signal.SIGTERM, 12), (signal.SIGKILL, 17)):
        proc = subprocess.Popen(_cmd(workdir, "--sleep", "0.15"), env=subprocess_env(1),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        while _last_step(workdir / "metrics.jsonl") < target:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:  # stops at the next step boundary with a checkpoint of that step
            assert proc.returncode == 0, err[-3000:]
            stopped = int(out.split("STEP ")[-1])
            assert target <= stopped < STEPS
            assert str(stopped) in {p.name for p in (workdir / "checkpoints").iterdir()}
    resumed = _run(workdir, tmp_path / "state.npz")
    assert resumed.keys() == baseline.keys()
    for k in baseline:
        np.testing.assert_array_equal(resumed[k], baseline[k], err_msg=k)
    steps = [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, STEPS + 1))  # the log holds each step once, whatever was redone
