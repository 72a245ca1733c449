"""The `zoo` command line, one module above the four packages: list, info, predict, segment and detect here; train and
export add their own subcommands.

A package contributes a subcommand by listing `(module, function)` in `_EXTENSIONS`; the function receives the
argparse sub-parsers and registers its parser with `set_defaults(run=...)`. Modules are imported only when present,
so the core CLI works without the training or export dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

_EXTENSIONS = (("train.cli", "add_commands"), ("export.cli", "add_commands"), ("export.compare_cli", "add_commands"))


def _cmd_list(args) -> int:
    import zoo

    for name in zoo.list_models(args.pattern, pretrained=args.pretrained, task=args.task):
        print(name)
    return 0


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _cmd_info(args) -> int:
    import zoo

    info = dict(zoo.model_info(args.name))
    try:  # the deploy form (re-parameterized, BatchNorm folded) needs compress, which a core install may lack
        from compress.deploy import deploy_param_count

        h, w = info["input_size"]
        info["params_deploy"] = deploy_param_count(zoo.create_model(info["name"]), (1, h, w, 3))
    except ImportError:
        info["params_deploy"] = None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    task = "" if info["task"] == "classification" else f"{info['task']}; "
    print(f"{info['name']}  ({task}{info['family']}; {info['paper']}; twin {info['twin'] or '-'})")
    print(f"  params      {info['params']:,} ({_fmt_count(info['params'])}) train form")
    if info["params_deploy"] is not None:
        print(f"              {info['params_deploy']:,} ({_fmt_count(info['params_deploy'])}) deploy form "
              "(re-parameterized, BatchNorm folded)")
    print(f"  MACs        {info['macs']:,} ({info['macs'] / 1e9:.3f} G) at {info['input_size'][0]}x{info['input_size'][1]}")
    print(f"  resolution  {info['input_size'][0]}x{info['input_size'][1]}")
    feats = ", ".join(f"{f['name']}(s{f['stride']},{f['channels']}ch)" for f in info["feature_info"])
    print(f"  features    {feats}")
    if (lat := info["tflite_latency"]) is not None:
        int8 = f"int8 {lat['int8_ms']} ms ({lat['int8_partitions']} XNNPACK partition(s))" if lat["int8_ms"] else "int8 -"
        print(f"  LiteRT      fp32 {lat['fp32_ms']} ms, {int8}; batch 1 at {lat['res']}px, {lat['threads']} thread(s), "
              f"measured on {lat['cpu']} ({lat['date']})")
    if not info["pretrained"]:
        print("  pretrained  none")
    for p in info["pretrained"]:
        scores = [f"{k} {p[key]:.2f}" for k, key in (("top-1", "top1"), ("top-5", "top5")) if p[key] is not None]
        acc = " / ".join(scores) or "accuracy n/a"  # a source may publish top-1 only (LeViT, MobileOne)
        print(f"  .{p['tag']:<22} {acc} at {p['input_size'][0]}px, license {p['license']}")
        for s in p["sources"]:
            print(f"      {s}")
    return 0


def _cmd_predict(args) -> int:
    if args.tflite and _file_task(args.tflite) == "detection":  # boxes, not classes
        return _print_detections(_detector(None, args.tflite, True), args.images, DEFAULT_SCORE_THRESHOLD)
    if args.tflite:  # an exported model: preprocessing and labels come from its sidecar metadata
        from export.cli import print_predictions

        return print_predictions(args.tflite, args.images, top_k=args.top_k)
    if not args.model:
        raise ValueError("zoo predict needs --model NAME[.tag] or --tflite MODEL.tflite")
    import zoo
    from zoo.registry import get_entry

    if get_entry(args.model).cfg.task == "detection":
        return _print_detections(_detector(args.model, None, args.quiet), args.images, DEFAULT_SCORE_THRESHOLD)
    if get_entry(args.model).cfg.task == "segmentation":  # classes by their share of the pixels
        from zoo.masks import class_fractions, describe

        seg = _JaxSegmenter(args.model, progress=not args.quiet)
        for path in args.images:
            print(f"{path}  ({seg.name}): classes by share of pixels")
            mask = seg.masks([path])[0]
            for rank, (label, frac) in enumerate(describe(class_fractions(mask, seg.cfg.num_classes), seg.labels,
                                                          args.top_k), 1):
                print(f"  {rank}. {label:<30s} {frac:6.2%}")
        return 0
    model = zoo.load(args.model, progress=not args.quiet)
    for path, top in zip(args.images, model.predict(list(args.images), top_k=args.top_k)):
        print(f"{path}  ({model.name})")
        for rank, (label, prob) in enumerate(top, 1):
            print(f"  {rank}. {label:<30s} {prob:6.2%}")
    return 0


class _JaxSegmenter:
    """A segmentation model in JAX, as `export.segment.TFLiteSegmenter` is a file: `name`, `cfg`, `labels`,
    `masks(images)`."""

    def __init__(self, name: str, weights: str | None = None, input_size=None, progress: bool = True):
        import zoo
        from zoo.registry import get_entry

        entry = get_entry(name)  # an unknown name: close matches
        if entry.cfg.task != "segmentation":
            raise ValueError(f"'{entry.name}' is a {entry.cfg.task} model; segmentation models: "
                             f"{', '.join(zoo.list_models(task='segmentation'))}")
        self.model = zoo.load(name, weights=weights, progress=progress)
        self.name = self.model.name
        self.cfg = self.model.cfg.replace(input_size=tuple(input_size)) if input_size else self.model.cfg
        self.labels = self.model.labels

    def masks(self, images):
        """(N, H, W) class indices at `cfg.input_size` of images (paths, PIL images or uint8 arrays)."""
        import numpy as np

        from zoo.preprocess import preprocess

        return np.asarray(self.model(preprocess(images, self.cfg))["out"]).argmax(-1)


def _photo(path: str):
    """An image file as an RGB uint8 array; a file that is no image is a one-line error."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _cmd_segment(args) -> int:
    from pathlib import Path

    from zoo.masks import class_fractions, describe, save, to_photo

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {', '.join(missing)}")
    if bool(args.model) == bool(args.tflite):
        raise ValueError("zoo segment needs --model NAME[.tag] or --tflite MODEL.tflite (one of them)")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha is an opacity between 0 and 1, got {args.alpha}")
    if args.tflite and (args.weights or args.input_size):
        raise ValueError("--weights and --input-size go with --model; a .tflite file has its own weights and input "
                         "size")
    if args.tflite:  # preprocessing and class names come from the file's sidecar
        from export.segment import TFLiteSegmenter

        seg = TFLiteSegmenter(args.tflite)
    else:
        seg = _JaxSegmenter(args.model, args.weights, args.input_size, progress=not args.quiet)
    out, stems, n = Path(args.out), set(), len(args.images)
    for i, path in enumerate(args.images, 1):
        photo = _photo(path)
        mask = to_photo(seg.masks([photo])[0], (photo.shape[1], photo.shape[0]), seg.cfg)
        stem, k = Path(path).stem, 1
        while stem in stems:  # two images of one name from different folders
            k += 1
            stem = f"{Path(path).stem}_{k}"
        stems.add(stem)
        overlay_path, mask_path = save(photo, mask, out, stem, seg.labels, alpha=args.alpha)
        if not args.quiet:
            top = describe(class_fractions(mask, seg.cfg.num_classes), seg.labels, 3)
            print(f"[{i}/{n}] {path} -> {overlay_path.name}, {mask_path.name}: "
                  + ", ".join(f"{label} {frac:.1%}" for label, frac in top), flush=True)
    print(f"wrote {n} overlay(s) and class mask(s) to {out} ({seg.name})")
    return 0


