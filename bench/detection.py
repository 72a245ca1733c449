"""Detection benchmark on offline digit canvases: the zoo's SSDLite and anchor-free GFL-Lite against torchvision's
SSDLite under one training budget, and the two zoo detectors exported to fp32 and dynamic-range TFLite, each file's
COCO mAP beside its float model's.

    ZOO_OFFLINE=1 python bench/detection.py                         # 300 steps a model, ~16 min on 2 cores
    ZOO_OFFLINE=1 python bench/detection.py --quick                 # ~3.5 min: 5 steps, tiny splits, short timings
    ZOO_OFFLINE=1 python bench/detection.py --steps 150 --torch-threads 1            # CPUs shared
    ZOO_OFFLINE=1 python bench/detection.py --gfl gfl_lite320_mobilenetv2_100 --res 96

Data: `train.datasets.digit_canvases` of `mnist5k` (1-3 MNIST digits on textured `--res` x `--res` canvases, 10
classes; training and validation canvases paste disjoint digit images), written once as COCO JSON
(`train.box_sources.write_coco`, `<workdir>/canvases_*/{train,val}`) and read by all three through the same
detection-task transforms.

(a) Training, side by side, all from random initialization (no ImageNet backbone: only MobileNetV2's file installs
    offline, MobileNetV3's does not, so none gets one):
    - `ssdlite320_mobilenet_v3_large` (zoo) in the shared loop (`train.fit`, task `detection`: SSD matching, smooth-L1
      + cross-entropy with 3:1 hard negative mining, torchvision's recipe), 11 classes (background + 10);
    - `--gfl` (zoo, default `gfl_lite320_mobilenetv3_large_100`: the same MobileNetV3-Large trunk as the SSDLites,
      with a PAN neck and a GFL head; ATSS assignment, QFL + GIoU + DFL), 10 classes;
    - torchvision's `ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=11)` in a plain
      PyTorch loop. Its `SSD` fixes 320x320 inputs through its `GeneralizedRCNNTransform`; here that transform is
      replaced by one of fixed size `--res` (and identity normalization, since the task's transform already
      normalizes by SSDLite's mean/std 0.5): backbone, extra blocks, default boxes and heads are torchvision's own, and
      its `DefaultBoxGenerator` lays the boxes on the maps it is given, as the zoo's `ssdlite.anchors` does.
    One budget for all: steps, batch, input size, AdamW (decay on kernels only, as the loop's default), one-cycle
    schedule (cosine, 25% warm-up, optax's and PyTorch's div factors, no momentum cycling), peak lr, weight decay, and
    the `digits_gfl_lite` recipe's training transform (random resized crop of 60-100% of a canvas, no flips, boxes
    moved and clipped, boxes a crop empties dropped). Reported: validation COCO mAP and AP50 (`train.coco_eval`,
    each model's own decoding and NMS), training wall time (JAX's includes compiling the step) and the steady rate.
(b) Export: the two trained zoo detectors by `export.to_tflite` in fp32 and dynamic range (int8 weights), decoding
    and NMS inside the file (full int8 of a detector is refused by the exporter), each verified against JAX; every
    file's mAP and AP50 on all validation canvases by the same evaluator, and LiteRT latency (XNNPACK, batch 1,
    `--threads`, median of interleaved rounds).

Writes `bench/results/detection.csv`, `.md` (tables, command, machine, date) and `.png` (mAP of each model and file).
"""

from __future__ import annotations

import argparse
import csv
import os
import shlex
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

from report import FRAMEWORKS, log, machine, pyplot, steady_rate, versions

PACKAGES = (*FRAMEWORKS, "faster-coco-eval")  # the versions the results record

RESULTS = Path(__file__).resolve().parent / "results"
DIGITS = tuple(str(d) for d in range(10))
SSD = "ssdlite320_mobilenet_v3_large"
GFL = "gfl_lite320_mobilenetv3_large_100"
FIELDS = ("table", "framework", "model", "head", "init", "format", "steps", "batch", "res", "val_canvases", "map",
          "ap50", "ap75", "float_map", "train_s", "train_img_s", "size_mb", "latency_ms", "partitions", "threads",
          "others_cpu")
