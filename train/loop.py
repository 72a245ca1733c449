"""The training loop: `fit(config)` fine-tunes (or trains, or distills into) any zoo model and returns the result.

Order of initialization: an existing checkpoint in the workdir (resume), else `model.init_from` (a previous run), else
the pretrained weights, else a random init (with `model.backbone_weights`, a pretrained classifier's backbone in it). All checks of the data, the model and the config run before the first
step. The loop itself only moves batches, calls the jitted step, and reports; what the task is never matters here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import zoo
from train import compression as compress_cfg
from train import parallel
from train.backbone_init import with_pretrained_backbone
from train.checkpoint import Checkpoints, CheckpointError, abstract, check_compatible
from train.config import ConfigError, TrainConfig, from_dict, to_dict
from train.data import DataError, Loader, Source
from train.distill import Distillation
from train.optim import decay_mask, lr_multipliers, make_optimizer, make_schedule, select_trainable
from train.state import TASK_PREFIX, TrainState, create_state, flatten
from train.step import jit_eval_step, jit_train_step, make_eval_step, make_train_step
from train.summary import MetricsLog, Progress, TensorBoardWriter, plot_curves, read_metrics
from train.sources import as_source, has_split, open_source
from train.sources import open_data as _open_sources
from train.tasks import Task
from train.tasks import build_task as _build_task
from train.tasks import task_config_class, task_kinds
from train.transforms import Transform
from zoo.config import ModelCfg
from zoo.layers.conv import depthwise_impl

log = logging.getLogger("train")


class NonFiniteError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the last checkpoint."""


@dataclass
class TrainResult:
    model: zoo.Model  # the trained network (EMA weights when kept), ready for model(images) / model.predict
    state: TrainState
    metrics: dict  # final evaluation metrics ({} without evaluation data)
    history: list[dict] = field(default_factory=list)  # the metrics.jsonl records
    workdir: Path | None = None
    train_seconds: float = 0.0  # wall time of the steps run in this call (compilation included)


# ---- building blocks ---------------------------------------------------------------------------------------------

def open_data(cfg: TrainConfig, train_data=None, eval_data=None) -> tuple[Source, Source | None]:
    """(train, eval) sources of a run: `train_data`/`eval_data` when given, else those `cfg.data` names."""
    return _open_sources(cfg.data, cfg.seed, train_data, eval_data)


def _overrides(mcfg) -> dict:
    out = {}
    if mcfg.drop_rate is not None:
        out["drop_rate"] = mcfg.drop_rate
    if mcfg.drop_path_rate is not None:
        out["drop_path_rate"] = mcfg.drop_path_rate
    if mcfg.dtype not in ("float32", "", None):
        out["dtype"] = _dtype(mcfg.dtype)
    clash = sorted(set(out) & set(mcfg.kwargs or {}))
    if clash:
        raise ConfigError(f"model.kwargs repeats {clash}: set them as model.{clash[0]}=... instead")
    return {**out, **(mcfg.kwargs or {})}


def _recorded_kwargs(overrides: dict) -> dict:
    """`create_model` keyword arguments as JSON values (a dtype by its name), for the run metadata."""
    return {k: (jnp.dtype(v).name if k == "dtype" else v) for k, v in overrides.items()}


def _replayed_kwargs(recorded: dict) -> dict:
    return {k: (_dtype(v) if k == "dtype" else v) for k, v in recorded.items()}


def _create_recorded(name: str, recorded: dict, **fixed):
    """`zoo.create_model` with a run's recorded arguments; arguments the model no longer takes are named."""
    try:
        return zoo.create_model(name, **fixed, **_replayed_kwargs(recorded))
    except TypeError as e:
        raise CheckpointError(f"the run built '{name}' with create_model arguments {recorded}, which this version "
                              f"of the model does not take ({e}); load it with load_run(..., model=<a zoo.Model of "
                              "the same structure>)") from None


def _dtype(name: str):
    try:
        return {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}[name]
    except KeyError:
        raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, not '{name}'") from None


