"""`zoo train` and `zoo eval`: registered into the zoo command line by `add_commands(sub)`.

    zoo train --model tf_efficientnet_lite0 --data folder:~/photos --steps 300 --workdir runs/photos
    zoo train --config mnist5k_lite0 --data folder:digits --set optim.lr=2e-3 --set data.batch_size=32
    zoo train --config mnist5k_lite0 --print-config        # every key --set accepts, with its value
    zoo eval --workdir runs/photos                          # the run's best checkpoint on its eval split
    zoo eval --model mobilenet_v2 --data folder:~/val       # any zoo model on a folder

Running `zoo train` again with the same workdir resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

# convenience flags -> config keys (everything else: --set KEY=VALUE)
_FLAGS = {
    "model": "model.name", "data": "data.source", "workdir": "workdir", "steps": "steps", "epochs": "epochs",
    "batch_size": "data.batch_size", "lr": "optim.lr", "image_size": "data.image_size", "seed": "seed",
    "teacher": "distill.teacher",
}


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="fine-tune, train or distill a model (resumes from the workdir)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a shipped recipe (see --list-configs)")
    p.add_argument("--list-configs", action="store_true", help="list shipped recipes with their promises")
    p.add_argument("--model", help="NAME[.tag] of a zoo model")
    p.add_argument("--data", help="tfds:NAME, folder:PATH or a folder path (PATH/train, PATH/test when present)")
    p.add_argument("--workdir")
    p.add_argument("--steps", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--image-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--teacher", help="distill from this zoo model (NAME[.tag]) or finished run (workdir)")
    p.add_argument("--scratch", action="store_true", help="random init instead of pretrained weights")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set optim.freeze='^stem/'")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a finished run or a zoo model on a dataset")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a training run (its best checkpoint, its eval data unless --data)")
    src.add_argument("--model", help="NAME[.tag] of a zoo model with pretrained weights")
    p.add_argument("--which", choices=("best", "latest"), default="best")
    p.add_argument("--data", help="tfds:NAME, folder:PATH or a folder path")
    p.add_argument("--split", default=None, help="split to evaluate (default: the run's eval split, else 'test')")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--crop-pct", type=float, default=None)
    p.add_argument("--gray-to-rgb", action="store_true")
    p.add_argument("--data-dir", help="tfds data directory (default: the run's, else tfds's own)")
    p.add_argument("--image-key", help="tfds feature of the images (default: the run's, else 'image')")
    p.add_argument("--label-key", help="tfds feature of the class ids (default: the run's, else 'label')")
    p.add_argument("--mask-key", help="tfds feature of per-pixel class ids for a segmenter, e.g. segmentation_mask "
                                      "(default: the run's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_eval)


def resolve_config(args):
    from train.config import TrainConfig, apply_overrides
    from train.configs import get_config

    cfg = get_config(args.config) if args.config else TrainConfig()
    flags = {key: getattr(args, name) for name, key in _FLAGS.items() if getattr(args, name, None) is not None}
    if getattr(args, "scratch", False):
        flags["model.pretrained"] = "false"
    if getattr(args, "no_progress", False):
        flags["progress"] = "false"
    cfg = apply_overrides(cfg, {k: str(v) for k, v in flags.items()})
    return apply_overrides(cfg, args.overrides)


def _cmd_train(args) -> int:
    from train.checkpoint import CheckpointError
    from train.config import to_dict
    from train.configs import PRESETS, describe

    if args.list_configs:
        for name in sorted(PRESETS):
            print(f"{name}\n  " + describe(name).replace("\n", "\n  ") + "\n")
        return 0
    cfg = resolve_config(args)
    if args.print_config:
        print(json.dumps(to_dict(cfg), indent=2))
        return 0
    from train.loop import NonFiniteError, fit

    try:
        result = fit(cfg)
    except (CheckpointError, NonFiniteError) as e:
        print(f"zoo train: error: {e}", file=sys.stderr)
        return 2
    summary = {"workdir": str(result.workdir), "steps": int(result.state.step), **result.metrics}
    print(json.dumps(summary))
    return 0


def _source_keys(args, data_cfg) -> dict:
    """How `zoo eval --data` reads a tfds dataset: the flags, else the run's data config, else the defaults."""
    keys = {"data_dir": None, "image_key": "image", "label_key": "label", "mask_key": None}
    return {k: getattr(args, k) or (getattr(data_cfg, k) if data_cfg is not None else None) or default
            for k, default in keys.items()}


def _cmd_eval(args) -> int:
    import zoo
    from train.checkpoint import CheckpointError, Checkpoints
    from train.config import from_dict
    from train.loop import evaluate, load_run, open_data, task_of

    split = args.split
    try:
        if args.workdir:
            model = load_run(args.workdir, which=args.which)
            ckpt = Checkpoints(args.workdir, read_only=True)
            meta = ckpt.read_meta(which="best" if ckpt.latest_step("best") is not None else "latest")
            ckpt.close()
            cfg = from_dict(meta["config"])
            if args.data:
                data = args.data
            else:
                if split:
                    cfg.data.eval_split = split
                _, data = open_data(cfg)
                if data is None:
                    raise ValueError(f"the run in {args.workdir} has no evaluation split; pass --data and --split")
            kw = dict(class_names=meta.get("class_names") or None, task=task_of(cfg, model.cfg.num_classes),
                      batch_size=args.batch_size or cfg.data.eval_batch_size or cfg.data.batch_size,
                      image_size=args.image_size, crop_pct=args.crop_pct or cfg.data.eval_crop_pct,
                      gray_to_rgb=args.gray_to_rgb or cfg.data.gray_to_rgb,
                      source_options=_source_keys(args, cfg.data))
        else:
            if not args.data:
                raise ValueError("--model needs --data")
            model, data = zoo.load(args.model), args.data
            kw = dict(batch_size=args.batch_size or 64, image_size=args.image_size, crop_pct=args.crop_pct,
                      gray_to_rgb=args.gray_to_rgb, source_options=_source_keys(args, None))
        metrics = evaluate(model, data, split=split or "test", **kw)
    except CheckpointError as e:
        print(f"zoo eval: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            print(f"{k:10s} {v:.4f}")
    return 0
