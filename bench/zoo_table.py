"""One table for the whole zoo: size, cost, accuracy and measured speed of every registered model on this CPU.

    python bench/zoo_table.py --models 'mobilenetv3*' --no-torch      # a few models (~1 min each on 2 cores)
    python bench/zoo_table.py --resume                                  # every model; continues where it stopped

Per model (default resolution):
- params of the training and deploy forms, MACs (jaxpr count), source top-1 (the best ImageNet tag's, from its
  `PretrainedCfg`), all from `zoo.model_info`;
- JAX (jitted, all CPUs of the process) at batch 1 and 32 against the PyTorch twin in the same alternating rounds
  (`bench/inference.py`'s measurement), where the model has a twin;
- LiteRT + XNNPACK latency of the fp32, fp16 and full-int8 files (`export.to_tflite`, each verified against JAX) at
  1 and 2 threads in interleaved rounds (`bench/export_latency.py`'s measurement), their sizes and partitions;
- the share of this CPU's measured peak that each file reaches at 1 thread: MACs / latency against the MAC rate of a
  large 1x1 convolution in the same runtime and format (measured once per run, `peak`).
Weights are random (BatchNorm statistics from photos; latency does not depend on the values).

Writes `<out>.csv` (one row per model, rewritten atomically after each; `--resume` skips the models in it), `<out>.md`
and `<out>.png` (top-1 against int8 latency at 1 thread, the Pareto front marked), and prints the markdown. The full
zoo takes hours on 2 cores: run it with `--resume` until it has every model. The machine and date go in the markdown.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import os
import sys
import time
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("model", "family", "res", "params_m", "deploy_params_m", "macs_g", "top1",
          "jax_b1_ms", "torch_b1_ms", "jax_b32_img_s", "torch_b32_img_s", "jax_vs_torch_b1", "jax_vs_torch_b32",
          "fp32_1t", "fp32_2t", "fp16_1t", "fp16_2t", "int8_1t", "int8_2t", "int8_vs_fp32_1t",
          "fp32_mb", "int8_mb", "int8_parts", "fp32_peak_pct_1t", "int8_peak_pct_1t", "others_cpu")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma-separated names or globs (default: every registered model)")
    p.add_argument("--no-torch", action="store_true", help="skip JAX-vs-PyTorch (JAX columns then empty too)")
    p.add_argument("--batches", default="1,32", help="JAX/PyTorch batch sizes (default 1,32)")
    p.add_argument("--runs", type=int, default=30, help="max timed rounds per measurement (default 30)")
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed rounds per measurement (default 4)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in <out>.csv, measure the rest")
    p.add_argument("--out", default=str(RESULTS / "zoo_table"), help="output path without suffix")
    return p.parse_args(argv)


def peak(runs: int, budget: float) -> dict[tuple[str, int], float]:
    """MACs per second LiteRT reaches on a 56x56 1x1 convolution of 512 -> 512 channels (fp32 and int8; 1 and
    2 threads): the most this runtime does on this CPU, the denominator of the table's peak shares."""
    import flax.linen as nn
    import jax
    import numpy as np

    from export import latency, to_tflite
    from zoo.layers.blocks import ConvNormAct
    from zoo.layers.conv import Conv2d
    from zoo.layers.norm import batch_norm

    class Pointwise(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = ConvNormAct(512, Conv2d, batch_norm(), 1, name="wide")(x, train)
            for i in range(4):
                x = ConvNormAct(512, Conv2d, batch_norm(), 1, name=f"pw{i}")(x, train)
            return x.mean((1, 2))

    module, hw = Pointwise(), 56
    x = np.random.default_rng(0).standard_normal((8, hw, hw, 3)).astype(np.float32)
    variables = module.init(jax.random.PRNGKey(0), x[:1])
    macs = hw * hw * 512 * (3 + 4 * 512)
    files = {q: to_tflite(module, variables, quantization=None if q == "fp32" else q, input_hw=(hw, hw),
                          representative_data=x if q == "int8" else None, progress=False).content
             for q in ("fp32", "int8")}
    rows = latency.benchmark_many(files, threads=(1, 2), runs=runs, budget_s=budget)
    return {(r.model, r.threads): macs / (r.median_ms / 1e3) for r in rows}


def static_columns(name: str) -> dict:
    import zoo
    from compress.deploy import deploy_param_count
    from zoo.registry import get_entry

    info = zoo.model_info(name)
    cfg = get_entry(name).cfg
    top1 = max((t["top1"] for t in info.get("pretrained", []) if t.get("top1")), default="")
    deploy = deploy_param_count(zoo.create_model(name), (1, *cfg.input_size, cfg.in_chans))
    return {"model": name, "family": info["family"], "res": cfg.input_size[0],
            "params_m": round(info["params"] / 1e6, 3), "deploy_params_m": round(deploy / 1e6, 3),
            "macs_g": round(info["macs"] / 1e9, 3), "top1": top1}


def jax_and_torch(name: str, batches: list[int], args, torch) -> dict:
    import jax
    import numpy as np

    import inference  # bench/inference.py
    import zoo
    from zoo.layers.conv import depthwise_impl
    from zoo.registry import get_entry

    cfg = get_entry(name).cfg
    if not cfg.twin:
        return {}
    opts = Namespace(wait_quiet=10.0, retries=1, repeats=args.runs, budget=args.budget, max_others=0.3)
    rows = inference.bench_model(name, cfg, batches, ["auto"], os.cpu_count(), opts, jax, np, zoo, depthwise_impl,
                                 torch)
    out = {}
    for r in rows:
        b = r["batch"]
        if b == 1:
            out["jax_b1_ms"] = round(1e3 / r["zoo_img_s"], 3)
            out["torch_b1_ms"] = round(1e3 / r["torch_img_s"], 3) if r["torch_img_s"] else ""
            out["jax_vs_torch_b1"] = r["ratio_zoo_torch"]
        elif b == 32:
            out["jax_b32_img_s"], out["torch_b32_img_s"] = r["zoo_img_s"], r["torch_img_s"]
            out["jax_vs_torch_b32"] = r["ratio_zoo_torch"]
    return out


def tflite_columns(name: str, args, rates: dict, macs_g: float) -> dict:
    import export_latency  # bench/export_latency.py

    opts = Namespace(formats="fp32,fp16,int8", no_keras=True, no_jax=True, runs=args.runs, budget=args.budget)
    r = export_latency.bench_model(name, opts, (1, 2), None)
    out = {k: r[k] for k in ("fp32_1t", "fp32_2t", "fp16_1t", "fp16_2t", "int8_1t", "int8_2t", "int8_vs_fp32_1t",
                             "fp32_mb", "int8_mb", "int8_parts", "others_cpu")}
    for q in ("fp32", "int8"):
        ms = r[f"{q}_1t"]
        out[f"{q}_peak_pct_1t"] = round(100 * macs_g * 1e9 / (ms / 1e3) / rates[(q, 1)], 1) if ms else ""
    return out


def pareto(points: list[tuple[float, float, str]]) -> list[str]:
    """Names on the front of (latency, top-1): no other model is at least as fast and more accurate."""
    front, best = [], float("-inf")
    for ms, top1, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if top1 > best:
            front.append(name)
            best = top1
    return front


def plot(rows: list[dict], path: Path) -> Path | None:
    from report import pyplot  # a sibling module: bench/ is on the path

    plt = pyplot()
    if plt is None:
        log("matplotlib missing (pip install matplotlib): no plot")
        return None
    pts = [(float(r["int8_1t"]), float(r["top1"]), r["model"]) for r in rows if r.get("int8_1t") and r.get("top1")]
    if not pts:
        return None
    front = set(pareto(pts))
    fig, ax = plt.subplots(figsize=(9, 6))
    families = sorted({r["family"] for r in rows})
    cmap = plt.get_cmap("tab20")
    fam = {r["model"]: r["family"] for r in rows}
    for i, f in enumerate(families):
        sel = [p for p in pts if fam[p[2]] == f]
        if sel:
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=18, color=cmap(i % 20), label=f)
    line = sorted((p for p in pts if p[2] in front), key=lambda p: p[0])
    ax.plot([p[0] for p in line], [p[1] for p in line], "k--", lw=1, label="Pareto front")
    for p in line:
        ax.annotate(p[2], (p[0], p[1]), fontsize=7, xytext=(3, -8), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("full-int8 TFLite latency, ms (LiteRT + XNNPACK, 1 thread, batch 1)")
    ax.set_ylabel("ImageNet top-1 (source weights), %")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(rows: list[dict], rates: dict, machine: str) -> str:
    head = ["model", "res", "params M (deploy)", "MACs G", "top-1", "JAX b1 ms", "torch b1 ms", "JAX/torch b32",
            "fp32 1t/2t ms", "fp16 1t ms", "int8 1t/2t ms", "int8/fp32", "MB fp32/int8", "% peak fp32/int8"]
    lines = [f"Measured on {machine}. Peak (1x1 conv, 1 thread): fp32 {rates[('fp32', 1)] / 1e9:.1f} GMAC/s, int8 "
             f"{rates[('int8', 1)] / 1e9:.1f} GMAC/s. JAX/torch columns are throughput ratios (>1: JAX faster).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(v) for v in (
            r["model"], r["res"], f"{r['params_m']} ({r['deploy_params_m']})", r["macs_g"], r["top1"] or "-",
            r.get("jax_b1_ms") or "-", r.get("torch_b1_ms") or "-", r.get("jax_vs_torch_b32") or "-",
            f"{r['fp32_1t']}/{r['fp32_2t']}", r["fp16_1t"] or "-", f"{r['int8_1t'] or '-'}/{r['int8_2t'] or '-'}",
            r["int8_vs_fp32_1t"] or "-", f"{r['fp32_mb']}/{r['int8_mb'] or '-'}",
            f"{r['fp32_peak_pct_1t']}/{r['int8_peak_pct_1t'] or '-'}")) + " |")
    return "\n".join(lines) + "\n"