def build_model(cfg: TrainConfig, num_classes: int, task: Task) -> zoo.Model:
    """The model this config trains, initialized from init_from (adapted by the task), pretrained weights or
    randomly."""
    m = cfg.model
    overrides = _overrides(m)
    if m.init_from and m.backbone_weights:
        raise ConfigError(f"model.init_from and model.backbone_weights both initialize the model; keep one (init_from="
                          f"{m.init_from}, backbone_weights={m.backbone_weights})")
    if m.init_from:
        base = load_run(m.init_from, which="latest", ema=True)
        arch = compress_cfg.architecture(base)  # a pruned run: its own channel widths
        registered = arch["base"] if arch else base.cfg.name
        if registered != zoo.registry.split_name(m.name)[0]:
            raise CheckpointError(f"model.init_from={m.init_from} holds a '{base.cfg.name}', not '{m.name}'")
        if arch:
            module = compress_cfg.rebuild(arch, num_classes=num_classes, in_chans=base.cfg.in_chans, **overrides)
        else:
            module = zoo.create_model(base.cfg.name, num_classes=num_classes, in_chans=base.cfg.in_chans,
                                      **overrides)
        model_cfg = base.cfg.replace(num_classes=num_classes)
        return zoo.Model(module, task.adapt(module, base, model_cfg), model_cfg)
    model = zoo.load(m.name, pretrained=m.pretrained or m.weights is not None, num_classes=num_classes,
                     in_chans=m.in_chans, weights=m.weights, seed=cfg.seed, progress=cfg.progress, **overrides)
    if m.backbone_weights:
        try:
            model = with_pretrained_backbone(model, m.backbone_weights, progress=cfg.progress)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return model


def task_of(cfg: TrainConfig, num_classes: int) -> Task:
    """The task `cfg.task` describes (its `kind` picks the registered task class)."""
    try:
        task_config_class(cfg.task.kind)
    except ValueError as e:
        raise ConfigError(f"task.kind: {e}") from None
    return _build_task(cfg.task, num_classes=num_classes)


def with_distillation(task: Task, cfg: TrainConfig, student: zoo.Model) -> Task:
    """`task` wrapped by distillation from `cfg.distill.teacher`, or `task` itself when there is no teacher."""
    k = cfg.distill
    if not k.teacher:
        return task
    teacher = load_teacher(k.teacher, k.teacher_num_classes, progress=cfg.progress)
    return Distillation(task, teacher, student.cfg, temperature=k.temperature, alpha=k.alpha, features=k.features,
                        feature_weight=k.feature_weight, teacher_image_size=k.teacher_image_size, seed=cfg.seed)


def load_teacher(spec: str, num_classes: int | None = None, progress: bool = True) -> zoo.Model:
    """A teacher by zoo name (pretrained) or by the workdir of a finished run."""
    if Path(spec).expanduser().is_dir():
        return load_run(spec, which="best", ema=True)
    return zoo.load(spec, num_classes=num_classes, progress=progress)


def transforms(cfg: TrainConfig, model_cfg: ModelCfg) -> tuple[Transform, Transform]:
    """(train, eval) transforms of the run's task; `eval_tf(image, None)` also preprocesses a bare image."""
    return task_of(cfg, model_cfg.num_classes).transforms(cfg.data, model_cfg)


def model_meta(model: zoo.Model, cfg: TrainConfig) -> dict:
    """What built the model, verbatim: `load_run` replays `create_kwargs` and then `transforms`, in order."""
    transforms = [t for t, on in (("prune", bool(cfg.compress.prune_ratio)), ("qat", cfg.compress.qat)) if on]
    return {"name": model.cfg.name, "num_classes": model.cfg.num_classes, "in_chans": model.cfg.in_chans,
            "dtype": cfg.model.dtype, "drop_rate": cfg.model.drop_rate, "drop_path_rate": cfg.model.drop_path_rate,
            "create_kwargs": _recorded_kwargs(_overrides(cfg.model)), "transforms": transforms}


