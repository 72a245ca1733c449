"""What the int8 remedies buy and cost: fp32, full int8, full int8 with border-heavy residual streams split by rows
(`export.row_split`, "auto", the default) and mixed int8 (`export.mixed`, without the split) of one model with real
weights, verified on photo crops and timed in LiteRT + XNNPACK in the same rounds.

    ZOO_OFFLINE=1 python bench/mixed_int8.py                              # mobilenet_v2, ~7 min on 2 cores
    ZOO_OFFLINE=1 python bench/mixed_int8.py --model tf_efficientnet_lite0 --min-agreement 0.97

Data: the crops of tests/test_export_models.py (scikit-image's chelsea, coffee, astronaut and rocket; 64 verify
crops of 50-100% of the short side, half flipped; 32 calibration crops of 40-100%), percentile activation ranges.
Mixed int8 keeps float the parts `export.sensitivity` ranks first until `--min-agreement` is met on the verify crops.
Writes `bench/results/mixed_int8.csv` and `.md` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


@dataclass(frozen=True)
class Row:
    model: str
    variant: str  # fp32, int8, int8 rows split (the stages split), mixed int8
    kept_float: str  # parts kept float ("-" for fp32)
    sqnr_db: float  # logits against JAX on the verify crops
    top1_agreement: float
    float_islands: int
    xnnpack_partitions: int
    size_mb: float
    ms_1t: float  # median latency, one thread
    ms_2t: float


def photo_crops(seed: int, per_photo: int, lo: float):
    """Square crops (side lo..1 of the short side), half mirrored, `per_photo` per photo: the export test's recipe."""
    from skimage import data

    rng = np.random.default_rng(seed)
    crops = []
    for name in PHOTOS:
        img = getattr(data, name)()
        h, w = img.shape[:2]
        for _ in range(per_photo):
            s = int(rng.uniform(lo, 1.0) * min(h, w))
            y0, x0 = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
            crop = img[y0:y0 + s, x0:x0 + s]
            crops.append(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop))
    return crops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v2", help="a model with offline weights (default mobilenet_v2)")
    p.add_argument("--min-agreement", type=float, default=0.95, help="mixed int8's target (default 0.95)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds (default 20)")
    p.add_argument("--out", default=str(RESULTS / "mixed_int8"), help="output path without suffix")
    args = p.parse_args(argv)

    import zoo
    from export import latency, to_tflite
    from export.mixed import mixed_int8
    from export.tables import report
    from zoo.preprocess import preprocess

    model = zoo.load(args.model, progress=False)
    x = preprocess(photo_crops(0, 16, 0.5), model.cfg)
    calib = preprocess(photo_crops(1, 8, 0.4), model.cfg)
    options = dict(representative_data=calib, verify_data=x, calibration="percentile")
    print(f"{args.model}: fp32", file=sys.stderr, flush=True)
    fp32 = to_tflite(model, quantization="fp32", verify_data=x, progress=False)
    plain = {**options, "int8_split_top_row": None}  # int8 and mixed int8 without the row split
    mixed = mixed_int8(model, min_agreement=args.min_agreement, **plain)  # full int8 is its first export
    int8 = mixed.all_int8
    split = to_tflite(model, quantization="int8", min_agreement=0.0, progress=False, **options)  # "auto": the default
    variants = {"fp32": (fp32, "-"), "int8": (int8, "none"),
                f"int8 rows split ({split.metadata['int8_split_top_row'] or 'no stage'})": (split, "none"),
                "mixed int8": (mixed.export, ", ".join(mixed.kept_float) or "none")}
    times = latency.benchmark_many({k: r.content for k, (r, _) in variants.items()}, (1, 2), runs=200, warmup=5,
                                   budget_s=args.budget)
    ms = {(t.model, t.threads): t.median_ms for t in times}
    rows = [Row(args.model, label, kept, round(res.verification.sqnr_db, 2), round(res.verification.top1_agreement, 4),
                len(res.ops.float_islands), res.delegate.partitions, round(res.size_bytes / 1e6, 2),
                ms[(label, 1)], ms[(label, 2)]) for label, (res, kept) in variants.items()]
    md = (f"{args.model}, {len(x)} photo crops, {x.shape[1]}x{x.shape[2]}, LiteRT + XNNPACK (median ms)\n\n"
          "| variant | kept float | SQNR dB | top-1 agreement | float islands | MB | 1 thread | 2 threads |\n"
          "|---|---|---|---|---|---|---|---|\n")
    md += "".join(f"| {r.variant} | {r.kept_float} | {r.sqnr_db:.1f} | {r.top1_agreement:.1%} | {r.float_islands} | "
                  f"{r.size_mb:.2f} | {r.ms_1t:.2f} | {r.ms_2t:.2f} |\n" for r in rows)
    report(md, rows, Row, csv_path=f"{args.out}.csv", md_path=f"{args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
