"""Inference throughput of zoo models against their PyTorch twins, side by side, on the CPU at a fixed thread count.

    python bench/inference.py --quick                    # 4 models, batch 1 and 32, 2 threads (~3 min)
    python bench/inference.py                            # every model with a twin (~15 min on 2 idle cores;
                                                         # 33 min at --threads 1 while others used 1.5 CPUs)
    python bench/inference.py --models 'mobilenetv3*' --batches 1 --depthwise native,auto

For each model and batch size it measures images/second of
- the zoo model: `jax.jit(lambda v, x: module.apply(v, x, train=False))` on NHWC float32 at `cfg.input_size`, compiled
  once per depthwise formulation given by `--depthwise` (`zoo.layers.conv.depthwise_impl`, read at trace time, so the
  function is lowered and compiled inside the context); the compile time is reported separately;
- its twin (`cfg.twin`: `timm:<name>` or `torchvision:<name>`) in eval mode under `torch.inference_mode()`, NCHW, in
  contiguous and `channels_last` memory format: after a warm-up both are probed and the faster one is measured (the
  table says which).
Both get the same random input values. Weights are random with a fan-in He scale (BN: unit variance), which is all
timing needs; zoo variables are filled into the `jax.eval_shape` tree with numpy, because compiling a random init
costs 10+ s per model on XLA:CPU. Denormals are flushed in both frameworks (XLA:CPU does by default).

Measurement: after warm-up (compile excluded), the variants of one (model, batch) are timed in alternating rounds, one
call each per round, `block_until_ready` / synchronous torch; the median over rounds is reported. Rounds stop at
`--repeats`, or earlier once `--budget` seconds are spent (at least 3 rounds), so that big models at batch 32 do not
dominate the run. The machine is noisy: alternating rounds within one process keep the comparison fair.

Threads: XLA:CPU (jax 0.10.2) has no flag for its intra-op thread count (TF's `intra_op_parallelism_threads` is not
an XLA flag; `--xla_cpu_multi_thread_eigen` only switches Eigen's multi-threading, and
`--xla_force_host_platform_device_count` / `--xla_cpu_parallel_codegen_split_count` do not limit run-time threads).
Its thread pool is sized from the CPUs the process may run on (`sched_getaffinity`: pinned to one CPU the process
has one `tf_XLAEigen` thread, to two CPUs two). So `--threads N` pins the whole
process to N CPUs with `os.sched_setaffinity` before jax or torch is imported, which bounds both frameworks to the
same cores, and also calls `torch.set_num_threads(N)` (torch would otherwise size its pool from the machine).
`--xla-flags` appends XLA flags (set before jax is imported) for experiments, e.g. `--xla_cpu_use_onednn=true`.

Memory: at batch 32 both frameworks allocate hundreds of MB of activations per call; glibc serves blocks over 32 MB
with fresh mmaps (and trims the heap), so every call page-faults its activations in again: ~110k minor faults and
~200 ms of kernel time per MobileNetV2 call for the zoo, ~270k and ~450 ms for torch (1 thread). `--malloc retain`
re-executes the script under GLIBC_TUNABLES that keep freed memory (no faults after warm-up), which measures the
compute alone; `default` measures what a user gets.

Writes `bench/results/inference.csv` (one row per model, batch and depthwise formulation; appended as it goes) and
`bench/results/inference.md`, and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import math
import os
import statistics
import sys
import time
from pathlib import Path

QUICK = ("mobilenetv3_large_100", "mobilenetv2_100", "tf_efficientnet_lite0", "mobilevit_xxs")
# glibc keeps freed memory: no mmap for big blocks, no trimming, one arena (threads would otherwise mmap their own).
RETAIN_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295:glibc.malloc.arena_max=1"
RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("model", "batch", "threads", "depthwise", "zoo_img_s", "torch_img_s", "ratio_zoo_torch", "torch_layout",
          "jax_compile_s", "zoo_rounds", "torch_rounds", "others_cpu")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=None, help="comma-separated glob(s) over model names (default: every model "
                   "with a twin)")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--threads", type=int, default=2, help="CPUs (and threads) for both frameworks (default 2)")
    p.add_argument("--depthwise", default="auto", help="comma-separated zoo depthwise formulations among "
                   "native, shifted, auto (default auto)")
    p.add_argument("--repeats", type=int, default=15, help="maximum timed rounds per (model, batch) (default 15)")
    p.add_argument("--budget", type=float, default=6.0, help="seconds of timed rounds per (model, batch) after "
                   "which measuring stops (at least 3 rounds; default 6)")
    p.add_argument("--wait-quiet", type=float, default=5.0, help="before timing, wait up to this many seconds for "
                   "other processes to use < 0.2 CPUs (default 5; 0: don't wait)")
    p.add_argument("--max-others", type=float, default=0.3, help="re-measure when other processes used more than "
                   "this many CPUs during the timed rounds (default 0.3)")
    p.add_argument("--retries", type=int, default=2, help="re-measurements allowed per (model, batch) (default 2)")
    p.add_argument("--malloc", choices=("default", "retain"), default="default", help="'retain': re-run under "
                   f"GLIBC_TUNABLES={RETAIN_TUNABLES} so freed memory is reused, not returned to the kernel (no page "
                   "faults per call; see the module docstring)")
    p.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the zoo, e.g. '--xla_cpu_use_onednn=true'")
    p.add_argument("--no-torch", action="store_true", help="measure the zoo only")
    p.add_argument("--out", default=str(RESULTS / "inference"), help="output path without suffix (default "
                   "bench/results/inference)")
    return p.parse_args(argv)


def limit_threads(n: int) -> list[int]:
    """Pin this process (and the thread pools it will create) to `n` of the CPUs it may use; before jax/torch load."""
    allowed = sorted(os.sched_getaffinity(0))
    if n > len(allowed):
        print(f"warning: --threads {n} > {len(allowed)} available CPUs; using {len(allowed)}", file=sys.stderr)
    cpus = allowed[: max(1, n)]
    os.sched_setaffinity(0, cpus)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(len(cpus))
    return cpus


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.malloc == "retain" and os.environ.get("GLIBC_TUNABLES") != RETAIN_TUNABLES:
        os.environ["GLIBC_TUNABLES"] = RETAIN_TUNABLES  # read by glibc at process start only: re-execute
        os.execv(sys.executable, [sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)])
    cpus = limit_threads(args.threads)
    threads = len(cpus)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()

    import jax  # noqa: E402  (after the affinity and XLA_FLAGS are set)
    import numpy as np

    import zoo
    from zoo.layers.conv import depthwise_impl
    from zoo.registry import get_entry

    torch = None
    if not args.no_torch:
        import torch

        torch.set_num_threads(threads)
        torch.set_flush_denormal(True)

    batches = [int(b) for b in args.batches.split(",") if b]
    impls = [s.strip() for s in args.depthwise.split(",") if s.strip()]
    for impl in impls:
        if impl not in ("native", "shifted", "auto"):
            raise SystemExit(f"--depthwise: unknown formulation {impl!r}")
    names = select_models(zoo, get_entry, args)
    if not names:
        raise SystemExit("no model matches")
    log(f"{len(names)} models, batches {batches}, {threads} thread(s) on CPUs {cpus}, depthwise {impls}, "
        f"malloc {args.malloc}, jax {jax.__version__} ({jax.default_backend()}), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
        + (f", torch {torch.__version__}" if torch else ""))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = out.with_suffix(".csv")
    rows: list[dict] = []
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        t_start = time.perf_counter()
        for i, name in enumerate(names):
            cfg = get_entry(name).cfg
            log(f"[{i + 1}/{len(names)}] {name} ({cfg.twin}, {cfg.input_size[0]}x{cfg.input_size[1]}) "
                f"t={time.perf_counter() - t_start:.0f}s")
            try:
                new = bench_model(name, cfg, batches, impls, threads, args, jax, np, zoo, depthwise_impl, torch)
            except Exception as e:  # one broken model or twin must not lose the rest of the run
                log(f"  FAILED: {type(e).__name__}: {e}")
                continue
            for row in new:
                writer.writerow(row)
            f.flush()
            rows.extend(new)
    table = markdown(rows, impls, threads, args)
    out.with_suffix(".md").write_text(table)
    print(table)
    log(f"wrote {csv_path} and {out.with_suffix('.md')} in {time.perf_counter() - t_start:.0f}s")
    return 0


def select_models(zoo, get_entry, args) -> list[str]:
    names = [n for n in zoo.list_models(task="classification") if get_entry(n).cfg.twin]
    if args.quick:
        names = [n for n in QUICK if n in names]
    if args.models:
        pats = [p.strip() for p in args.models.split(",") if p.strip()]
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]
    return names


def make_twin(twin: str, torch):
    lib, _, arch = twin.partition(":")
    if lib == "timm":
        import timm

        model = timm.create_model(arch, pretrained=False, num_classes=1000)  # the zoo's ImageNet-1k head
    elif lib == "torchvision":
        import torchvision

        model = getattr(torchvision.models, arch)(weights=None)
    else:
        raise ValueError(f"unknown twin library in {twin!r}")
    return model.eval()


def bench_model(name, cfg, batches, impls, threads, args, jax, np, zoo, depthwise_impl, torch) -> list[dict]:
    import jax.numpy as jnp

    from export.latency import OtherLoad, timed_rounds

    meter = OtherLoad()  # CPUs other processes use while this model is timed
    module = zoo.create_model(name)
    h, w = cfg.input_size
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, h, w, cfg.in_chans))))
    from export.weights import fill_variables

    variables = jax.device_put(fill_variables(abstract))
    twin = make_twin(cfg.twin, torch) if torch else None
    rows = []
    for batch in batches:
        x_np = np.random.default_rng(1).standard_normal((batch, h, w, cfg.in_chans)).astype(np.float32)
        x = jax.device_put(x_np)
        runners: dict[str, callable] = {}
        compile_s: dict[str, float] = {}
        for impl in impls:
            log(f"  batch {batch}: compiling zoo (depthwise={impl})")
            t0 = time.perf_counter()
            # A fresh jit per formulation: jit's trace cache does not key on the depthwise context.
            fwd = jax.jit(lambda v, x: module.apply(v, x, train=False))
            with depthwise_impl(impl):
                compiled = fwd.lower(variables, x).compile()
            compile_s[impl] = time.perf_counter() - t0
            runners[f"zoo:{impl}"] = (lambda c: lambda: c(variables, x).block_until_ready())(compiled)
        if args.wait_quiet > 0:
            before = meter.wait_quiet(args.wait_quiet)
            if before is not None and before >= 0.2:
                log(f"  warning: machine busy (others use {before:.1f} CPUs); measuring anyway")
        layout = ""
        if twin is not None:
            x_t = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2)))
            layout = pick_layout(twin, x_t, torch, batch)
            runners["torch"] = torch_runner(twin, x_t, torch, layout)
        for run in runners.values():  # warm-up (the zoo's first call after compiling allocates; torch primes oneDNN)
            run()
        log(f"  batch {batch}: timing {', '.join(runners)}" + (f" (torch {layout})" if layout else ""))
        times, others = None, float("inf")
        for attempt in range(1 + args.retries):  # keep the least disturbed set of rounds
            meter.start()
            t = timed_rounds(runners, args.repeats, args.budget, min_rounds=3)
            load = meter.cpus() or 0.0  # None: /proc/stat unreadable, nothing to compare
            if load < others:
                times, others = t, load
            if others <= args.max_others or attempt == args.retries:
                break
            log(f"  others used {load:.2f} CPUs while timing; waiting and measuring again")
            meter.wait_quiet(args.wait_quiet)
        torch_s = statistics.median(times["torch"]) if "torch" in times else float("nan")
        for impl in impls:
            zoo_s = statistics.median(times[f"zoo:{impl}"])
            row = {
                "model": name, "batch": batch, "threads": threads, "depthwise": impl,
                "zoo_img_s": round(batch / zoo_s, 2),
                "torch_img_s": round(batch / torch_s, 2) if not math.isnan(torch_s) else "",
                "ratio_zoo_torch": round(torch_s / zoo_s, 3) if not math.isnan(torch_s) else "",
                "torch_layout": layout, "jax_compile_s": round(compile_s[impl], 2),
                "zoo_rounds": len(times[f"zoo:{impl}"]), "torch_rounds": len(times.get("torch", ())),
                "others_cpu": round(others, 2),
            }
            rows.append(row)
            log(f"  batch {batch} depthwise={impl}: zoo {row['zoo_img_s']} img/s, torch {row['torch_img_s']} img/s "
                f"({layout}), zoo/torch {row['ratio_zoo_torch']}, compile {row['jax_compile_s']} s, "
                f"others used {others:.2f} CPUs")
    return rows


def torch_runner(model, x, torch, layout: str):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    m = model.to(memory_format=fmt)
    xi = x.contiguous(memory_format=fmt)

    def run():
        with torch.inference_mode():
            m(xi)

    return run


def pick_layout(model, x, torch, batch: int) -> str:
    """The faster of contiguous / channels_last: one warm-up and then min over a few probe calls each."""
    probes = 3 if batch == 1 else 1
    best = {}
    for layout in ("contiguous", "channels_last"):
        run = torch_runner(model, x, torch, layout)
        run()
        ts = []
        for _ in range(probes):
            t0 = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t0)
        best[layout] = min(ts)
    return min(best, key=best.get)


def markdown(rows: list[dict], impls: list[str], threads: int, args) -> str:
    head = ["model", "batch", "torch img/s (layout)"]
    for impl in impls:
        head += [f"zoo img/s ({impl})", f"zoo/torch ({impl})", f"compile s ({impl})"]
    head.append("others' CPUs")
    lines = [f"Images/second, {threads} thread(s), malloc {args.malloc}, random weights, median of alternating rounds "
             f"(`bench/inference.py`{' --xla-flags ' + repr(args.xla_flags) if args.xla_flags else ''}). "
             "Last column: CPUs other processes used while timing (noise indicator).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["model"], r["batch"]), {})[r["depthwise"]] = r
    for (model, batch), per in by_key.items():
        first = next(iter(per.values()))
        cells = [model, str(batch), f"{first['torch_img_s']} ({first['torch_layout']})" if first["torch_layout"]
                 else "-"]
        for impl in impls:
            r = per.get(impl)
            cells += [str(r["zoo_img_s"]), str(r["ratio_zoo_torch"]), str(r["jax_compile_s"])] if r else ["-"] * 3
        cells.append(str(first["others_cpu"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