DEFAULTS = dict(steps=300, train=2000, val=300, runs=50, budget=8.0)
QUICK = dict(steps=5, train=64, val=32, runs=10, budget=2.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run: " + ", ".join(
        f"{k} {v}" for k, v in QUICK.items()))
    p.add_argument("--steps", type=int, help=f"training steps of every model (default {DEFAULTS['steps']})")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32, the recipe's)")
    p.add_argument("--res", type=int, default=64, help="canvas side and input size (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3, the recipe's)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default 1e-4)")
    p.add_argument("--train", type=int, help=f"training canvases (default {DEFAULTS['train']})")
    p.add_argument("--val", type=int, help=f"validation canvases (default {DEFAULTS['val']})")
    p.add_argument("--gfl", default=GFL, help=f"the anchor-free preset (default {GFL})")
    p.add_argument("--no-torch", action="store_true", help="skip torchvision's SSDLite")
    p.add_argument("--no-export", action="store_true", help="skip (b)")
    p.add_argument("--torch-threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch.set_num_threads (default: the usable CPUs)")
    p.add_argument("--threads", type=int, default=1, help="LiteRT threads for latency (default 1)")
    p.add_argument("--runs", type=int, help=f"max timed latency rounds (default {DEFAULTS['runs']})")
    p.add_argument("--budget", type=float, help=f"seconds of timed latency rounds (default {DEFAULTS['budget']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="runs/detection_bench", help="canvases and training runs")
    p.add_argument("--out", default=str(RESULTS / "detection"), help="output path without suffix")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("steps", "batch", "res", "train", "val", "torch_threads", "threads", "runs"):
        if getattr(args, k) < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.batch > args.train:
        raise SystemExit(f"--batch {args.batch} exceeds the {args.train} training canvases")
    if args.res < 32:
        raise SystemExit(f"--res {args.res}: below 32 the stride-32 maps vanish")
    return args


def check_models(names) -> None:
    """Unknown or non-detection names fail before any training."""
    import zoo

    known = set(zoo.list_models(task="detection"))
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"{bad} are not detection models; choose from {sorted(known)}")


def canvases(args, workdir: Path) -> Path:
    """The digit canvases of this size as COCO JSON (`root/train`, `root/val`), written once."""
    from train.box_sources import write_coco
    from train.datasets.digit_canvases import digit_canvases, mnist5k

    root = workdir / f"canvases_{args.train}_{args.val}_{args.res}_seed{args.seed}"
    if not all((root / s / "instances.json").is_file() for s in ("train", "val")):
        t0 = time.perf_counter()
        train_digits, val_digits = mnist5k()
        for split, digits, n, seed in (("train", train_digits, args.train, args.seed),
                                       ("val", val_digits, args.val, args.seed + 1)):
            cs = digit_canvases(n, digits, size=args.res, seed=seed)
            write_coco(root / split, [c.image for c in cs], [c.boxes for c in cs], [c.classes for c in cs], DIGITS)
        log(f"wrote {args.train} + {args.val} canvases to {root} in {time.perf_counter() - t0:.0f} s")
    return root


def num_classes(name: str) -> int:
    """An SSD's classes include the background (class 0); the anchor-free head's do not."""
    return len(DIGITS) + 1 if name.startswith("ssdlite") else len(DIGITS)