def write_rows(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    torch = None
    if not args.no_torch:
        import torch  # before TensorFlow: the other order segfaults with these versions in one process

        import timm  # noqa: F401 - the twins
    import zoo
    from export.latency import cpu_name

    names = zoo.list_models(task="classification")
    if args.models:
        pats = [p.strip() for p in args.models.split(",") if p.strip()]
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]
    if not names:
        raise SystemExit("no model matches --models")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path = out.with_suffix(".csv")
    rows: list[dict] = []
    if args.resume and csv_path.exists():
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        done = {r["model"] for r in rows}
        log(f"resuming: {len(done)} model(s) already in {csv_path}")
        names = [n for n in names if n not in done]
    log("measuring this CPU's peak MAC rate in LiteRT (1x1 convolutions)")
    rates = peak(args.runs, args.budget)
    log("  " + ", ".join(f"{q} {t}t {v / 1e9:.1f} GMAC/s" for (q, t), v in sorted(rates.items())))
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    t_start = time.perf_counter()
    for i, name in enumerate(names):
        log(f"[{i + 1}/{len(names)}] {name} t={time.perf_counter() - t_start:.0f}s")
        try:
            row = {k: "" for k in FIELDS}
            row.update(static_columns(name))
            if torch is not None:
                row.update(jax_and_torch(name, batches, args, torch))
            row.update(tflite_columns(name, args, rates, row["macs_g"]))
        except Exception as e:  # one failing model must not lose the rest
            log(f"  FAILED: {type(e).__name__}: {str(e)[:500]}")
            continue
        rows.append(row)
        write_rows(rows, csv_path)
        log(f"  fp32 {row['fp32_1t']} ms, int8 {row['int8_1t']} ms at 1 thread; JAX/torch b1 "
            f"{row['jax_vs_torch_b1'] or '-'}")
    machine = f"{cpu_name()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    table = markdown(rows, rates, machine)
    out.with_suffix(".md").write_text(table)
    png = plot(rows, out.with_suffix(".png"))
    print(table)
    log(f"wrote {csv_path}, {out.with_suffix('.md')}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
