"""TFLite latency of exported zoo models (fp32 / fp16 / int8, LiteRT + XNNPACK) against JAX on the CPU, and against
the reference exporter (Keras 3 applications -> `TFLiteConverter.from_keras_model`) for the same architectures.

    python bench/export_latency.py --quick                 # 4 models + their Keras twins (~10 min on 2 cores)
    python bench/export_latency.py                         # every model (~1 h on 2 cores)
    python bench/export_latency.py --models 'mobilenetv3*' --threads 1,2,4 --no-keras
    python bench/export_latency.py --formats fp32,int8 --threads 1 --no-keras --no-jax --resume   # the zoo, resumable

Per model, at its default resolution and batch 1:
- weights: the real ones where they install offline (tf_efficientnet_lite0, mobilenet_v2), else random
  (`export.weights.random_variables`) with BatchNorm statistics measured on the calibration images
  (`calibrate_batch_stats`), so that activation ranges - which decide int8 scales and whether XNNPACK takes an int8
  op - look like a trained network's;
- calibration: 32 crops of scikit-image's photos (random normal inputs when scikit-image is missing);
- exports fp32, fp16 and full int8 (float input/output) with `export.to_tflite`, each verified against JAX;
- times all exports at each thread count in interleaved rounds (`export.latency.benchmark_many`: median, warm-up
  excluded), and the jitted JAX model on all CPUs of the process (XLA:CPU has no per-call thread count);
- params and MACs from `zoo.model_info`.
Keras twins (MobileNetV3Large/Small, MobileNetV2, EfficientNetB0; same architecture, `weights=None`: random weights,
since Keras' ImageNet weights need a download; `include_preprocessing=False`, logits out) are converted fp32 and int8
with the same calibration inputs and timed in the same rounds as ours.

Writes `bench/results/export_latency.csv` and `.md` (one row per model) and prints the markdown table.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import os
import sys
import time
from pathlib import Path

QUICK = ("mobilenetv3_large_100", "mobilenetv3_small_100", "mobilenet_v2", "efficientnet_b0")
OFFLINE_WEIGHTS = ("tf_efficientnet_lite0", "mobilenet_v2")
KERAS_TWINS = {
    "mobilenetv3_large_100": "MobileNetV3Large",
    "mobilenetv3_small_100": "MobileNetV3Small",
    "mobilenet_v2": "MobileNetV2",
    "efficientnet_b0": "EfficientNetB0",
    "mobilenetv1_100": "MobileNet",
    "tf_efficientnetv2_b0": "EfficientNetV2B0",
    "tf_efficientnetv2_b1": "EfficientNetV2B1",
    "tf_efficientnetv2_b2": "EfficientNetV2B2",
    "tf_efficientnetv2_b3": "EfficientNetV2B3",
}  # Keras 3's applications have no RegNet (Keras 2 had) and no ConvNeXt below Tiny
RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("model", "res", "params_m", "macs_g", "jax_ms", "jax_threads",
          "fp32_1t", "fp32_2t", "fp16_1t", "fp16_2t", "int8_1t", "int8_2t", "int8_vs_fp32_1t",
          "fp32_parts", "int8_parts", "int8_not_delegated", "fp32_mb", "int8_mb", "int8_agree", "weights",
          "keras", "keras_fp32_1t", "keras_fp32_2t", "keras_int8_1t", "keras_int8_2t", "keras_int8_parts",
          "ours_vs_keras_fp32_1t", "ours_vs_keras_int8_1t", "others_cpu")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated names or globs (default: all)")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--threads", default="1,2", help="LiteRT thread counts (default 1,2)")
    p.add_argument("--runs", type=int, default=40, help="max timed rounds (default 40)")
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timed rounds per model (default 8)")
    p.add_argument("--no-keras", action="store_true", help="skip the Keras reference exporter")
    p.add_argument("--no-jax", action="store_true", help="skip the JAX latency")
    p.add_argument("--formats", default="fp32,fp16,int8", help="exports to time (fp32 always included)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows already in the CSV and bench only the models it lacks (an interrupted sweep)")
    p.add_argument("--out", default=str(RESULTS / "export_latency"), help="output path without suffix")
    p.add_argument("--publish", action="store_true",
                   help="also merge each model's fp32/int8 latency at the first thread count into the table shipped "
                        "with the package (zoo/data/tflite_latency.csv, read by zoo.model_info)")
    return p.parse_args(argv)


def calibration_images(cfg, n: int = 32):
    import numpy as np

    try:
        from skimage import data
    except ImportError:
        return np.random.default_rng(0).standard_normal((n, *cfg.input_size, 3)).astype(np.float32)
    from zoo.preprocess import preprocess

    rng = np.random.default_rng(1)
    photos = [getattr(data, k)() for k in ("chelsea", "coffee", "astronaut", "rocket")]
    crops = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        s = int(rng.uniform(0.4, 1.0) * min(h, w))
        y0, x0 = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        crops.append(np.ascontiguousarray(img[y0:y0 + s, x0:x0 + s]))
    return preprocess(crops, cfg)


def our_model(name: str, calib):
    import zoo
    from export.weights import calibrate_batch_stats, random_variables
    from zoo.registry import get_entry

    if name in OFFLINE_WEIGHTS:
        m = zoo.load(name, progress=False)
        return m.module, m.variables, m.cfg, "pretrained"
    cfg = get_entry(name).cfg
    module = zoo.create_model(name)
    variables = random_variables(module, (1, *cfg.input_size, cfg.in_chans))
    return module, calibrate_batch_stats(module, variables, calib[:16]), cfg, "random, BN from photos"


def keras_exports(arch: str, hw, calib, tf):
    """fp32 and full-int8 (float I/O) TFLite bytes of a Keras application with random weights."""
    import keras

    kwargs = dict(weights=None, input_shape=(*hw, 3), classifier_activation=None)
    if arch.startswith(("MobileNetV3", "EfficientNetV2")):
        kwargs["include_preprocessing"] = False
    model = getattr(keras.applications, arch)(**kwargs)
    out = {}
    for q in ("fp32", "int8"):
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        if q == "int8":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = lambda: ([x[None]] for x in calib)
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        out[q] = conv.convert()
    return out


def bench_model(name, args, threads, tf):
    import numpy as np

    import zoo
    from export import latency, to_tflite
    from zoo.registry import get_entry

    cfg0 = get_entry(name).cfg
    calib = calibration_images(cfg0)
    module, variables, cfg, weights = our_model(name, calib)
    verify = calib[:8]
    exports = {}
    agree = ""
    formats = [q for q in ("fp32", "fp16", "int8") if q in {"fp32", *args.formats.split(",")}]
    for q in formats:
        kw = {"representative_data": calib} if q == "int8" else {}
        t0 = time.perf_counter()
        res = to_tflite(module, variables, cfg=cfg, quantization=q, verify_data=verify, progress=False, **kw)
        exports[q] = res
        log(f"  {q}: {res.size_bytes / 1e6:.1f} MB in {time.perf_counter() - t0:.0f} s; {res.verification.summary()}")
        if q == "int8":
            agree = round(res.verification.top1_agreement, 3)
    models = {f"ours_{q}": r.content for q, r in exports.items()}
    keras_arch = KERAS_TWINS.get(name) if not args.no_keras else None
    if keras_arch:
        t0 = time.perf_counter()
        for q, content in keras_exports(keras_arch, cfg.input_size, calib, tf).items():
            models[f"keras_{q}"] = content
        log(f"  keras {keras_arch}: converted in {time.perf_counter() - t0:.0f} s")
    rows = latency.benchmark_many(models, threads, runs=args.runs, warmup=3, budget_s=args.budget)
    by = {(r.model, r.threads): r for r in rows}
    jax_row = None
    if not args.no_jax:
        jax_row = latency.benchmark_jax(module, variables, input_hw=cfg.input_size, runs=args.runs,
                                        budget_s=args.budget / 2, name=name)
    info = zoo.model_info(name)
    t1, t2 = threads[0], threads[min(1, len(threads) - 1)]
    med = lambda k, t: by[(k, t)].median_ms if (k, t) in by else ""  # noqa: E731
    ratio = lambda a, b: round(a / b, 2) if a and b else ""  # noqa: E731
    i8 = by.get(("ours_int8", t1))
    row = {
        "model": name, "res": cfg.input_size[0], "params_m": round(info["params"] / 1e6, 2),
        "macs_g": round(info["macs"] / 1e9, 3),
        "jax_ms": jax_row.median_ms if jax_row else "", "jax_threads": jax_row.threads if jax_row else "",
        "fp32_1t": med("ours_fp32", t1), "fp32_2t": med("ours_fp32", t2), "fp16_1t": med("ours_fp16", t1),
        "fp16_2t": med("ours_fp16", t2), "int8_1t": med("ours_int8", t1), "int8_2t": med("ours_int8", t2),
        "int8_vs_fp32_1t": ratio(med("ours_int8", t1), med("ours_fp32", t1)),
        "fp32_parts": by[("ours_fp32", t1)].partitions, "int8_parts": i8.partitions if i8 else "",
        "int8_not_delegated": i8.not_delegated if i8 else "", "fp32_mb": by[("ours_fp32", t1)].size_mb,
        "int8_mb": i8.size_mb if i8 else "",
        "int8_agree": agree, "weights": weights, "keras": keras_arch or "",
        "keras_fp32_1t": med("keras_fp32", t1), "keras_fp32_2t": med("keras_fp32", t2),
        "keras_int8_1t": med("keras_int8", t1), "keras_int8_2t": med("keras_int8", t2),
        "keras_int8_parts": by[("keras_int8", t1)].partitions if ("keras_int8", t1) in by else "",
        "ours_vs_keras_fp32_1t": ratio(med("ours_fp32", t1), med("keras_fp32", t1)),
        "ours_vs_keras_int8_1t": ratio(med("ours_int8", t1), med("keras_int8", t1)),
        "others_cpu": max((r.others_cpu or 0) for r in rows),
    }
    return row


def publish(rows, threads, path: Path | None = None) -> Path:
    """Merge `rows` into the package's latency table (one row per model; rows of other models kept), atomically."""
    from export.latency import cpu_name
    from zoo import measured

    path = path or Path(__file__).resolve().parents[1] / "zoo" / measured.TABLE
    table = {}
    if path.exists():
        with open(path, newline="") as f:
            table = {r["model"]: r for r in csv.DictReader(f)}
    cpu, date = cpu_name(), time.strftime("%Y-%m-%d")
    for r in rows:
        table[r["model"]] = {"model": r["model"], "res": r["res"], "threads": threads[0], "fp32_ms": r["fp32_1t"],
                             "int8_ms": r["int8_1t"], "int8_partitions": r["int8_parts"], "cpu": cpu, "date": date}
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=measured.FIELDS)
        writer.writeheader()
        writer.writerows(table[k] for k in sorted(table))
    os.replace(tmp, path)
    return path