def recipe(args, name: str, workdir: Path, root: Path):
    """`digits_gfl_lite` for `name` with this run's budget, from scratch (no backbone weights, nothing frozen); the
    workdir is emptied so that the run trains and its wall time is real. No evaluation in the loop: every model is
    scored afterwards by the same code (`float_scores`)."""
    from train.configs import get_config

    cfg = get_config("digits_gfl_lite")
    cfg.model.name, cfg.model.pretrained, cfg.model.num_classes = name, False, num_classes(name)
    cfg.model.backbone_weights, cfg.optim.freeze = None, ""
    cfg.workdir, cfg.steps, cfg.eval_every, cfg.log_every = str(workdir), args.steps, 0, max(1, args.steps // 10)
    cfg.data.source, cfg.data.image_size, cfg.data.batch_size = f"folder:{root}", args.res, args.batch
    cfg.data.eval_split = None
    cfg.optim.lr, cfg.optim.weight_decay, cfg.seed = args.lr, args.weight_decay, args.seed
    cfg.progress, cfg.tensorboard, cfg.plot = False, False, False
    shutil.rmtree(workdir, ignore_errors=True)
    return cfg


def transforms_of(cfg, model_cfg, res: int):
    """(train, eval) transforms of the detection task at the run's size: the ones the loop itself applies."""
    from train.loop import transforms

    return transforms(cfg, model_cfg.replace(input_size=(res, res)))


def val_data(root: Path, eval_tf):
    """(normalized float NHWC validation images, ground truth per image for `coco_box_metrics`)."""
    import numpy as np

    from train.sources import open_source

    src = open_source(f"folder:{root}", "val")
    images, truth = [], []
    for i in range(len(src)):
        ex = src.example(i)
        out = eval_tf(ex, None)
        if tuple(out["orig_size"]) != tuple(out["image"].shape[:2]):
            raise RuntimeError(f"canvas {i} is {tuple(out['orig_size'])}, the input {out['image'].shape[:2]}")
        images.append(out["image"])
        truth.append({"boxes": np.asarray(ex["boxes"], np.float32), "classes": np.asarray(ex["classes"])})
    return np.stack(images), truth


def coco(truth, found) -> dict:
    """COCO box metrics of per-image detections (`boxes`, `scores`, `labels` as data classes 0-9, `valid`)."""
    from train.coco_eval import coco_box_metrics

    return coco_box_metrics(truth, found, categories=range(len(DIGITS)))


def per_image(out: dict, background: bool) -> list[dict]:
    """Batched detections (`boxes`, `classes`, `scores`, `valid`: an exported file's outputs) -> one dict per image,
    labels as data classes (an SSD's class k + 1 is the data's k)."""
    import numpy as np

    return [{"boxes": np.asarray(out["boxes"][i]), "scores": np.asarray(out["scores"][i]),
             "labels": np.asarray(out["classes"][i]).astype(np.int64) - int(background),
             "valid": np.asarray(out["valid"][i]).astype(bool)} for i in range(len(out["boxes"]))]


def float_scores(model, res: int, val_x, truth) -> dict:
    """COCO metrics of the float JAX model through the same decoding and NMS the export writes (`Detections`)."""
    import jax
    import numpy as np

    from export.detection import detections

    det = detections(model.module, model.cfg.replace(input_size=(res, res)))
    fn = jax.jit(lambda x: det.apply(model.variables, x))
    chunk, outs = 50, []
    for i in range(0, len(val_x), chunk):
        x = val_x[i:i + chunk]
        pad = np.concatenate([x, np.repeat(x[-1:], chunk - len(x), 0)]) if len(x) < chunk else x
        outs.append({k: np.asarray(v)[:len(x)] for k, v in fn(pad).items()})
    out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    return coco(truth, per_image(out, model.cfg.family == "ssdlite"))


def train_jax(args, name: str, runs: Path, root: Path) -> dict:
    """Train `name` from random weights in the shared loop; its float metrics, wall time and the trained model."""
    import train
    import zoo
    from export.latency import OtherLoad

    model = zoo.load(name, pretrained=False, num_classes=num_classes(name), seed=args.seed)
    cfg = recipe(args, name, runs / name, root)
    t0, load = time.perf_counter(), OtherLoad()
    run = train.fit(cfg, model=model)
    wall, others = time.perf_counter() - t0, load.cpus()
    _, eval_tf = transforms_of(cfg, run.model.cfg, args.res)
    val_x, truth = val_data(root, eval_tf)
    m = float_scores(run.model, args.res, val_x, truth)
    log(f"  JAX {name}: mAP {m['map']:.3f}, AP50 {m['ap50']:.3f}, {wall:.0f} s")
    return {"model": run.model, "cfg": cfg, "map": m["map"], "ap50": m["ap50"], "ap75": m["ap75"],
            "train_s": round(run.train_seconds, 1), "wall_s": round(wall, 1), "img_s": steady_rate(run.history),
            "others_cpu": others, "val_x": val_x, "truth": truth}


def torch_batches(src, train_tf, args):
    """Training batches (NCHW float images, per-image (boxes, classes)) for `args.steps` steps: seeded epoch
    permutations, each example through the task's training transform with its own seeded generator, the next batch
    prepared in a thread while the current one trains (as the loop's loader prefetches)."""
    import numpy as np

    n, per_epoch = len(src), len(src) // args.batch

    def batch(step: int):
        epoch, k = divmod(step, per_epoch)
        idx = np.random.default_rng([args.seed, epoch]).permutation(n)[k * args.batch:(k + 1) * args.batch]
        exs = [train_tf(src.example(int(i)), np.random.default_rng([args.seed, step, j])) for j, i in enumerate(idx)]
        images = np.stack([e["image"] for e in exs]).transpose(0, 3, 1, 2)
        targets = [(np.asarray(e["boxes"], np.float32).reshape(-1, 4), np.asarray(e["classes"], np.int64))
                   for e in exs]
        return np.ascontiguousarray(images, np.float32), targets

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(batch, 0)
        for step in range(args.steps):
            current = pending.result()
            if step + 1 < args.steps:
                pending = pool.submit(batch, step + 1)
            yield current


def torch_ssdlite(res: int):
    """torchvision's SSDLite320 on MobileNetV3-Large, random weights, 11 classes, its fixed-size transform rebuilt
    for `res` x `res` inputs that arrive normalized (see the module doc)."""
    import torchvision
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    net = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=len(DIGITS) + 1)
    net.transform = GeneralizedRCNNTransform(res, res, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], size_divisible=1,
                                             fixed_size=(res, res))
    return net


