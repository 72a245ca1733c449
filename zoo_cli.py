"""The `zoo` command line, one module above the four packages: list, info and predict here; train and export add
their own subcommands.

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

    for name in zoo.list_models(args.pattern, pretrained=args.pretrained):
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
    print(f"{info['name']}  ({info['family']}; {info['paper']}; twin {info['twin'] or '-'})")
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
    if args.tflite:  # an exported model: preprocessing and labels come from its sidecar metadata
        from export.cli import print_predictions

        return print_predictions(args.tflite, args.images, top_k=args.top_k)
    if not args.model:
        raise ValueError("zoo predict needs --model NAME[.tag] or --tflite MODEL.tflite")
    import zoo

    model = zoo.load(args.model, progress=not args.quiet)
    for path, top in zip(args.images, model.predict(list(args.images), top_k=args.top_k)):
        print(f"{path}  ({model.name})")
        for rank, (label, prob) in enumerate(top, 1):
            print(f"  {rank}. {label:<30s} {prob:6.2%}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="Efficient vision models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registered models")
    p.add_argument("pattern", nargs="?", help="shell-style pattern, e.g. 'mobilenetv3*'")
    p.add_argument("--pretrained", action="store_true", help="list name.tag for every pretrained tag")
    p.set_defaults(run=_cmd_list)

    p = sub.add_parser("info", help="parameters, MACs, resolution, tags and source accuracy of a model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_info)

    p = sub.add_parser("predict", help="top-k ImageNet classes of images")
    p.add_argument("--model", help="NAME[.tag], e.g. tf_efficientnet_lite0 (offline weights)")
    p.add_argument("--tflite", metavar="MODEL.tflite", help="an exported model (see `zoo export`)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--quiet", action="store_true", help="no download progress bar")
    p.add_argument("images", nargs="+")
    p.set_defaults(run=_cmd_predict)

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