def _setup_jax(cfg: TrainConfig) -> None:
    parallel.maybe_initialize_distributed(cfg.distributed)
    if cfg.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", str(Path(cfg.compilation_cache).expanduser()))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# ---- the loop ----------------------------------------------------------------------------------------------------

class Trainer:
    """Everything `fit` builds, inspectable before running: `Trainer(cfg, ...).run()` is `fit(cfg, ...)`.

    After construction the data, model, task, optimizer and state exist and every check has passed; `step` is the
    jitted pure step `(state, batch, rng) -> (state, metrics)`.
    """

    def __init__(self, cfg: TrainConfig, *, model: zoo.Model | None = None, train_data=None, eval_data=None,
                 task: Task | None = None, hooks: Sequence = (), compression: dict | None = None):
        _setup_jax(cfg)
        self.cfg = cfg
        self.is_main = jax.process_index() == 0
        self.workdir = Path(cfg.workdir).expanduser().absolute()
        self.train_src, self.eval_src = open_data(cfg, train_data, eval_data)
        num_classes = (model.cfg.num_classes if model is not None else None) or cfg.model.num_classes \
            or self.train_src.num_classes
        if not num_classes:
            raise DataError("cannot tell the number of classes: set model.num_classes")
        self.mesh = parallel.make_mesh()
        self.shardings = parallel.shardings(self.mesh)
        parallel.check_batch_size(cfg.data.batch_size, self.mesh)
        parallel.check_batch_size(cfg.data.eval_batch_size or cfg.data.batch_size, self.mesh, "data.eval_batch_size")
        if cfg.data.batch_size % (cfg.optim.accum_steps * self.mesh.devices.size):
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} must split into optim.accum_steps="
                              f"{cfg.optim.accum_steps} micro-batches across {self.mesh.devices.size} devices")

        base_task = task or task_of(cfg, num_classes)
        self.model = model or build_model(cfg, num_classes, base_task)
        if cfg.data.image_size:
            self.model = dataclasses.replace(self.model, cfg=self.model.cfg.replace(
                input_size=(cfg.data.image_size, cfg.data.image_size)))
        if self.model.cfg.num_classes != num_classes:
            raise ConfigError(f"model has {self.model.cfg.num_classes} classes, expected {num_classes}")
        # compression: prune (an ordinary smaller model), then fold BatchNorm and wrap for QAT; load_run re-applies
        # the wrapping from the recorded config and rebuilds a pruned architecture from the metadata
        self.model = compress_cfg.prune(self.model, cfg.compress)
        arch = compress_cfg.architecture(self.model)
        self.model = compress_cfg.quantization_aware(self.model, cfg.compress)
        self.task = task or with_distillation(base_task, cfg, self.model)
        self.task.validate(self.train_src, self.model.cfg, gray_to_rgb=cfg.data.gray_to_rgb, what="training")
        if self.eval_src is not None:
            self.task.validate(self.eval_src, self.model.cfg, gray_to_rgb=cfg.data.gray_to_rgb, what="evaluation")

        self.train_tf, self.eval_tf = self.task.transforms(cfg.data, self.model.cfg)
        pi, pc = jax.process_index(), jax.process_count()
        self.loader = Loader(self.train_src, self.train_tf, cfg.data.batch_size, seed=cfg.seed, process_index=pi,
                             process_count=pc, workers=cfg.data.workers, prefetch=cfg.data.prefetch,
                             collate=self.task.collate)
        self.eval_loader = None if self.eval_src is None else Loader(
            self.eval_src, self.eval_tf, cfg.data.eval_batch_size or cfg.data.batch_size, seed=cfg.seed,
            process_index=pi, process_count=pc, workers=cfg.data.workers, collate=self.task.collate)
        spe = self.loader.steps_per_epoch
        if spe == 0:
            raise DataError(f"{len(self.train_src)} training examples are fewer than one batch of "
                            f"{cfg.data.batch_size}; lower data.batch_size")
        self.total_steps = cfg.steps or int(math.ceil(cfg.epochs * spe))
        if self.total_steps <= 0:
            raise ConfigError("set steps or epochs to a positive number")

        # what is trained, how
        params = self.model.variables["params"]
        paths = list(flatten(params))
        self.trainable = tuple(select_trainable(paths, cfg.optim))
        task_params = self.task.init_params(jax.random.key(cfg.seed))
        trained_shapes = {**{p: flatten(params)[p].shape for p in self.trainable},
                          **{TASK_PREFIX + k: v.shape for k, v in flatten(task_params).items()}}
        self.schedule = make_schedule(cfg.optim, self.total_steps)
        self.tx = make_optimizer(cfg.optim, self.schedule, decay_mask(trained_shapes, cfg.optim),
                                 lr_multipliers(list(trained_shapes), cfg.optim.lr_groups))
        self.ckpt = Checkpoints(self.workdir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoints)
        resume_step = self.ckpt.latest_step()
        replicated, _ = self.shardings
        # one compiled function builds the whole state on the mesh (eager per-leaf ops would each compile)
        init_state = functools.partial(create_state, tx=self.tx, trainable=self.trainable,
                                       ema=cfg.optim.ema_decay > 0)
        sparse_hooks, ema_hooks, sparse_state = compress_cfg.sparsity(cfg.compress, params)
        hooks = (*hooks, *sparse_hooks)
        args = (self.model.variables, task_params, {**(compression or {}), **sparse_state})
        self.meta_model = model_meta(self.model, cfg)
        if arch:
            self.meta_model["architecture"] = arch
        self.start_step = 0
        if resume_step is not None:
            meta = self.ckpt.read_meta(resume_step)
            check_compatible(self.ckpt, resume_step, meta, self.meta_model, params)
            target = abstract(jax.eval_shape(lambda v, t, c: init_state(v, task_params=t, compression=c), *args),
                              replicated)
            state, meta = self.ckpt.restore(target, resume_step)
            self.start_step = int(state.step)
            self.best = meta.get("best", {})
            log.info("resumed %s at step %d", self.workdir, self.start_step)
        else:
            state = jax.jit(lambda v, t, c: init_state(v, task_params=t, compression=c),
                            out_shardings=replicated)(*args)
            self.best = {}
        self.state = state
        self.resumed = resume_step is not None

        step_fn = make_train_step(self.model.module, self.task, self.tx, self.schedule, self.trainable,
                                  accum_steps=cfg.optim.accum_steps, ema_decay=cfg.optim.ema_decay, hooks=hooks,
                                  ema_hooks=ema_hooks)
        self._train_step = jit_train_step(step_fn, self.shardings)
        self._eval_step = jit_eval_step(make_eval_step(self.model.module, self.task), self.shardings)
        self.consts = parallel.replicate(self.task.consts(), replicated)
        self.rng = jax.random.key(cfg.seed)

    def step(self, state: TrainState, batch: dict, rng: jax.Array):
        """The jitted pure step `(state, batch, rng) -> (state, metrics)`; `state` is donated."""
        return self._train_step(state, batch, rng, self.consts)

    # -- evaluation --
    def evaluate(self, state: TrainState | None = None) -> dict:
        state = state or self.state
        if self.eval_loader is None:
            return {}
        params = state.ema_params if (self.cfg.optim.ema_decay > 0 and state.ema_params) else state.params
        return run_eval(self._eval_step, params, state.model_state, self.eval_loader, self.task, self.shardings)

    # -- the loop --
    def run(self) -> TrainResult:
        cfg, total = self.cfg, self.total_steps
        with depthwise_impl(cfg.depthwise_impl):
            return self._run(cfg, total)

    def _meta(self, step: int, eval_metrics: dict | None = None) -> dict:
        return {"step": step, "model": self.meta_model, "model_cfg": dataclasses.asdict(self.model.cfg),
                "config": to_dict(self.cfg), "class_names": list(self.train_src.class_names or []),
                "best": self.best, "eval": eval_metrics or {}, "total_steps": self.total_steps,
                "time": time.time()}

    def _run(self, cfg: TrainConfig, total: int) -> TrainResult:
        if self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        mlog = MetricsLog(self.workdir / "metrics.jsonl", resume_step=self.start_step if self.resumed else None) \
            if self.is_main else None
        tb = TensorBoardWriter(self.workdir / "tb") if (cfg.tensorboard and self.is_main) else None
        progress = Progress(total, self.start_step, cfg.data.batch_size, enabled=cfg.progress and self.is_main)
        stop = _StopSignal()
        eval_every, ckpt_every = cfg.eval_every, cfg.checkpoint_every or cfg.eval_every
        pending: list[tuple[int, dict]] = []
        last_checked = self.start_step
        last_saved = self.start_step if self.resumed else None
        eval_metrics: dict = {}
        state, t0 = self.state, time.perf_counter()
        _, batched = self.shardings

        def flush(step: int):
            nonlocal pending, last_checked
            if not pending:
                return
            host = jax.device_get([m for _, m in pending])
            steps = [s for s, _ in pending]
            for s, m in zip(steps, host):
                if not np.isfinite(m["loss"]):
                    where = (f"the last checkpoint is step {last_saved} in {self.workdir}" if last_saved is not None
                             else "no checkpoint was written")
                    raise NonFiniteError(
                        f"training loss is {float(m['loss'])} at step {s} (first non-finite value among steps "
                        f"{last_checked + 1}-{steps[-1]}); the run stopped, {where}. Lower optim.lr, set "
                        "optim.clip_grad_norm, or check the data")
            mean = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
            rate = progress.update(step, mean)
            mean["images_per_sec"] = rate
            if mlog:
                mlog.write(step, "train", mean)
            if tb:
                tb.scalars(step, {f"train/{k}": v for k, v in mean.items()})
            pending, last_checked = [], step

        try:
            for step, local in zip(range(self.start_step, total), self.loader.iterate(self.start_step, total)):
                state, metrics = self.step(state, parallel.global_batch(local, batched), self.rng)
                done = step + 1
                pending.append((done, metrics))
                is_last = done == total
                want_eval = is_last or (eval_every and done % eval_every == 0)
                want_ckpt = is_last or want_eval or (ckpt_every and done % ckpt_every == 0) or stop.requested
                if done % cfg.log_every == 0 or want_ckpt:
                    flush(done)
                if want_eval and self.eval_loader is not None:
                    eval_metrics = self.evaluate(state)
                    improved = self._track_best(done, eval_metrics)
                    if self.is_main:
                        mlog.write(done, "eval", eval_metrics)
                        if tb:
                            tb.scalars(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
                        progress.write(f"step {done}: eval " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                                         eval_metrics.items()))
                    progress.pause_end()
                else:
                    improved = False
                if want_ckpt:
                    self.ckpt.save(done, state, self._meta(done, eval_metrics), best=improved)
                    last_saved = done
                if stop.requested:
                    progress.write(f"stopping at step {done} on {stop.name}; checkpoint saved")
                    break
            flush(int(state.step))
            self.ckpt.wait()
        finally:
            stop.restore()
            progress.close()
            if tb:
                tb.close()
        seconds = time.perf_counter() - t0
        self.state = state
        if self.start_step >= total and self.eval_loader is not None:
            eval_metrics = self.evaluate(state)
        history = read_metrics(self.workdir / "metrics.jsonl") if self.is_main else []
        if cfg.plot and self.is_main and history:
            plot_curves(history, self.workdir / "curves.png", title=f"{self.model.cfg.name} ({self.workdir.name})")
        return TrainResult(model=self.trained_model(state), state=state, metrics=eval_metrics, history=history,
                           workdir=self.workdir, train_seconds=seconds)

    def _track_best(self, step: int, metrics: dict) -> bool:
        key, mode = self.best_metric
        if not key or key not in metrics:
            return False
        value, best = metrics[key], self.best.get("value")
        better = best is None or (value > best if mode == "max" else value < best)
        if better:
            self.best = {"metric": key, "value": value, "step": step}
        return better

    @property
    def best_metric(self) -> tuple[str, str]:
        """(metric, "max" or "min") that picks the best checkpoint: the task's unless the config names one."""
        cfg = self.cfg
        return (self.task.best_metric if cfg.best_metric is None else cfg.best_metric,
                self.task.best_mode if cfg.best_mode is None else cfg.best_mode)

    def trained_model(self, state: TrainState | None = None) -> zoo.Model:
        state = state or self.state
        model = zoo.Model(self.model.module, state.variables(ema=self.cfg.optim.ema_decay > 0), self.model.cfg)
        return _finalize_compression(model, self.cfg)