def train_torch(args, root: Path, cfg, model_cfg) -> dict:
    """torchvision's SSDLite from random weights under the same budget as the loop's runs (see the module doc)."""
    import numpy as np
    import torch

    from export.latency import OtherLoad
    from train.sources import open_source

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.torch_threads)
    net = torch_ssdlite(args.res)
    decay = [p for p in net.parameters() if p.ndim > 1]  # the loop decays kernels only (decay_norm_and_bias=False)
    rest = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    # optax.cosine_onecycle_schedule's shape: pct_start 0.25 (train.config's default), div 25 and 1e4, no momentum
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.25,
                                                anneal_strategy="cos", cycle_momentum=False, div_factor=25.0,
                                                final_div_factor=1e4)
    train_tf, eval_tf = transforms_of(cfg, model_cfg, args.res)
    src = open_source(f"folder:{root}", "train")
    net.train()
    t0, load = time.perf_counter(), OtherLoad()
    t_warm = None
    for step, (x, targets) in enumerate(torch_batches(src, train_tf, args)):
        if step == min(5, args.steps - 1):
            t_warm = time.perf_counter()
        images = list(torch.from_numpy(x))
        tgts = [{"boxes": torch.from_numpy(b), "labels": torch.from_numpy(c + 1)} for b, c in targets]
        losses = net(images, tgts)
        loss = losses["bbox_regression"] + losses["classification"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"torch SSDLite: loss {loss.item()} at step {step + 1}; lower --lr")
    wall, others = time.perf_counter() - t0, load.cpus()
    steady = (args.steps - min(5, args.steps - 1)) * args.batch / max(time.perf_counter() - t_warm, 1e-9)
    val_x, truth = val_data(root, eval_tf)
    net.eval()
    found = []
    with torch.inference_mode():
        for i in range(0, len(val_x), 50):
            x = torch.from_numpy(np.ascontiguousarray(val_x[i:i + 50].transpose(0, 3, 1, 2)))
            for d in net(list(x)):
                found.append({"boxes": d["boxes"].numpy(), "scores": d["scores"].numpy(),
                              "labels": d["labels"].numpy() - 1})
    m = coco(truth, found)
    log(f"  torch SSDLite: mAP {m['map']:.3f}, AP50 {m['ap50']:.3f}, {wall:.0f} s")
    return {"map": m["map"], "ap50": m["ap50"], "ap75": m["ap75"], "train_s": round(wall, 1),
            "img_s": round(steady, 1), "others_cpu": others}


