"""`zoo compare` and `zoo ptq`: registered into the zoo command line by `add_commands(sub)` (see zoo_cli.py).

    zoo compare lite0_fp32.tflite lite0_int8.tflite --data photos/ --md table.md     # first model is the reference
    zoo compare a.tflite b.tflite --data mnist5k --limit 500 --csv rows.csv
    zoo ptq --model tf_efficientnet_lite0 --calibration photos/ --method mse --out lite0_int8.tflite
"""

from __future__ import annotations

import sys


def add_commands(sub) -> None:
    from export.ptq import DEFAULT_METHOD, METHODS

    p = sub.add_parser("compare", help="accuracy, agreement, size and latency of .tflite models side by side",
                       description="Run .tflite models (with their .tflite.json sidecars) on the same labelled "
                                   "images; the first model is the reference for top-1 agreement and SQNR.")
    p.add_argument("models", nargs="+", help=".tflite files; the first is the reference")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="a folder with one subfolder per class, a flat image folder or .npy (no accuracy), or "
                        "'mnist5k' (the 5,000 offline MNIST digits)")
    p.add_argument("--limit", type=int, metavar="N", help="use at most N images, spread over the classes")
    p.add_argument("--threads", type=int, default=1, help="threads for the latency measurement (default 1)")
    p.add_argument("--runs", type=int, default=30, help="timed rounds (default 30)")
    p.add_argument("--csv", help="write the rows to this CSV file")
    p.add_argument("--md", help="write the markdown table to this file")
    p.set_defaults(run=_cmd_compare)

    p = sub.add_parser("ptq", help="post-training full-int8 TFLite with calibrated ranges (min/max, percentile, MSE)",
                       description="Full-int8 export with activation ranges chosen from calibration data, verified "
                                   "against the JAX model before it is written.")
    p.add_argument("--model", required=True, help="NAME[.tag], e.g. tf_efficientnet_lite0")
    p.add_argument("--calibration", required=True, metavar="DATA",
                   help="calibration images: a folder, a .npy of normalized float NHWC arrays, or 'mnist5k'")
    p.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS,
                   help=f"how activation ranges are chosen (default {DEFAULT_METHOD})")
    p.add_argument("--num-calibration", type=int, default=200, metavar="N",
                   help="use at most N calibration inputs (default 200)")
    p.add_argument("--verify", metavar="DATA", help="verify on these inputs (same forms as --calibration)")
    p.add_argument("--min-agreement", type=float, metavar="FRAC",
                   help="fail if top-1 agreement with JAX on the verify inputs is below FRAC")
    p.add_argument("--int8-io", action="store_true", help="int8 input/output tensors instead of float")
    p.add_argument("--out", "-o", help="output .tflite path (default NAME_int8_METHOD.tflite)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=_cmd_ptq)


def _cmd_compare(args) -> int:
    from pathlib import Path

    from export.compare import CompareRow, compare_tflite, labelled_images, markdown
    from export.tables import report

    for m in args.models:
        if not Path(m).is_file():
            raise FileNotFoundError(f"no such model file: {m}")
    images, labels, _ = labelled_images(args.data, args.limit)
    models = {}
    for m in args.models:
        stem = Path(m).stem
        models[stem if stem not in models else m] = m
    rows = compare_tflite(models, images, labels, threads=args.threads, runs=args.runs)
    report(markdown(rows), rows, CompareRow, csv_path=args.csv, md_path=args.md)
    return 0


def _cmd_ptq(args) -> int:
    import zoo
    from export.ptq import calibration_data, quantize
    from export.errors import ExportError

    if args.num_calibration < 1:
        raise ValueError("--num-calibration must be at least 1")
    model = zoo.load(args.model, progress=not args.quiet)
    calib = calibration_data(args.calibration, model.cfg, args.num_calibration)
    vdata = calibration_data(args.verify, model.cfg) if args.verify else None
    out = args.out or f"{model.name.replace('.', '_')}_int8_{args.method}.tflite"
    try:
        res = quantize(model, calib, args.method, out=out, verify_data=vdata, min_agreement=args.min_agreement,
                       int8_io=args.int8_io, progress=not args.quiet)
    except ExportError as e:
        print(f"zoo ptq: error: {e}\nzoo ptq: nothing was written to {out}", file=sys.stderr)
        return 1
    if args.quiet:
        print(res.summary())
    print(f"wrote {res.path} and {res.path}.json")
    return 0