DEFAULT_SCORE_THRESHOLD = 0.3  # detections drawn and listed


def _file_task(path: str) -> str | None:
    from export.metadata import read

    return read(path, check_hash=False).get("task")


class _JaxDetector:
    """A detection model in JAX with its family's post-processing, as `export.detect.TFLiteDetector` is a file:
    `name`, `labels`, `detect(images, score_threshold)`."""

    def __init__(self, name: str, progress: bool = True):
        import zoo
        from export.detection import detections
        from zoo.registry import get_entry

        entry = get_entry(name)  # an unknown name: close matches
        if entry.cfg.task != "detection":
            raise ValueError(f"'{entry.name}' is a {entry.cfg.task} model; detection models: "
                             f"{', '.join(zoo.list_models(task='detection'))}")
        self.model = zoo.load(name, progress=progress)
        self.name, self.cfg, self.labels = self.model.name, self.model.cfg, self.model.labels
        self.module = detections(self.model.module, self.cfg)

    def detect(self, images, score_threshold: float):
        import numpy as np

        from export.detect import detector_input, load_rgb, to_original

        rgb = [load_rgb(im) for im in images]
        hw = tuple(self.cfg.input_size)
        out = self.module.apply(self.model.variables, detector_input(rgb, hw, self.cfg.mean, self.cfg.std))
        out = {k: np.asarray(v) for k, v in out.items()}
        return to_original(out, [im.shape[:2] for im in rgb], hw, self.labels, score_threshold)


def _detector(model: str | None, tflite: str | None, quiet: bool):
    if bool(model) == bool(tflite):
        raise ValueError("zoo detect needs --model NAME[.tag] or --tflite MODEL.tflite (one of them)")
    if tflite:  # preprocessing and class names come from the file's sidecar
        from export.detect import TFLiteDetector

        return TFLiteDetector(tflite)
    return _JaxDetector(model, progress=not quiet)


def _print_detections(det, images: list[str], score_threshold: float) -> int:
    for path, found in zip(images, det.detect([_photo(p) for p in images], score_threshold)):
        print(f"{path}  ({det.name}): {len(found)} detection(s) with score >= {score_threshold:g}")
        for d in found:
            print(f"  {d.name:<20s} {d.score:6.2%}  box " + " ".join(f"{v:.1f}" for v in d.box))
    return 0