class _StopSignal:
    """SIGTERM (preemption) asks the loop to checkpoint and stop at the next step boundary."""

    def __init__(self):
        self.requested, self.name, self._old = False, "", None
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None

    def _handle(self, signum, frame):
        self.requested, self.name = True, signal.Signals(signum).name

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def run_eval(eval_step, params, model_state, loader: Loader, task: Task, shardings) -> dict:
    """The task's metrics over every example of `loader`: the sums of `eval_sums` summarized, and what the task's
    host evaluator (if any) computes from the per-example outputs it names."""
    _, batched = shardings
    total, host = None, task.host_evaluator()
    for local in loader.eval_batches():
        sums = dict(eval_step(params, model_state, parallel.global_batch(local, batched)))
        if host is not None:
            host.add(jax.device_get({k: sums.pop(k) for k in host.keys}))
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    if total is None:
        return {}
    metrics = task.summarize(jax.device_get(total))
    return {**metrics, **host.summarize()} if host is not None else metrics


def fit(cfg: TrainConfig, *, model: zoo.Model | None = None, train_data=None, eval_data=None,
        task: Task | None = None, hooks: Sequence = (), compression: dict | None = None) -> TrainResult:
    """Train as `cfg` says; resumes from the workdir's last checkpoint when there is one.

    `train_data` / `eval_data`: a `Source` or an `(images uint8, class ids)` pair (an `ArraySource`) instead of
    `cfg.data.source`; `model`: a `zoo.Model` instead of `cfg.model`; `task`: a `Task` instead of the one `cfg.task`
    describes; `hooks`: compression hooks `(params, compression) -> (params, compression)` run after each update, with
    `compression` their initial state.
    """
    return Trainer(cfg, model=model, train_data=train_data, eval_data=eval_data, task=task, hooks=hooks,
                   compression=compression).run()


