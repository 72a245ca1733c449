"""Training throughput of the zoo's loop against the same model trained in PyTorch, and the loop's own overhead.

    python bench/train_throughput.py                    # tf_efficientnet_lite0, 64x64, batch 64, 2 threads (~2 min)
    python bench/train_throughput.py --modes full --steps 20 --threads 1

For each mode (`full`: every parameter trained; `recipe`: stem and stages 0-2 frozen, as in the `mnist5k_lite0`
recipe) it measures images/second of
- `loop`: `train.fit` itself (host data pipeline from uint8 arrays with random-resized-crop, the jitted step, metrics
  every `--log-every` steps, no checkpoints), from the wall time of the steps after the first `--log-every` (which
  hold the compilation);
- `bare step`: the same compiled step `(state, batch, rng) -> (state, metrics)` called in a Python loop on one batch
  already on the device (nothing else), so `1 - loop / bare` is the loop's overhead;
- `torch`: the twin (`timm:<name>`, same architecture) with AdamW + one-cycle, cross-entropy with label smoothing,
  channels_last, the same batch and resolution, the same frozen blocks, `torch.set_num_threads(threads)`.
Bare-step and torch rounds alternate (one round = `--round` steps) and the median per round is reported, because the
machine is shared; `others_cpu` is how many CPUs other processes used meanwhile (from /proc/stat).
Threads: the process is pinned to `--threads` CPUs before jax or torch is imported (XLA:CPU sizes its pool from the
affinity mask; see bench/inference.py). Writes bench/results/train_throughput.{md,json} and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="full,recipe")
    p.add_argument("--steps", type=int, default=30, help="timed steps of the loop (after the compile window)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round", type=int, default=4, help="steps per bare/torch round")
    return p.parse_args(argv)


class OtherCpu:
    """CPUs used by other processes since `start()`: busy time in /proc/stat minus this process's CPU time."""

    def _sample(self):
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        busy = sum(vals) - vals[3] - vals[4]
        return busy / os.sysconf("SC_CLK_TCK"), time.process_time(), time.monotonic()

    def start(self):
        self._t0 = self._sample()

    def cpus(self) -> float:
        busy1, own1, wall1 = self._sample()
        busy0, own0, wall0 = self._t0
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(wall1 - wall0, 1e-9))


FROZEN = r"^(stem|stages_[0-2])/"


def zoo_measure(args, mode: str, images, labels, others: OtherCpu) -> dict:
    import jax
    import numpy as np

    import train
    from train.configs import get_config

    cfg = get_config("mnist5k_lite0")
    cfg.model.name, cfg.data.image_size, cfg.data.batch_size = args.model, args.image_size, args.batch
    cfg.optim.freeze = FROZEN if mode == "recipe" else ""
    cfg.steps, cfg.log_every = args.log_every + args.steps, args.log_every
    cfg.workdir = str(RESULTS / "scratch" / f"train_throughput_{mode}")
    cfg.progress, cfg.tensorboard, cfg.plot, cfg.checkpoint_every = False, False, False, 0
    cfg.best_metric = ""
    import shutil

    shutil.rmtree(cfg.workdir, ignore_errors=True)
    trainer = train.Trainer(cfg, train_data=(images, labels))
    trainer.ckpt.save = lambda *a, **k: None  # timing the loop, not the disk
    times = {}
    inner = trainer._train_step

    def timed(*a):  # record when each step is dispatched
        times[len(times)] = time.perf_counter()
        return inner(*a)

    trainer._train_step = timed
    others.start()
    t_start = time.perf_counter()
    result = trainer.run()
    t_end = time.perf_counter()
    loop_others = others.cpus()
    # steps after the compile window: from the dispatch of step log_every to the end of the run
    t0 = times[args.log_every]
    loop_ips = args.steps * args.batch / (t_end - t0)
    compile_window = t0 - t_start

    # bare step: the same compiled function, one device batch, nothing else
    local = trainer.loader.batch(0)
    from train import parallel

    batch = parallel.global_batch(local, trainer.shardings[1])
    state = result.state
    step = inner

    def bare_round():
        nonlocal state
        t = time.perf_counter()
        for _ in range(args.round):
            state, m = step(state, batch, trainer.rng, trainer.consts)
        jax.block_until_ready(state.params)
        return args.round * args.batch / (time.perf_counter() - t)

    bare_round()
    return {"loop_ips": loop_ips, "loop_others_cpu": loop_others, "compile_window_s": compile_window,
            "bare_round": bare_round, "trainable": len(trainer.trainable)}


def torch_setup(args, mode: str):
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10, pretrained=False).to(memory_format=torch.channels_last)
    if mode == "recipe":  # conv_stem/bn1 = stem, blocks.0-2 = stages_0-2
        for name, p in model.named_parameters():
            if name.startswith(("conv_stem", "bn1", "blocks.0.", "blocks.1.", "blocks.2.")):
                p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=10_000)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    model.train()

    def round_():
        t = time.perf_counter()
        for _ in range(args.round):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
        return args.round * args.batch / (time.perf_counter() - t)

    round_()
    return round_, sum(p.numel() for p in params)


def main(argv=None) -> int:
    args = parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))[: args.threads]
    os.sched_setaffinity(0, cpus)
    os.environ.setdefault("ZOO_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (1024, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 1024)
    others = OtherCpu()
    rows = []
    for mode in args.modes.split(","):
        print(f"[{mode}] zoo loop ...", file=sys.stderr, flush=True)
        z = zoo_measure(args, mode, images, labels, others)
        t_round, t_params = torch_setup(args, mode)
        bare, tor = [], []
        others.start()
        for _ in range(args.rounds):
            bare.append(z["bare_round"]())
            tor.append(t_round())
        row = {"mode": mode, "model": args.model, "image_size": args.image_size, "batch": args.batch,
               "threads": args.threads, "zoo_loop_img_s": z["loop_ips"],
               "zoo_bare_step_img_s": statistics.median(bare), "torch_img_s": statistics.median(tor),
               "loop_overhead": 1 - z["loop_ips"] / statistics.median(bare),
               "zoo_compile_window_s": z["compile_window_s"], "others_cpu_loop": z["loop_others_cpu"],
               "others_cpu_rounds": others.cpus(), "torch_trained_params": t_params}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| mode | model | res | batch | threads | zoo loop img/s | zoo bare step img/s | loop overhead | "
             "torch img/s | zoo/torch (loop) | first window (compile) s | others' CPUs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['model']} | {r['image_size']} | {r['batch']} | {r['threads']} | "
                     f"{r['zoo_loop_img_s']:.1f} | {r['zoo_bare_step_img_s']:.1f} | {r['loop_overhead']:.1%} | "
                     f"{r['torch_img_s']:.1f} | {r['zoo_loop_img_s'] / r['torch_img_s']:.2f} | "
                     f"{r['zoo_compile_window_s']:.0f} | {r['others_cpu_loop']:.1f} / {r['others_cpu_rounds']:.1f} |")
    table = "\n".join(lines) + "\n"
    (RESULTS / "train_throughput.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