def file_scores(content: bytes, val_x, truth, background: bool) -> dict:
    """A TFLite file's COCO metrics on the validation canvases (batch 1, all CPUs)."""
    from export.runtime import LiteRTRunner

    runner = LiteRTRunner(content, num_threads=len(os.sched_getaffinity(0)))
    return coco(truth, per_image(runner.run(val_x), background))


def export_rows(args, trained: dict, notes: list) -> list[dict]:
    """fp32 and dynamic-range files of every trained zoo detector: mAP against the float model's, size, latency."""
    from export import to_tflite

    files, rows = {}, []
    for name, t in trained.items():
        for fmt in ("fp32", "dynamic"):
            t0 = time.perf_counter()
            try:
                res = to_tflite(t["model"], quantization=None if fmt == "fp32" else "dynamic",
                                input_hw=(args.res, args.res), labels=DIGITS, verify_data=t["val_x"][:16],
                                progress=False)
                s = file_scores(res.content, t["val_x"], t["truth"], t["model"].cfg.family == "ssdlite")
            except Exception as e:  # one failing file must not lose the other rows
                log(f"  {name} {fmt} FAILED: {type(e).__name__}: {str(e)[:800]}")
                notes.append(f"{name} {fmt}: export FAILED with {type(e).__name__}: {str(e)[:300]}")
                continue
            log(f"  {name} {fmt}: mAP {s['map']:.3f} (float {t['map']:.3f}), AP50 {s['ap50']:.3f}, exported and "
                f"scored in {time.perf_counter() - t0:.0f} s")
            files[f"{name} {fmt}"] = res.content
            rows.append({"table": "export", "framework": "TFLite", "model": name, "head": head_of(name),
                         "init": "scratch", "format": fmt, "steps": args.steps, "batch": args.batch, "res": args.res,
                         "val_canvases": len(t["val_x"]), "map": round(s["map"], 4), "ap50": round(s["ap50"], 4),
                         "ap75": round(s["ap75"], 4), "float_map": round(t["map"], 4),
                         "size_mb": round(len(res.content) / 1e6, 2), "threads": args.threads})
    if files:
        lat = file_latency(files, args, next(iter(trained.values()))["val_x"][:1])
        for row in rows:
            row.update(lat[f"{row['model']} {row['format']}"])
    return rows


def file_latency(files: dict, args, x) -> dict:
    """Median ms of one detection (one validation canvas: network, decoding and NMS, XNNPACK, `--threads`) per file,
    the files timed in interleaved rounds (`export.latency.benchmark_many`), with the XNNPACK partitions and the CPUs
    other processes used meanwhile."""
    from export.latency import benchmark_many

    timed = benchmark_many(files, threads=(args.threads,), runs=args.runs, budget_s=args.budget, x=x)
    return {t.model: {"latency_ms": t.median_ms, "partitions": t.partitions, "others_cpu": t.others_cpu}
            for t in timed}


def head_of(name: str) -> str:
    return "SSD (anchors)" if name.startswith("ssdlite") else "GFL (anchor-free)"


def training_rows(args, trained: dict, theirs: dict | None) -> list[dict]:
    """Table (a): the zoo's runs and torchvision's."""
    common = {"table": "train", "init": "scratch", "format": "float", "steps": args.steps, "batch": args.batch,
              "res": args.res, "val_canvases": args.val}
    rows = [{**common, "framework": "JAX (zoo, train.fit)", "model": name, "head": head_of(name),
             "map": round(t["map"], 4), "ap50": round(t["ap50"], 4), "ap75": round(t["ap75"], 4),
             "train_s": t["train_s"], "train_img_s": t["img_s"], "threads": len(os.sched_getaffinity(0)),
             "others_cpu": t["others_cpu"]} for name, t in trained.items()]
    if theirs is not None:
        rows.append({**common, "framework": "PyTorch (torchvision)", "model": SSD, "head": head_of(SSD),
                     "map": round(theirs["map"], 4), "ap50": round(theirs["ap50"], 4),
                     "ap75": round(theirs["ap75"], 4), "train_s": theirs["train_s"], "train_img_s": theirs["img_s"],
                     "threads": args.torch_threads, "others_cpu": theirs["others_cpu"]})
    return rows


