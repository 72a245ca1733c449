"""What a run reports: JSON lines, TensorBoard scalars, a progress bar with throughput and ETA, and a PNG of the curves.

The TensorBoard writer produces standard event files (TFRecord framing, `Event`/`Summary` protocol buffers with
scalar `simple_value`s) directly, so writing summaries needs neither TensorFlow nor the tensorboard package; only
viewing them does.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping

# ---- JSON lines --------------------------------------------------------------------------------------------------


class MetricsLog:
    """`workdir/metrics.jsonl`: one JSON object per line, {"step": int, "split": "train"|"eval", ...metrics}."""

    def __init__(self, path: str | Path, *, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # a killed run may have logged past its last checkpoint: those steps will run again
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, step: int, split: str, metrics: Mapping[str, float]) -> dict:
        record = {"step": int(step), "split": split, **{k: _num(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
    return out


def _num(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)


# ---- TensorBoard event files -------------------------------------------------------------------------------------

def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
    msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        msg += _field_bytes(3, file_version.encode())
    if scalars:
        summary = b"".join(
            _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", float(value)))
            for tag, value in scalars.items())
        msg += _field_bytes(5, summary)
    return msg


class TensorBoardWriter:
    """Scalars to `logdir/events.out.tfevents.*`, readable by TensorBoard (`tensorboard --logdir workdir/tb`)."""

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{time.monotonic_ns() % 10**6}"
        self._f = (self.logdir / name).open("ab")
        self._record(_event(time.time(), 0, file_version="brain.Event:2"))

    def _record(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if finite:
            self._record(_event(time.time(), int(step), scalars=finite))
            self._f.flush()

    def close(self) -> None:
        self._f.close()


# ---- progress ----------------------------------------------------------------------------------------------------

class Progress:
    """A tqdm bar over steps with images/s and ETA; plain log lines when disabled or not a terminal."""

    def __init__(self, total: int, initial: int, batch_size: int, enabled: bool = True, desc: str = "train"):
        self.batch_size, self.enabled = batch_size, enabled
        self.bar = None
        if enabled:
            import warnings

            with warnings.catch_warnings():  # tqdm.auto warns when a notebook lacks ipywidgets, then prints text
                warnings.simplefilter("ignore")
                from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                            file=sys.stderr, smoothing=0.1)
        self._t, self._step = time.perf_counter(), initial

    def update(self, step: int, metrics: Mapping[str, float] | None = None) -> float:
        """Advance to `step`; returns images/s since the previous update."""
        now = time.perf_counter()
        rate = (step - self._step) * self.batch_size / max(now - self._t, 1e-9)
        self._t, self._step = now, step
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if metrics:
                shown = {k: f"{v:.4g}" for k, v in metrics.items() if k in ("loss", "accuracy", "lr")}
                self.bar.set_postfix({**shown, "img/s": f"{rate:.1f}"}, refresh=False)
        return rate

    def pause_end(self) -> None:
        """Restart the throughput clock (after an evaluation, so it does not count as training time)."""
        self._t = time.perf_counter()

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- curves ------------------------------------------------------------------------------------------------------

def plot_curves(records: Iterable[dict], path: str | Path, title: str = "") -> Path | None:
    """Loss, accuracy and learning rate against the step (train and eval) as a PNG; None without matplotlib."""
    try:  # the object-oriented API leaves pyplot's backend alone (a notebook keeps its inline figures)
        from matplotlib.figure import Figure
    except ImportError:
        return None
    records = list(records)
    train = [r for r in records if r.get("split") == "train"]
    evals = [r for r in records if r.get("split") == "eval"]
    panels = [("loss", "loss"), ("accuracy", "accuracy"), ("lr", "learning rate")]
    panels = [(k, label) for k, label in panels if any(isinstance(r.get(k), float) for r in train + evals)]
    fig = Figure(figsize=(4.2 * max(len(panels), 1), 3.2))
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for rows, name, style in ((train, "train", "-"), (evals, "eval", "o-")):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), float)]
            if pts:
                ax.plot(*zip(*pts), style, label=name, markersize=3)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if key != "lr":
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