# ---- finished runs -----------------------------------------------------------------------------------------------

def _finalize_compression(model: zoo.Model, cfg: TrainConfig) -> zoo.Model:
    if not cfg.compress.qat:
        return model
    from compress.qat_train import finalize

    return finalize(model)  # kernels on the int8 grid: same outputs, exact int8 export


def load_run(workdir: str | Path, *, which: str = "best", ema: bool = True, model: zoo.Model | None = None
             ) -> zoo.Model:
    """The model a run trained, from its `best` checkpoint (else its latest), as a `zoo.Model`.

    The architecture is rebuilt from the zoo registry by the name the run recorded; pass `model` (any `zoo.Model` of
    the same structure) for networks that are not registered.
    """
    ckpt = Checkpoints(workdir, read_only=True)
    try:
        if which == "best" and ckpt.latest_step("best") is None:
            which = "latest"
        step = ckpt.latest_step(which)
        if step is None:
            raise CheckpointError(f"no checkpoint in {Path(workdir).expanduser().absolute()}")
        meta = ckpt.read_meta(step, which)
        mm = meta["model"]
        if model is not None:
            check_compatible(ckpt, step, meta, {"name": model.cfg.name, "num_classes": model.cfg.num_classes},
                             model.variables["params"], which)
            module, cfg = model.module, model.cfg
        else:
            cfg = ModelCfg.from_dict(meta["model_cfg"])
            if "create_kwargs" in mm:
                overrides = _replayed_kwargs(mm["create_kwargs"])
            else:  # a run recorded before create_kwargs were: its known fields
                overrides = {k: mm[k] for k in ("drop_rate", "drop_path_rate") if mm.get(k) is not None}
                if mm.get("dtype") not in (None, "float32"):
                    overrides["dtype"] = _dtype(mm["dtype"])
            if mm.get("architecture"):  # pruned: the registered base with the recorded channel widths
                module = compress_cfg.rebuild(mm["architecture"], num_classes=mm["num_classes"],
                                              in_chans=mm["in_chans"], **overrides)
            else:
                module = _create_recorded(mm["name"], _recorded_kwargs(overrides), num_classes=mm["num_classes"],
                                          in_chans=mm["in_chans"])
        raw = ckpt.restore_raw(step, which)
    finally:
        ckpt.close()
    run_cfg = from_dict(meta["config"]) if "config" in meta else TrainConfig()
    if run_cfg.compress.qat:
        from compress.qat_train import rebuild_module

        module = rebuild_module(module, run_cfg.compress, cfg)
    params = raw["ema_params"] if (ema and raw.get("ema_params")) else raw["params"]
    variables = jax.device_put({"params": params, **raw["model_state"]})
    return _finalize_compression(zoo.Model(module, variables, cfg), run_cfg)