def markdown(rows, args, notes, elapsed) -> str:
    cmd = "ZOO_OFFLINE=1 python bench/detection.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"# Detection benchmark: digit canvases at {args.res}x{args.res}", "",
             f"Command: `{cmd.strip()}`  ", f"Machine: {machine()}  ", f"Versions: {versions(PACKAGES)}  ",
             f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; total {elapsed / 60:.1f} min  ",
             f"Budget: {args.steps} steps of batch {args.batch}, AdamW one-cycle lr {args.lr}, weight decay "
             f"{args.weight_decay}; {args.train} training / {args.val} validation canvases.", "",
             "## (a) Detectors from random weights, same budget (COCO metrics on the validation canvases)", "",
             "| framework | model | head | mAP | AP50 | AP75 | training wall s | steady img/s | threads | "
             "others' CPUs |", "|" + "---|" * 10]
    for r in (r for r in rows if r["table"] == "train"):
        lines.append(f"| {r['framework']} | {r['model']} | {r['head']} | {r['map']:.3f} | {r['ap50']:.3f} | "
                     f"{r['ap75']:.3f} | {r['train_s']:.0f} | "
                     f"{r['train_img_s'] if r['train_img_s'] is not None else '-'} | {r['threads']} | "
                     f"{r['others_cpu']} |")
    export = [r for r in rows if r["table"] == "export"]
    if export:
        lines += ["", f"## (b) TFLite files (decoding and NMS inside) against their float model, all {args.val} "
                  "validation canvases", "",
                  "| model | format | mAP file | mAP float (JAX) | AP50 file | size MB | "
                  f"latency ms ({args.threads} thread) | XNNPACK partitions | others' CPUs |", "|" + "---|" * 9]
        for r in export:
            lines.append(f"| {r['model']} | {r['format']} | {r['map']:.3f} | {r['float_map']:.3f} | "
                         f"{r['ap50']:.3f} | {r['size_mb']:.2f} | {r['latency_ms']:.2f} | {r['partitions'] or '-'} | "
                         f"{r['others_cpu']} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    train_rows = [r for r in rows if r["table"] == "train"]
    labels = [("torch " if r["framework"].startswith("PyTorch") else "zoo ") + r["model"].split("_")[0]
              for r in train_rows]
    ax1.bar(labels, [r["map"] for r in train_rows], color=[f"C{i}" for i in range(len(train_rows))])
    for i, r in enumerate(train_rows):
        ax1.annotate(f"{r['map']:.3f}\n{r['train_s']:.0f} s", (i, r["map"]), ha="center", va="bottom", fontsize=8)
    ax1.set_ylim(0, 1.3 * max([r["map"] for r in train_rows] + [0.05]))  # room for the labels
    ax1.set_ylabel("validation COCO mAP")
    ax1.set_title("(a) same budget, from scratch", fontsize=10)
    ax1.tick_params(axis="x", labelsize=8)
    export = [r for r in rows if r["table"] == "export"]
    for i, model in enumerate(dict.fromkeys(r["model"] for r in export)):
        for r in (r for r in export if r["model"] == model):
            ax2.scatter(r["latency_ms"], r["map"], color=f"C{i}", marker="o" if r["format"] == "fp32" else "s")
            ax2.annotate(f"{model.split('_')[0]} {r['format']}", (r["latency_ms"], r["map"]), fontsize=7,
                         xytext=(3, 3), textcoords="offset points")
    ax2.set_xlabel(f"TFLite latency, ms (batch 1, {export[0]['threads'] if export else 1} thread)")
    ax2.set_ylabel("validation mAP of the file")
    ax2.set_title("(b) exported files (o fp32, s dynamic range)", fontsize=10)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    models = [SSD, args.gfl]
    check_models(models)
    workdir = Path(args.workdir).expanduser().absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    root = canvases(args, workdir)
    notes, rows, trained, failed = [], [], {}, []

    for name in models:
        log(f"(a) {name}, JAX t={time.perf_counter() - t_start:.0f}s")
        try:
            trained[name] = train_jax(args, name, workdir, root)
        except Exception as e:  # one failing model must not lose the other rows
            log(f"  {name} FAILED: {type(e).__name__}: {str(e)[:800]}")
            notes.append(f"{name}: training FAILED with {type(e).__name__}: {str(e)[:300]}")
            failed.append(name)
    theirs = None
    if not args.no_torch:
        log(f"(a) {SSD}, torchvision t={time.perf_counter() - t_start:.0f}s")
        from zoo.registry import get_entry

        try:
            ssd_cfg = trained[SSD]["cfg"] if SSD in trained else recipe(args, SSD, workdir / "torch", root)
            theirs = train_torch(args, root, ssd_cfg, get_entry(SSD).cfg.replace(num_classes=num_classes(SSD)))
        except ImportError as e:
            notes.append(f"torchvision's SSDLite skipped: {e} (pip install torch torchvision)")
        except Exception as e:
            log(f"  torchvision SSDLite FAILED: {type(e).__name__}: {str(e)[:800]}")
            notes.append(f"torchvision's SSDLite: FAILED with {type(e).__name__}: {str(e)[:300]}")
            failed.append("torch")
    rows += training_rows(args, trained, theirs)
    if not args.no_export:
        log(f"(b) exports t={time.perf_counter() - t_start:.0f}s")
        rows += export_rows(args, trained, notes)

    notes += [
        "All three from random weights (ImageNet MobileNetV3-Large weights do not install offline). "
        f"Input {args.res}x{args.res}: SSDLite predicts from maps at strides 16 to 512 "
        f"({', '.join('x'.join(map(str, g)) for g in ssd_grids(args.res))} cells, six default boxes each), "
        "GFL-Lite at strides 8, 16 and 32.",
        "torchvision's SSDLite: its fixed 320x320 `GeneralizedRCNNTransform` replaced by one of "
        f"{args.res}x{args.res} with identity normalization (the inputs arrive normalized by mean/std 0.5, "
        "torchvision's own values); network, default boxes, matching and loss are torchvision's.",
        "Training wall time: JAX's includes compiling the step; torch's is its loop (data, forward, backward, "
        "update). Neither includes evaluation. Steady img/s: JAX's last logged window, torch's after its first 5 "
        "steps. Others' CPUs: CPUs other processes used meanwhile (/proc/stat).",
        "Evaluation: COCO's box metrics (`train.coco_eval`, faster-coco-eval) over the ten digit classes; each model "
        "decodes and suppresses with its own settings (SSDLite: score >= 0.001, NMS IoU 0.55, 300 detections, as "
        "torchvision's; GFL-Lite: the zoo's anchor-free defaults). The JAX rows run the same `Detections` module "
        "that the export writes.",
        "Random initializations and BatchNorm details are each framework's own; the frameworks draw batches from "
        "seeded epoch permutations through the same training transform, but not the same sequence of crops.",
        "Dynamic range: int8 weights, float activations (int8 compute where LiteRT has a hybrid kernel); full int8 of "
        "a detector is refused by the exporter (its decoding and NMS need float). Each file verified against JAX on "
        "16 validation canvases before scoring.",
        "Latency: `LiteRTRunner.run` of one validation canvas, network, decoding and NMS together; the NMS part "
        "grows with the candidates that pass the score threshold, so it depends on the trained weights (an SSDLite "
        "keeps up to 300 per class). XNNPACK partitions: the network's plus a few small ones in the decoding; the "
        "NMS loop runs on LiteRT's builtin kernels.",
    ]
    elapsed = time.perf_counter() - t_start
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, args, notes, elapsed)
    out.with_suffix(".md").write_text(table)
    if rows and plot(rows, out.with_suffix(".png")):
        log(f"wrote {out.with_suffix('.png')}")
    print(table)
    log(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')} in {elapsed:.0f} s")
    return 1 if failed else 0


def ssd_grids(res: int):
    from zoo.models.ssdlite import feature_grids

    return feature_grids((res, res))


if __name__ == "__main__":
    sys.exit(main())
