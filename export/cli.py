"""`zoo export` and `zoo bench`: registered into the zoo command line by `add_commands(sub)` (see zoo_cli.py).

    zoo export --model tf_efficientnet_lite0 --quantization int8 --calibration photos/ --out lite0_int8.tflite
    zoo export --model mobilevit_xxs --random-weights --input-size 256 256 --out mvit.tflite
    zoo bench lite0_int8.tflite --threads 1,2,4 --csv latency.csv
"""

from __future__ import annotations

import sys

SENSITIVITY_VERIFY = 32  # calibration inputs --sensitivity measures on when --verify is not given


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="export a model to TFLite, verified against JAX in the LiteRT interpreter",
                       description="Export a model to a .tflite file (plus a .tflite.json sidecar with its "
                                   "preprocessing and labels), verified against the JAX model before it is written.")
    p.add_argument("--model", required=True, help="NAME[.tag] (e.g. tf_efficientnet_lite0, mobilenet_v2.imagenet1k_v1)")
    p.add_argument("--quantization", "-q", default="fp32", choices=("fp32", "fp16", "dynamic", "int8"),
                   help="fp32 (default), fp16 weights, dynamic-range int8 weights, or full int8 (needs --calibration)")
    p.add_argument("--calibration", metavar="DATA",
                   help="calibration inputs: a folder of images (preprocessed as the model expects) or a .npy of "
                        "normalized float NHWC arrays; needed by int8, optional for dynamic (bias correction)")
    p.add_argument("--num-calibration", type=int, default=200, metavar="N",
                   help="use at most N calibration inputs (default 200)")
    p.add_argument("--calibration-method", default="minmax", choices=("minmax", "percentile", "mse"),
                   help="int8 activation ranges from the calibration data: the converter's min/max (default), a "
                        "percentile of each tensor, or the range with the least quantization error")
    p.add_argument("--no-bias-correction", action="store_true",
                   help="keep the float kernels and biases as they are (default: with calibration data, kernels are "
                        "put on the int8 grid and biases corrected for the rounding's mean error)")
    p.add_argument("--no-equalization", action="store_true",
                   help="int8: keep the channel scales as they are (default: scales moved across ReLU/ReLU6 into the "
                        "BatchNorm before them, so activation channels share their per-tensor int8 range better)")
    p.add_argument("--split-top-row", metavar="STAGES|auto|none", default="auto",
                   help="int8: carry these stages' residual streams (a regex over module paths, e.g. stages_5/) as "
                        "two int8 tensors, first row and other rows, each with its own scale; 'auto' (default): the "
                        "stages whose first row is >= 3x larger than the others on the calibration data; 'none': no "
                        "split (export.row_split; MobileNetV2: 89%% -> 97%% top-1 agreement)")
    p.add_argument("--verify", metavar="DATA", help="verify on these inputs (folder or .npy; default: 8 calibration "
                   "inputs for int8, else 8 random inputs)")
    p.add_argument("--min-agreement", type=float, metavar="FRAC",
                   help="fail a quantized export whose top-1 agreement with JAX is below FRAC (e.g. 0.95)")
    p.add_argument("--out", "-o", help="output .tflite path (default NAME_QUANTIZATION.tflite)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the model's)")
    p.add_argument("--batch", type=int, default=1, help="fixed batch size of the graph (default 1)")
    p.add_argument("--int8-io", action="store_true", help="with int8: int8 input/output tensors instead of float")
    p.add_argument("--allow-flex", action="store_true", help="accept Flex (SELECT_TF_OPS) and custom ops")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights (for models without pretrained weights, or to check export and latency)")
    p.add_argument("--weights", metavar="FILE", help="a local checkpoint (.pth/.safetensors) to load instead")
    p.add_argument("--sensitivity", nargs="?", const="all", metavar="PARTS",
                   help="with int8: also export once per top-level part (all, or comma-separated module paths "
                        "such as stem,stages_5 or stages_5/block_0) kept float and rank the parts by the SQNR gained "
                        "(export.sensitivity); written to OUT.sensitivity.csv/.md. Measured on --verify, or on the "
                        f"first {SENSITIVITY_VERIFY} calibration inputs, which then also verify OUT")
    p.add_argument("--keep-float", metavar="PARTS|auto",
                   help="with int8: keep these parts' ops float (comma-separated module paths such as stages_5,"
                        "stages_6), or 'auto': the fewest parts, in sensitivity order, that meet --min-agreement "
                        "and/or --min-sqnr on --verify (or the first "
                        f"{SENSITIVITY_VERIFY} calibration inputs) (export.mixed)")
    p.add_argument("--min-sqnr", type=float, metavar="DB", help="with --keep-float auto: the output SQNR to reach")
    p.add_argument("--max-float-parts", type=int, default=3, metavar="N",
                   help="with --keep-float auto: keep at most N parts float (default 3)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=_cmd_export)

    p = sub.add_parser("bench", help="latency of .tflite models in the LiteRT interpreter (XNNPACK)",
                       description="Median latency per thread count, warm-up excluded, interleaved rounds.")
    p.add_argument("models", nargs="+", help=".tflite files")
    p.add_argument("--threads", default="1,2,4", help="comma-separated thread counts (default 1,2,4)")
    p.add_argument("--runs", type=int, default=50, help="timed rounds (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    p.add_argument("--budget", type=float, default=None, help="stop timing after this many seconds (>= 5 rounds)")
    p.add_argument("--no-xnnpack", action="store_true", help="builtin kernels only (no XNNPACK delegate)")
    p.add_argument("--jax", action="store_true", help="also time the JAX model named in each sidecar (random "
                   "weights; jit on this CPU)")
    p.add_argument("--csv", help="write the rows to this CSV file")
    p.add_argument("--md", help="write the markdown table to this file")
    p.set_defaults(run=_cmd_bench)


def _load_model(args):
    import zoo
    from zoo.registry import get_entry

    if args.random_weights:
        from export.weights import random_variables

        entry = get_entry(args.model)
        cfg = entry.cfg
        module = zoo.create_model(entry.name)
        variables = random_variables(module, (1, *cfg.input_size, cfg.in_chans))
        return zoo.Model(module, variables, cfg, None)
    try:
        return zoo.load(args.model, weights=args.weights, progress=not args.quiet)
    except ValueError as e:
        if "no pretrained weights" in str(e):
            raise ValueError(f"{e} (zoo export: --random-weights)") from None
        raise


def _cmd_export(args) -> int:
    from export.calibration import load_data
    from export.errors import ExportError
    from export.tflite import to_tflite

    if args.quantization == "int8" and not args.calibration:
        raise ValueError("--quantization int8 needs --calibration DATA (a folder of images or a .npy)")
    if args.sensitivity and args.quantization != "int8":
        raise ValueError("--sensitivity ranks the parts of a full-int8 export: use it with --quantization int8")
    if args.calibration and args.quantization not in ("int8", "dynamic"):
        raise ValueError("--calibration is only used with --quantization int8 or dynamic")
    if args.split_top_row not in ("auto", "none") and args.quantization != "int8":
        raise ValueError("--split-top-row is a full-int8 rewrite: use it with --quantization int8")
    split = None if args.split_top_row == "none" else args.split_top_row
    _check_keep_float(args)
    model = _load_model(args)
    hw = tuple(args.input_size) if args.input_size else tuple(model.cfg.input_size)
    cfg = model.cfg.replace(input_size=hw)
    calib = None
    if args.calibration:
        calib = load_data(args.calibration, cfg, args.num_calibration, progress=not args.quiet)
    vdata = load_data(args.verify, cfg, progress=not args.quiet) if args.verify else None
    auto = args.keep_float == "auto"
    if (args.sensitivity or auto) and vdata is None:  # the ranking and the written file's check: the same inputs
        vdata = calib[:SENSITIVITY_VERIFY]
    out = args.out or f"{model.name.replace('.', '_')}_{args.quantization}.tflite"
    options = dict(representative_data=calib, input_hw=hw, batch=args.batch, int8_io=args.int8_io,
                   allow_flex=args.allow_flex, verify_data=vdata, progress=not args.quiet,
                   bias_correction=not args.no_bias_correction, equalization=not args.no_equalization,
                   **({"calibration": args.calibration_method} if args.quantization == "int8" else {}),
                   int8_split_top_row=split)
    try:
        if auto:
            from export.mixed import mixed_int8

            mixed = mixed_int8(model, min_agreement=args.min_agreement, min_sqnr_db=args.min_sqnr, out=out,
                               max_float_parts=args.max_float_parts, **options)
            res = mixed.export
            print(f"kept float: {', '.join(mixed.kept_float) or 'nothing (all int8 meets the target)'}")
        else:
            if args.keep_float:
                options["int8_keep_float"] = _keep_float_pattern(model, args.keep_float, hw)
            res = to_tflite(model, quantization=args.quantization, out=out, min_agreement=args.min_agreement,
                            **options)
    except ExportError as e:
        print(f"zoo export: error: {e}\nzoo export: nothing was written to {out}", file=sys.stderr)
        return 1
    if args.quiet:
        print(res.summary())
    if args.quantization == "int8":
        print(f"split by rows: {res.metadata['int8_split_top_row'] or 'no stage (none has a border-heavy stream)'}")
    print(f"wrote {res.path} and {res.path}.json")
    if args.sensitivity:
        _sensitivity(model, calib, vdata, hw, out, args, baseline=res)
    return 0


def _check_keep_float(args) -> None:
    if args.keep_float and args.quantization != "int8":
        raise ValueError("--keep-float keeps parts of a full-int8 export float: use it with --quantization int8")
    if args.min_sqnr is not None and args.keep_float != "auto":
        raise ValueError("--min-sqnr is the target of --keep-float auto")
    if args.keep_float == "auto" and args.min_agreement is None and args.min_sqnr is None:
        raise ValueError("--keep-float auto needs a target: --min-agreement FRAC and/or --min-sqnr DB")
    if args.keep_float and args.sensitivity:
        raise ValueError("--keep-float and --sensitivity: choose one (the sensitivity rows keep one part float each)")


def _keep_float_pattern(model, keep_float: str, hw) -> str | None:
    from export.sensitivity import check_parts, model_parts, parts_pattern
    from export.tflite import int8_float_pattern

    parts = [p.strip() for p in keep_float.split(",") if p.strip()]
    top = model_parts(model.module, model.variables, (1, *hw, model.cfg.in_chans))
    default = int8_float_pattern(model.module, model.variables, (1, *hw, model.cfg.in_chans))
    return parts_pattern(check_parts(parts, top, model.variables), default)


def _sensitivity(model, calib, vdata, hw, out, args, baseline) -> None:
    from export.sensitivity import PartSensitivity, int8_sensitivity, markdown
    from export.tables import report

    parts = None if args.sensitivity == "all" else [p.strip() for p in args.sensitivity.split(",") if p.strip()]
    rows = int8_sensitivity(model, parts=parts, representative_data=calib, verify_data=vdata, baseline=baseline,
                            input_hw=hw, batch=args.batch, int8_io=args.int8_io, allow_flex=args.allow_flex,
                            calibration=args.calibration_method, bias_correction=not args.no_bias_correction,
                            equalization=not args.no_equalization, progress=not args.quiet)  # baseline's row split
    stem = str(out).removesuffix(".tflite")
    report(markdown(rows), rows, PartSensitivity, csv_path=f"{stem}.sensitivity.csv", md_path=f"{stem}.sensitivity.md")


def _cmd_bench(args) -> int:
    from pathlib import Path

    from export import latency
    from export.tables import report

    try:
        threads = tuple(int(t) for t in args.threads.split(",") if t.strip())
    except ValueError:
        raise ValueError(f"--threads must be comma-separated integers, got {args.threads!r}") from None
    if not threads or min(threads) < 1:
        raise ValueError("--threads needs at least one positive thread count")
    paths = {}
    for m in args.models:
        p = Path(m)
        if not p.is_file():
            raise FileNotFoundError(f"no such model file: {p}")
        paths[p.stem if p.stem not in paths else str(p)] = p
    rows = latency.benchmark_many(paths, threads, args.runs, args.warmup, args.budget, xnnpack=not args.no_xnnpack)
    if args.jax:
        rows += _jax_rows(paths, args)
    report(latency.markdown(rows), rows, latency.Latency, csv_path=args.csv, md_path=args.md)
    return 0


def _jax_rows(paths, args):
    import zoo
    from export import latency
    from export.metadata import read
    from export.weights import random_variables

    rows = []
    for label, p in paths.items():
        meta = read(p, check_hash=False)
        module = zoo.create_model(meta["model"], num_classes=meta["num_classes"])
        hw = tuple(meta["input_hw"])
        variables = random_variables(module, (meta["batch"], *hw, meta.get("in_chans", 3)))
        rows.append(latency.benchmark_jax(module, variables, input_hw=hw, batch=meta["batch"], runs=args.runs,
                                          budget_s=args.budget, name=f"{label} (jax)"))
    return rows


def print_predictions(model_path: str, images: list[str], top_k: int = 5, out=None) -> int:
    """`zoo predict --tflite MODEL IMAGE...`: the same output as `zoo predict`, from an exported model (a segmentation
    model's: the classes by their share of the pixels, `print_pixel_fractions`)."""
    from pathlib import Path

    from export.metadata import predict_tflite, read

    out = out or sys.stdout
    meta = read(model_path, check_hash=False)
    if meta.get("task") == "segmentation":
        return print_pixel_fractions(model_path, images, top_k, out)
    name = meta["name"]
    for path, top in zip(images, predict_tflite(model_path, list(images), top_k=top_k)):
        print(f"{path}  ({name}, {Path(model_path).name})", file=out)
        for rank, (label, prob) in enumerate(top, 1):
            print(f"  {rank}. {label:<30s} {prob:6.2%}", file=out)
    return 0


def print_pixel_fractions(model_path: str, images: list[str], top_k: int = 5, out=None) -> int:
    """`zoo predict --tflite SEG.tflite IMAGE...`: per image, the `top_k` classes by their share of the pixels the
    exported segmentation model labels (its input: the photo resized and cropped as the sidecar says)."""
    from pathlib import Path

    from export.segment import TFLiteSegmenter
    from zoo.masks import class_fractions, describe

    out = out or sys.stdout
    seg = TFLiteSegmenter(model_path)
    for path in images:
        mask = seg.masks([path])[0]
        print(f"{path}  ({seg.name}, {Path(model_path).name}): classes by share of pixels", file=out)
        for rank, (label, frac) in enumerate(describe(class_fractions(mask, seg.cfg.num_classes), seg.labels,
                                                      top_k), 1):
            print(f"  {rank}. {label:<30s} {frac:6.2%}", file=out)
    return 0