def evaluate(model: zoo.Model, data, *, split: str = "test", batch_size: int = 64, image_size: int | None = None,
             crop_pct: float | None = None, gray_to_rgb: bool = False, task: Task | None = None,
             class_names: Sequence[str] | None = None, workers: int = 2,
             source_options: Mapping | None = None) -> dict:
    """Metrics of `model` on `data` (a Source, an (images, class ids) pair, or a source spec with `split`) under `task`
    (default: the model's own task: top-1 for a classifier, mIoU for a segmenter).

    For folders, `class_names` (in training order) maps subfolders to classes; by default the classes of a sibling
    `train` split when there is one, else the folder's own subfolders. `source_options`: more keywords of
    `open_source` for a source spec (tfds: `data_dir`, the features read; a segmenter's masks by `mask_key`).
    """
    if isinstance(data, str):
        if class_names is None and not data.startswith("tfds:") and has_split(data, "train") and split != "train":
            class_names = open_source(data, "train").class_names
        source = open_source(data, split, class_names=class_names, **(source_options or {}))
    else:
        source = as_source(data, "eval")
    cfg = TrainConfig()
    cfg.data.gray_to_rgb, cfg.data.eval_crop_pct = gray_to_rgb, crop_pct
    mcfg = model.cfg.replace(input_size=(image_size, image_size)) if image_size else model.cfg
    if task is None and mcfg.task != cfg.task.kind:  # the model's own task (a segmenter's mIoU, not top-1)
        try:
            cfg.task = task_config_class(mcfg.task)()
        except ValueError:
            raise ConfigError(f"{mcfg.name} is a {mcfg.task} model; no training task of that kind is registered "
                              f"(registered: {', '.join(task_kinds())})") from None
    task = task or task_of(cfg, mcfg.num_classes)
    task.validate(source, mcfg, gray_to_rgb=gray_to_rgb, what="evaluation")
    _, eval_tf = task.transforms(cfg.data, mcfg)
    mesh = parallel.make_mesh()
    sh = parallel.shardings(mesh)
    parallel.check_batch_size(batch_size, mesh, "batch_size")
    loader = Loader(source, eval_tf, batch_size, process_index=jax.process_index(),
                    process_count=jax.process_count(), workers=workers, collate=task.collate)
    step = jit_eval_step(make_eval_step(model.module, task), sh)
    variables = dict(model.variables)
    params = parallel.replicate(variables.pop("params"), sh[0])
    return run_eval(step, params, parallel.replicate(variables, sh[0]), loader, task, sh)
