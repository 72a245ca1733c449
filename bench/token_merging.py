"""What token merging (`merge_tokens`, `zoo.layers.token_merging`) saves on this CPU: MACs counted, and time measured
in JAX and in LiteRT, against the same model without merging, side by side in one process.

    python bench/token_merging.py                                   # DeiT-Tiny and -Small, r = 0, 4, 8, 13, 16
    python bench/token_merging.py --models deit_tiny_patch16_224 --merges 0,8 --threads 1

Per model and r (tokens merged by every block, the paper's constant schedule) at 224x224: MACs from the jaxpr, the
tokens the last block keeps, the jitted JAX forward at batch 1 and 32 (median of interleaved rounds: every r of a
model in turn, so that the machine's drift hits them alike), and the fp32 TFLite file (verified against JAX when
exported) at each thread count (`export.latency.benchmark_many`, interleaved rounds), with its XNNPACK partitions:
the matching (comparisons, arg-max, one-hot) runs on TFLite's builtin kernels, between XNNPACK's partitions.
Weights are random (`export.weights.random_variables`): merging's cost does not depend on them; its accuracy does,
and needs trained weights (the paper: DeiT-S r=13 0.4 points of ImageNet top-1 for 2x its throughput on a GPU).

Writes `bench/results/token_merging.csv` / `.md` and a plot of time against MACs (`.png`, with matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("model", "r", "tokens_last", "macs_g", "macs_vs_r0", "jax_b1_ms", "jax_b32_ms", "jax_b1_vs_r0",
          "jax_b32_vs_r0", "tflite_1t_ms", "tflite_2t_ms", "tflite_1t_vs_r0", "tflite_2t_vs_r0", "partitions",
          "max_abs_diff")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="deit_tiny_patch16_224,deit_small_patch16_224")
    p.add_argument("--merges", default="0,4,8,13,16", help="tokens merged by every block; 0 is the base model")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=7, help="interleaved JAX rounds (median)")
    p.add_argument("--out", type=Path, default=RESULTS / "token_merging")
    return p.parse_args(argv)


def jax_times(fns: dict, x, rounds: int) -> dict:
    """Median seconds per call of each jitted fn on x, in interleaved rounds after one warm-up call each."""
    for fn in fns.values():
        fn(x).block_until_ready()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(x).block_until_ready()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, merges: list[int], threads: list[int], rounds: int) -> list[dict]:
    import jax
    import numpy as np

    import zoo
    from export import to_tflite
    from export.latency import benchmark_many
    from export.weights import random_variables
    from zoo.counting import count_macs
    from zoo.layers.token_merging import merge_schedule

    from zoo.registry import get_entry

    base = zoo.create_model(name)
    hw = get_entry(name).cfg.input_size
    variables = random_variables(base, (1, *hw, 3))
    modules = {r: zoo.create_model(name, merge_tokens=r) for r in merges}
    rows, files = {}, {}
    for r, m in modules.items():
        patches = hw[0] // 16 * hw[1] // 16
        schedule = merge_schedule(r, m.spec.depth, patches, 2 if m.distilled else 1)
        rows[r] = {"model": name, "r": r, "tokens_last": patches - sum(schedule),
                   "macs_g": count_macs(m, variables, (1, *hw, 3)) / 1e9}
        log(f"{name} r={r}: exporting fp32")
        res = to_tflite(m, variables, input_hw=hw, progress=False)
        files[r] = res.content
        rows[r].update(partitions=res.delegate.partitions, max_abs_diff=res.verification.max_abs_diff)
    for batch in (1, 32):
        x = np.random.default_rng(0).standard_normal((batch, *hw, 3)).astype(np.float32)
        fns = {r: jax.jit(lambda x, m=m: m.apply(variables, x)) for r, m in modules.items()}
        log(f"{name}: JAX batch {batch}")
        for r, t in jax_times(fns, x, rounds).items():
            rows[r][f"jax_b{batch}_ms"] = t * 1e3
    log(f"{name}: LiteRT at {threads} threads")
    for lat in benchmark_many({str(r): c for r, c in files.items()}, threads=threads):
        rows[int(lat.model)][f"tflite_{lat.threads}t_ms"] = lat.median_ms
    ref = rows[min(rows)]
    for row in rows.values():
        row["macs_vs_r0"] = row["macs_g"] / ref["macs_g"]
        for k in ("jax_b1", "jax_b32", *(f"tflite_{t}t" for t in threads)):
            row[f"{k}_vs_r0"] = row[f"{k}_ms"] / ref[f"{k}_ms"]
    return list(rows.values())


def markdown(rows: list[dict], threads: list[int]) -> str:
    head = ["model", "r", "tokens left", "GMACs", "MACs", "JAX b1 ms", "JAX b32 ms"] + \
        [f"LiteRT {t}t ms" for t in threads] + ["XNNPACK partitions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["r"], r["tokens_last"], f"{r['macs_g']:.3f}", f"{r['macs_vs_r0']:.2f}x",
                 f"{r['jax_b1_ms']:.1f} ({r['jax_b1_vs_r0']:.2f}x)", f"{r['jax_b32_ms']:.0f} ({r['jax_b32_vs_r0']:.2f}x)"]
        cells += [f"{r[f'tflite_{t}t_ms']:.1f} ({r[f'tflite_{t}t_vs_r0']:.2f}x)" for t in threads]
        lines.append("| " + " | ".join(map(str, cells + [r["partitions"]])) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], threads: list[int], path: Path) -> None:
    from report import pyplot  # a sibling module: bench/ is on the path

    plt = pyplot()
    if plt is None:
        log("matplotlib missing (pip install matplotlib): no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for key, style in ((f"tflite_{threads[0]}t_vs_r0", "o-"), ("jax_b32_vs_r0", "s--")):
            label = f"{model} {'LiteRT ' + str(threads[0]) + 't' if key.startswith('tflite') else 'JAX b32'}"
            ax.plot([r["macs_vs_r0"] for r in mine], [r[key] for r in mine], style, label=label)
    ax.plot([0.3, 1], [0.3, 1], ":", color="gray", label="time in proportion to MACs")
    ax.set_xlabel("MACs / MACs without merging")
    ax.set_ylabel("time / time without merging")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    merges = sorted({int(v) for v in args.merges.split(",")} | {0})
    threads = [int(t) for t in args.threads.split(",")]
    rows = [row for name in args.models.split(",") for row in bench_model(name, merges, threads, args.rounds)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    table = markdown(rows, threads)
    args.out.with_suffix(".md").write_text(table + "\n")
    plot(rows, threads, args.out.with_suffix(".png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
