"""On-CPU latency of exported models (LiteRT interpreter + XNNPACK) and of the JAX model they came from.

Measurement: one interpreter per (model, thread count), all created up front; after `warmup` calls each, timed rounds
call every interpreter once in turn (so a noisy neighbour slows all configurations alike rather than one), and the
median over rounds is reported with min and p90. Rounds stop at `runs`, or at `budget_s` seconds (at least 5 rounds).
Warm-up is excluded. Each result also records how many CPUs other processes used while it was timed (`others_cpu`,
from /proc/stat), because on a shared 2-core machine that is the main source of error.

JAX: `jax.jit(module.apply)` at batch `batch`, compiled first (compile time reported separately), `block_until_ready`
per call. XLA:CPU sizes its thread pool from the CPUs the process may use and has no per-call thread setting, so the
JAX row's `threads` is that CPU count; pin the process (`taskset`, `os.sched_setaffinity` before importing jax) to
measure fewer.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export import tables


@dataclass(frozen=True)
class Latency:
    model: str
    runtime: str  # "tflite" or "jax"
    quantization: str
    threads: int
    batch: int
    median_ms: float
    min_ms: float
    p90_ms: float
    runs: int
    warmup: int
    partitions: int | None = None  # XNNPACK delegate partitions (tflite)
    not_delegated: str = ""  # ops left on builtin kernels, "OP xN; ..."
    size_mb: float | None = None
    compile_s: float | None = None  # jax
    others_cpu: float | None = None


class OtherLoad:
    """CPUs used by other processes since `start()`: busy time in /proc/stat minus this process's CPU time."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start()

    def _sample(self):
        try:
            with open("/proc/stat") as f:
                v = [int(t) for t in f.readline().split()[1:]]
            busy = (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / self.tick
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    def start(self) -> None:
        self._t0 = self._sample()

    def cpus(self) -> float | None:
        t1 = self._sample()
        wall = t1[0] - self._t0[0]
        val = ((t1[1] - self._t0[1]) - (t1[2] - self._t0[2])) / wall if wall > 0 else 0.0
        return None if val != val else round(max(0.0, val), 2)

    def wait_quiet(self, max_wait: float, threshold: float = 0.2, window: float = 1.0) -> float | None:
        """Sleep in `window` steps until others used < `threshold` CPUs over one window, or `max_wait` passed;
        returns the last window's load (None where /proc/stat cannot be read)."""
        t_end = time.perf_counter() + max_wait
        while True:
            self.start()
            time.sleep(window)
            load = self.cpus()
            if load is None or load < threshold or time.perf_counter() >= t_end:
                return load


def cpu_name() -> str:
    """The CPU's model name (Linux `/proc/cpuinfo`), else what `platform` knows: latency figures name their CPU."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _stats(times: list[float]) -> tuple[float, float, float]:
    ms = sorted(t * 1e3 for t in times)
    return statistics.median(ms), ms[0], ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]


def timed_rounds(calls: dict, runs: int, budget_s: float | None, min_rounds: int = 5) -> dict[str, list[float]]:
    """Seconds per call of each `calls[k]()`, called in turn once per round (so drift in the machine's load hits all
    alike). Stops after `runs` rounds, or once `budget_s` has passed and at least `min_rounds` rounds are done."""
    times = {k: [] for k in calls}
    t_begin = time.perf_counter()
    for r in range(max(1, runs)):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        if budget_s is not None and r + 1 >= min_rounds and time.perf_counter() - t_begin > budget_s:
            break
    return times


def benchmark_many(models: dict[str, str | os.PathLike | bytes], threads=(1, 2, 4), runs: int = 50, warmup: int = 5,
                   budget_s: float | None = None, xnnpack: bool = True, x: np.ndarray | None = None) -> list[Latency]:
    """Latency of several .tflite models (label -> path or bytes) at each thread count, in interleaved rounds.

    x: one model-sized float batch every model runs on (quantized for int8 inputs); default random values. A
    classifier's time does not depend on them; a detector's NMS does (it visits the candidates above its score
    threshold), so time a detector on a real image."""
    from export.metadata import read
    from export.ops_report import analyze
    from export.runtime import LiteRTRunner

    runners, calls, info = {}, {}, {}
    for label, model in models.items():
        content = model if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
        q = "?"
        if not isinstance(model, (bytes, bytearray)):
            try:
                q = read(model, check_hash=False)["quantization"]
            except (FileNotFoundError, ValueError, KeyError):
                q = _guess_quantization(analyze(content))
        else:
            q = _guess_quantization(analyze(content))
        for t in threads:
            r = LiteRTRunner(content, num_threads=int(t), xnnpack=xnnpack)
            if x is not None:
                if tuple(np.shape(x)) != r.input_shape:
                    raise ValueError(f"the input x has shape {tuple(np.shape(x))}; {label} takes {r.input_shape}")
                feed = r.quantize_input(np.asarray(x, np.float32))
            elif np.issubdtype(r.input["dtype"], np.integer):
                feed = np.random.default_rng(0).integers(-100, 100, r.input_shape).astype(r.input["dtype"])
            else:
                feed = np.random.default_rng(0).standard_normal(r.input_shape).astype(r.input["dtype"])
            runners[(label, int(t))] = r
            calls[(label, int(t))] = r.prepared_call(feed)
            info[(label, int(t))] = (q, len(content), r.delegate_report() if xnnpack else None)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    load = OtherLoad()
    times = timed_rounds(calls, runs, budget_s)
    others = load.cpus()
    out = []
    for (label, t), ts in times.items():
        q, size, dr = info[(label, t)]
        med, mn, p90 = _stats(ts)
        nd = "; ".join(f"{k} x{v}" for k, v in sorted(dr.not_delegated.items(), key=lambda kv: -kv[1])) if dr else ""
        out.append(Latency(label, "tflite", q, t, runners[(label, t)].batch, round(med, 3), round(mn, 3),
                           round(p90, 3), len(ts), warmup, dr.partitions if dr else None, nd, round(size / 1e6, 2),
                           None, others))
    return out


def _guess_quantization(report) -> str:
    """For models without a sidecar: "int8" when activations are quantized, else "float" (fp32/fp16/dynamic)."""
    return "int8" if report.quantized_activations else "float"


def benchmark_tflite(model: str | os.PathLike | bytes, threads=(1, 2, 4), runs: int = 50, warmup: int = 5,
                     budget_s: float | None = None, xnnpack: bool = True) -> list[Latency]:
    """Latency of one .tflite (path or bytes) with the LiteRT interpreter (XNNPACK by default) per thread count."""
    label = Path(model).stem if not isinstance(model, (bytes, bytearray)) else "model"
    return benchmark_many({label: model}, threads, runs, warmup, budget_s, xnnpack)


def benchmark_jax(model_or_module, variables=None, *, input_hw: tuple[int, int] | None = None, batch: int = 1,
                  runs: int = 50, warmup: int = 3, budget_s: float | None = None, name: str | None = None) -> Latency:
    """Latency of the jitted JAX forward pass on this CPU (default depthwise formulation), compile excluded."""
    import jax

    import zoo

    if isinstance(model_or_module, str):
        model_or_module = zoo.load(model_or_module, pretrained=False)
    if isinstance(model_or_module, zoo.Model):
        module, variables, cfg = model_or_module.module, variables or model_or_module.variables, model_or_module.cfg
        name = name or model_or_module.name
        hw, chans = input_hw or cfg.input_size, cfg.in_chans
    else:
        if variables is None or input_hw is None:
            raise ValueError("a bare module needs variables and input_hw")
        module, hw, chans = model_or_module, input_hw, 3
        name = name or type(module).__name__
    x = jax.device_put(np.random.default_rng(0).standard_normal((batch, *hw, chans)).astype(np.float32))
    variables = jax.device_put(variables)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda v, x: module.apply(v, x, train=False)).lower(variables, x).compile()
    compile_s = time.perf_counter() - t0

    def call():
        compiled(variables, x).block_until_ready()

    for _ in range(warmup):
        call()
    load = OtherLoad()
    ts = timed_rounds({"jax": call}, runs, budget_s)["jax"]
    med, mn, p90 = _stats(ts)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Latency(name, "jax", "fp32", threads, batch, round(med, 3), round(mn, 3), round(p90, 3), len(ts), warmup,
                   compile_s=round(compile_s, 2), others_cpu=load.cpus())


def write_csv(rows: list[Latency], path: str | os.PathLike) -> Path:
    return tables.write_csv(rows, path, Latency)


def markdown(rows: list[Latency]) -> str:
    head = ["model", "runtime", "quantization", "threads", "batch", "median ms", "min ms", "p90 ms", "runs",
            "XNNPACK partitions", "not delegated", "size MB", "others' CPUs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.model, r.runtime, r.quantization, r.threads, r.batch, r.median_ms, r.min_ms, r.p90_ms, r.runs,
                 "-" if r.partitions is None else r.partitions, r.not_delegated or "-",
                 "-" if r.size_mb is None else r.size_mb, "-" if r.others_cpu is None else r.others_cpu]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
