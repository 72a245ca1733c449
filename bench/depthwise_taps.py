"""LiteRT + XNNPACK latency of one depthwise convolution by kernel shape and width, fp32 against full int8.

Each case is a small network, 1x1 conv -> depthwise conv -> 1x1 conv (BatchNorm and ReLU after each, mean-pooled),
exported with `export.to_tflite` (fp32, and int8 calibrated on random inputs) and timed in interleaved rounds at
one thread. `--formulation` picks how a kernel of more than `XNNPACK_MAX_DEPTHWISE_TAPS` taps is traced: "tiled" (what
every export does: blocks of at most that many taps, summed) or "native" (one DEPTHWISE_CONV_2D).

    python bench/depthwise_taps.py                                       # kernels 3x3..9x9 and 7x3, 96 channels
    python bench/depthwise_taps.py --formulation native                  # the single-op kernels XNNPACK runs slowly
    python bench/depthwise_taps.py --kernels 3 --channels 8,16,20,24,32,64

Prints a markdown table (ms at 1 thread, int8 / fp32) and writes `bench/results/depthwise_taps.csv`.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def probe(kernel: tuple[int, int], channels: int, stride: int):
    import flax.linen as nn

    from zoo.layers.blocks import ConvNormAct
    from zoo.layers.conv import Conv2d
    from zoo.layers.norm import batch_norm

    class DepthwiseProbe(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool = False):
            norm = batch_norm()
            x = ConvNormAct(channels, Conv2d, norm, 1, name="pw1")(x, train)
            x = ConvNormAct(channels, Conv2d, norm, kernel, stride, groups=channels, name="dw")(x, train)
            x = ConvNormAct(channels, Conv2d, norm, 1, act=None, name="pw2")(x, train)
            return x.mean((1, 2))

    return DepthwiseProbe()


def parse_kernel(text: str) -> tuple[int, int]:
    parts = [int(t) for t in text.lower().split("x")]
    return (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="3,5,7x3,6,7,9", help="kernel shapes: k or khxkw, comma-separated")
    p.add_argument("--channels", default="96", help="comma-separated widths")
    p.add_argument("--size", type=int, default=56, help="input height and width")
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--formulation", choices=("tiled", "native"), default="tiled")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--budget", type=float, default=4.0, help="seconds of timed rounds at most")
    p.add_argument("--out", default=str(RESULTS / "depthwise_taps.csv"))
    args = p.parse_args(argv)

    import jax

    import zoo.layers.conv as conv
    from export import to_tflite
    from export.latency import benchmark_many

    if args.formulation == "native":  # every kernel as one op, however many taps
        conv.XNNPACK_MAX_DEPTHWISE_TAPS = 10**9
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, args.size, args.size, 3)).astype(np.float32)
    cases = [(parse_kernel(k), int(c)) for k in args.kernels.split(",") for c in args.channels.split(",")]
    files = {}
    for kernel, channels in cases:
        module = probe(kernel, channels, args.stride)
        variables = module.init(jax.random.PRNGKey(0), x[:1])
        for q in ("fp32", "int8"):
            res = to_tflite(module, variables, quantization=None if q == "fp32" else q,
                            representative_data=x if q == "int8" else None, input_hw=(args.size, args.size),
                            progress=False)
            files[(kernel, channels, q)] = res.content
    rows = benchmark_many({f"{k[0]}x{k[1]} c{c} {q}": b for (k, c, q), b in files.items()}, threads=(1,),
                          runs=args.runs, budget_s=args.budget)
    ms = {r.model: r for r in rows}
    table = []
    for kernel, channels in cases:
        f, i = ms[f"{kernel[0]}x{kernel[1]} c{channels} fp32"], ms[f"{kernel[0]}x{kernel[1]} c{channels} int8"]
        table.append({"kernel": f"{kernel[0]}x{kernel[1]}", "taps": kernel[0] * kernel[1], "channels": channels,
                      "size": args.size, "stride": args.stride, "formulation": args.formulation,
                      "fp32_ms": f.median_ms, "int8_ms": i.median_ms, "int8_over_fp32": round(i.median_ms / f.median_ms, 2),
                      "partitions": f"{f.partitions}/{i.partitions}", "others_cpu": max(f.others_cpu or 0, i.others_cpu or 0)})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    print(f"| kernel | taps | channels | fp32 ms | int8 ms | int8/fp32 | partitions fp32/int8 |  ({args.formulation}, "
          f"{args.size}x{args.size}, stride {args.stride}, 1 thread)")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['kernel']} | {r['taps']} | {r['channels']} | {r['fp32_ms']:.3f} | {r['int8_ms']:.3f} | "
              f"{r['int8_over_fp32']:.2f} | {r['partitions']} |")
    print(f"others' CPU use while timing: up to {max(r['others_cpu'] for r in table):.2f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