def _draw(photo, found):
    """The photo with each detection's box and "name score" drawn, colours by class."""
    from PIL import Image, ImageDraw

    from zoo.masks import palette

    img = Image.fromarray(photo)
    draw, colours = ImageDraw.Draw(img), palette(256)
    width = max(1, round(min(img.size) / 200))
    for d in found:
        colour = tuple(int(c) for c in colours[1 + d.label % 255])
        draw.rectangle(d.box, outline=colour, width=width)
        draw.text((d.box[0] + width, d.box[1] + width), f"{d.name} {d.score:.2f}", fill=colour)
    return img


def _cmd_detect(args) -> int:
    import json
    from pathlib import Path

    missing = [p for p in args.images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such image file: {', '.join(missing)}")
    if args.tflite and not Path(args.tflite).is_file():
        raise FileNotFoundError(f"no model file {args.tflite}")
    if not 0.0 <= args.score_threshold <= 1.0:
        raise ValueError(f"--score-threshold is a score between 0 and 1, got {args.score_threshold}")
    det = _detector(args.model, args.tflite, args.quiet)
    out, stems, n = Path(args.out), set(), len(args.images)
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(args.images, 1):
        photo = _photo(path)
        found = det.detect([photo], args.score_threshold)[0]
        stem, k = Path(path).stem, 1
        while stem in stems:  # two images of one name from different folders
            k += 1
            stem = f"{Path(path).stem}_{k}"
        stems.add(stem)
        _draw(photo, found).save(out / f"{stem}.png")
        record = {"image": str(path), "model": det.name, "size": [int(photo.shape[0]), int(photo.shape[1])],
                  "score_threshold": args.score_threshold, "detections": [d.as_dict() for d in found]}
        (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
        if not args.quiet:
            print(f"[{i}/{n}] {path} -> {stem}.png, {stem}.json: {len(found)} detection(s)", flush=True)
    print(f"wrote {n} image(s) with boxes and their detections (JSON) to {out} ({det.name})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="Efficient vision models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered models")
    p.add_argument("pattern", nargs="?", help="shell-style pattern, e.g. 'mobilenetv3*'")
    p.add_argument("--pretrained", action="store_true", help="list name.tag for every pretrained tag")
    p.add_argument("--task", choices=("classification", "segmentation", "detection"),
                   help="only the models of this task")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("info", help="parameters, MACs, resolution, tags and source accuracy of a model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("predict", help="top-k classes of images (of a segmentation model: by share of the pixels; of a "
                                       "detection model: its detections)")
    p.add_argument("--model", help="NAME[.tag], e.g. tf_efficientnet_lite0 (offline weights)")
    p.add_argument("--tflite", metavar="MODEL.tflite", help="an exported model (see `zoo export`)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--quiet", action="store_true", help="no download progress bar")
    p.add_argument("images", nargs="+")
    p.set_defaults(run=_cmd_predict)

    p = sub.add_parser("segment", help="per-pixel classes of images: colour overlays and class masks (PNG)",
                       description="Segment images with a segmentation model (JAX) or an exported one (.tflite): "
                                   "OUT/<image>_overlay.png (the photo tinted by class) and OUT/<image>_mask.png "
                                   "(class indices as a palette PNG; 255 outside the center crop the model saw).")
    p.add_argument("--model", help="NAME[.tag] of a segmentation model, e.g. lraspp_mobilenet_v3_large")
    p.add_argument("--weights", metavar="FILE", help="with --model: a local checkpoint (.pth/.safetensors)")
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"),
                   help="with --model: the size images are resized and cropped to (default: the model's)")
    p.add_argument("--tflite", metavar="MODEL.tflite", help="an exported segmentation model (see `zoo export`)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the overlays and masks")
    p.add_argument("--alpha", type=float, default=0.5, help="opacity of the class colours (default 0.5)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("images", nargs="+")
    p.set_defaults(run=_cmd_segment)

    p = sub.add_parser("detect", help="boxes in images: PNGs with boxes and labels drawn, and JSON detections",
                       description="Detect objects with a detection model (JAX) or an exported one (.tflite): "
                                   "OUT/<image>.png (boxes and labels drawn) and OUT/<image>.json (boxes x0 y0 x1 y1 "
                                   "in the image's pixels, labels, scores).")
    p.add_argument("--model", help="NAME[.tag] of a detection model, e.g. ssdlite320_mobilenet_v3_large")
    p.add_argument("--tflite", metavar="MODEL.tflite", help="an exported detection model (see `zoo export`)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the images and JSON files")
    p.add_argument("--score-threshold", type=float, default=DEFAULT_SCORE_THRESHOLD,
                   help=f"lowest score kept (default {DEFAULT_SCORE_THRESHOLD})")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("images", nargs="+")
    p.set_defaults(run=_cmd_detect)

    for module_name, fn in _EXTENSIONS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue  # that package is not part of this install
            raise
        getattr(module, fn)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as e:  # one readable line for expected errors; tracebacks only with ZOO_DEBUG
        import os

        from zoo.registry import UnknownModelError
        from zoo.weights.errors import WeightsError

        if os.environ.get("ZOO_DEBUG") or not isinstance(e, (UnknownModelError, WeightsError, ValueError,
                                                              TypeError, FileNotFoundError)):
            raise
        print(f"zoo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