def markdown(rows, threads, args) -> str:
    t1, t2 = threads[0], threads[min(1, len(threads) - 1)]
    head = ["model", "res", "params M", "MACs G", "JAX ms", f"fp32 {t1}t", f"fp32 {t2}t", f"fp16 {t1}t",
            f"fp16 {t2}t", f"int8 {t1}t", f"int8 {t2}t", "int8/fp32", "int8 parts", "int8 MB", "int8 agree",
            f"Keras fp32 {t1}t/{t2}t", f"Keras int8 {t1}t/{t2}t", "ours/Keras fp32", "ours/Keras int8",
            "others' CPUs"]
    lines = [f"Median ms per image (batch 1), LiteRT {t1}/{t2} thread(s) with XNNPACK; JAX jit on all CPUs of the "
             "process; `bench/export_latency.py`. 'parts': XNNPACK delegate partitions (1 = whole graph delegated); "
             "'int8 agree': top-1 agreement with JAX on 8 calibration crops (meaningful for pretrained weights only: "
             "a random 1000-way head gives near-tied logits). Keras twins: same architecture, random weights. Last "
             "column: CPUs other processes used while timing (noise; on 2 cores it mostly hits the 2-thread runs).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        k32 = f"{r['keras_fp32_1t']} / {r['keras_fp32_2t']}" if r["keras"] else "-"
        k8 = f"{r['keras_int8_1t']} / {r['keras_int8_2t']}" if r["keras"] else "-"
        cells = [r["model"], r["res"], r["params_m"], r["macs_g"], r["jax_ms"], r["fp32_1t"], r["fp32_2t"],
                 r["fp16_1t"], r["fp16_2t"], r["int8_1t"], r["int8_2t"], r["int8_vs_fp32_1t"], r["int8_parts"],
                 r["int8_mb"], r["int8_agree"], k32, k8, r["ours_vs_keras_fp32_1t"] or "-",
                 r["ours_vs_keras_int8_1t"] or "-", r["others_cpu"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    import zoo

    threads = tuple(int(t) for t in args.threads.split(",") if t.strip())
    names = zoo.list_models(task="classification")
    if args.quick:
        names = [n for n in QUICK if n in names]
    if args.models:
        pats = [p.strip() for p in args.models.split(",") if p.strip()]
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]
    if not names:
        raise SystemExit("no model matches")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.resume and out.with_suffix(".csv").exists():
        with open(out.with_suffix(".csv"), newline="") as f:
            rows = list(csv.DictReader(f))
        done = {r["model"] for r in rows}
        log(f"resuming: {len(done)} model(s) already in {out.with_suffix('.csv')}")
        names = [n for n in names if n not in done]
    t_start = time.perf_counter()
    with open(out.with_suffix(".csv"), "a" if rows else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if not rows:
            writer.writeheader()
        for i, name in enumerate(names):
            log(f"[{i + 1}/{len(names)}] {name} t={time.perf_counter() - t_start:.0f}s")
            try:
                row = bench_model(name, args, threads, tf)
            except Exception as e:  # one failing model must not lose the rest
                log(f"  FAILED: {type(e).__name__}: {str(e)[:500]}")
                continue
            writer.writerow(row)
            f.flush()
            rows.append(row)
            log(f"  fp32 {row['fp32_1t']} ms, int8 {row['int8_1t']} ms ({row['int8_parts']} parts), keras fp32 "
                f"{row['keras_fp32_1t'] or '-'} / int8 {row['keras_int8_1t'] or '-'} ms at {threads[0]} thread(s)")
    table = markdown(rows, threads, args)
    out.with_suffix(".md").write_text(table)
    if args.publish:
        log(f"published {len(rows)} model(s) to {publish(rows, threads)}")
    print(table)
    log(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')} in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
