"""Run configuration: plain dataclasses, one per concern, with `key=value` overrides from the command line.

`TrainConfig` nests `ModelConfig`, the task's config (tagged by `kind`, e.g. `ClassificationConfig`), `DataConfig`,
`OptimConfig`, `DistillConfig` and `CompressConfig`. Overrides address fields by dotted path (`optim.lr=3e-3`,
`data.rrc_scale=0.5,1`, `task.label_smoothing=0.1`, `steps=200`); `task.kind=NAME` switches to another registered
task's config (applied first, so that task's keys follow). Values are parsed by the field's annotated type, and a key
that does not exist is an error that lists the valid ones, before anything is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from train.tasks import ClassificationConfig, TaskConfig, task_config_class, task_kinds

class ConfigError(ValueError):
    """A configuration key or value that cannot be used; raised before any model or data is built."""


@dataclass
class ModelConfig:
    name: str = "tf_efficientnet_lite0"  # NAME[.tag] in the zoo registry
    pretrained: bool = True  # the tag's weights (default tag when none given); False: random init
    weights: str | None = None  # a local .pth/.safetensors checkpoint, read as zoo.load(weights=...)
    num_classes: int | None = None  # default: the training data's number of classes
    in_chans: int | None = None  # default: the model's (3); 1 adapts the first conv for grayscale input
    drop_rate: float | None = None  # classifier dropout; None keeps the model's default
    drop_path_rate: float | None = None  # stochastic depth; None keeps the model's default
    dtype: str = "float32"  # compute dtype: float32 or bfloat16 (parameters and optimizer stay float32)
    init_from: str | None = None  # a previous run's workdir whose weights initialize this run
    # a pretrained classifier of the zoo (e.g. "mobilenet_v2") whose weights initialize the modules a task model shares
    # with it by name (a detector's or segmenter's backbone); the heads start fresh (train.backbone_init)
    backbone_weights: str | None = None
    # further zoo.create_model keyword arguments of the family, as JSON: model.kwargs='{"deploy": false}'
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    source: str = ""  # "tfds:NAME[/config][:VERSION]", "folder:PATH" or a folder path; the Python API also takes arrays
    train_split: str = "train"
    eval_split: str | None = "test"  # None: no evaluation split
    data_dir: str | None = None  # tensorflow-datasets data_dir
    image_key: str = "image"
    label_key: str = "label"
    mask_key: str | None = None  # tfds: the feature of per-pixel class ids (e.g. segmentation_mask); folders need none
    val_fraction: float = 0.0  # carve the eval split from the training data (seeded) when the source has none
    image_size: int | None = None  # square train/eval resolution; default: the model's input size
    batch_size: int = 64  # global batch (all hosts and devices together)
    eval_batch_size: int | None = None  # default: batch_size
    gray_to_rgb: bool = False  # repeat 1-channel images to 3 channels (otherwise a channel mismatch is an error)
    interpolation: str | None = None  # default: the model's
    eval_crop_pct: float | None = None  # default: the model's crop_pct; 1.0 resizes the whole image
    # Augmentation (training only), on the host, deterministic given the seed and the step.
    random_resized_crop: bool = True
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    randaugment_ops: int = 0  # RandAugment N (0: off)
    randaugment_magnitude: int = 9  # RandAugment M, 0..30 (timm scale)
    # detection: "ssd" (photometric distortion, zoom-out, IoU crop: train.box_augment) in place of the random resized
    # crop; "" off
    box_augment: str = ""
    workers: int = 2  # host threads that decode and augment
    prefetch: int = 2  # batches prepared ahead of the device


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | adam | sgd | rmsprop | lamb
    lr: float = 1e-3  # peak learning rate (for the global batch)
    weight_decay: float = 0.05  # decoupled for adamw/lamb, L2 added to the gradient for sgd/rmsprop
    momentum: float = 0.9  # sgd / rmsprop momentum
    nesterov: bool = True  # sgd
    rmsprop_decay: float = 0.9
    eps: float | None = None  # default: 1e-8 (adam*), 1e-3 (rmsprop, as in the TF MobileNet/EfficientNet recipes)
    b1: float = 0.9
    b2: float = 0.999
    schedule: str = "cosine"  # cosine | onecycle | constant | linear | exponential
    warmup_steps: int = 0  # linear warmup from 0 (cosine/linear/constant/exponential)
    warmup_fraction: float = 0.0  # warmup as a fraction of the run (ignored when warmup_steps is set)
    min_lr_ratio: float = 0.0  # final lr / peak lr (cosine, linear)
    decay_rate: float = 0.97  # exponential: multiply the lr by this every decay_every_steps (EfficientNet: 0.97/2.4 ep)
    decay_every_steps: int = 0
    onecycle_pct_start: float = 0.25  # onecycle: fraction of the run spent increasing the lr
    clip_grad_norm: float | None = None  # clip the global gradient norm
    accum_steps: int = 1  # split each batch into this many micro-batches whose gradients are summed
    ema_decay: float = 0.0  # exponential moving average of the weights (0: off); evaluated instead of the raw weights
    freeze: str = ""  # regex over parameter paths ("stem/conv/kernel"): matching parameters are not trained
    trainable: str = ""  # regex: when set, only matching parameters are trained (e.g. "^head/" for a linear probe)
    lr_groups: dict[str, float] = field(default_factory=dict)  # regex -> lr multiplier, first match wins
    decay_norm_and_bias: bool = False  # apply weight decay to 1-D parameters (BN scale/bias, biases) too


@dataclass
class DistillConfig:
    teacher: str = ""  # NAME[.tag] of a zoo model, or the workdir of a finished run; "" disables distillation
    teacher_num_classes: int | None = None  # when the teacher is a zoo name: its classifier size (must match)
    temperature: float = 4.0
    alpha: float = 0.5  # loss = (1 - alpha) * task loss + alpha * T^2 * KL(teacher || student)
    features: tuple[str, ...] = ()  # "student_feature:teacher_feature" pairs named as in ModelCfg.feature_info
    feature_weight: float = 1.0
    teacher_image_size: int | None = None  # resize the batch for the teacher (default: the student's resolution)


@dataclass
class CompressConfig:
    """Compression while training (compress/*.py): channel pruning of the built model, sparsity masks, QAT.

    Applied in that order to the model a run builds (pretrained, `model.init_from` or scratch), so one recipe can
    prune (and distill), then continue from that run with `compress.qat=True`, then export.
    """

    qat: bool = False  # quantization-aware training (compress.qat): int8 per-channel weights, int8 activations
    fold_bn: bool = True  # QAT on the BN-folded network the converter deploys (BN frozen); False keeps BN training
    qat_weight_bits: int = 8  # 2..8: the per-channel grid the kernels are rounded to (TFLite stores int8)
    qat_activation_bits: int = 8  # 2..8: the per-tensor grid of layer inputs in training
    qat_ema_decay: float = 0.99  # moving average of the activation ranges per step
    qat_exclude: str = ""  # regex over layer paths kept in float (e.g. "/attn/")
    # structured channel pruning (compress.prune) of the built model before training; 0: off
    # fraction of each prunable channel group removed (expansion, SE, last 1x1), in (0, 1); applied to the model the
    # run builds, so a run that continues a pruned run (model.init_from) prunes again unless this is reset to 0
    prune_ratio: float = 0.0
    prune_criterion: str = "bn_scale"  # or "l1"
    # sparsity (compress.sparsity): masks kept in the train state and re-applied after every update
    sparsity: str = ""  # "" off, "2:4" (any N:M) or "unstructured"
    sparsity_target: float = 0.5  # fraction of zeros for "unstructured"
    sparsity_rules: tuple[str, ...] = ()  # regexes over parameter paths; empty: every large conv/dense kernel
    sparsity_scope: str = "global"  # "global" (one threshold) or "layer"
    sparsity_schedule: str = "oneshot"  # or "polynomial" (Zhu & Gupta), unstructured only
    sparsity_begin_step: int = 0
    sparsity_end_step: int | None = None  # required by "polynomial"
    sparsity_frequency: int = 100  # steps between mask updates of the polynomial schedule
    sparsity_initial: float = 0.0  # polynomial: sparsity at begin_step


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=ClassificationConfig)  # what is learned: loss, metrics, batch-level mixing
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    workdir: str = "runs/default"
    seed: int = 0
    steps: int = 0  # total optimizer steps; 0: derived from epochs
    epochs: float = 0.0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 0  # 0: at every evaluation and at the end
    keep_checkpoints: int = 2
    best_metric: str | None = None  # eval metric whose best value is kept in workdir/best; None: the task's; "": none
    best_mode: str | None = None  # "max" or "min"; None: the task's
    async_checkpoints: bool = True
    progress: bool = True  # progress bar with throughput and ETA
    tensorboard: bool = True
    plot: bool = True  # workdir/curves.png at the end of the run
    distributed: bool = False  # jax.distributed.initialize() (multi-host); also on when JAX_COORDINATOR_ADDRESS is set
    compilation_cache: str | None = None  # persistent XLA compilation cache directory
    depthwise_impl: str = "auto"  # zoo.layers.conv.depthwise_impl for the training step


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "distill": DistillConfig,
            "compress": CompressConfig}
# fields that moved from `data` to the classification task's config: older runs' config.json still load
_MOVED_TO_TASK = ("label_smoothing", "mixup_alpha", "cutmix_alpha", "mix_prob")


def valid_keys(cfg: TrainConfig | None = None) -> list[str]:
    """Every dotted key `--set` accepts (the `task.` keys are those of `cfg.task`'s kind)."""
    cfg = cfg or TrainConfig()
    keys = []
    for f in dataclasses.fields(TrainConfig):
        section = SECTIONS.get(f.name) or (type(cfg.task) if f.name == "task" else None)
        keys += [f"{f.name}.{g.name}" for g in dataclasses.fields(section)] if section else [f.name]
    return keys


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> TrainConfig:
    """The inverse of `to_dict` (unknown keys raise, so a config written by a newer version fails loudly)."""
    d = dict(d)
    sections = {}
    data = dict(d.get("data") or {})
    moved = {k: data.pop(k) for k in _MOVED_TO_TASK if k in data}
    d["data"] = data
    task = dict(d.pop("task", None) or {"kind": "classification", **moved})
    for name, cls in SECTIONS.items():
        sub = d.pop(name, {}) or {}
        _check_known(cls, sub, prefix=f"{name}.")
        sections[name] = cls(**{k: _coerce(v, _hints(cls)[k], f"{name}.{k}") for k, v in sub.items()})
    task_cls = _task_class(task.get("kind", ""))
    _check_known(task_cls, task, prefix="task.")
    sections["task"] = task_cls(**{k: _coerce(v, _hints(task_cls)[k], f"task.{k}") for k, v in task.items()})
    _check_known(TrainConfig, d)
    top = {k: _coerce(v, _hints(TrainConfig)[k], k) for k, v in d.items()}
    return TrainConfig(**sections, **top)


def _task_class(kind: str) -> type:
    try:
        return task_config_class(kind)
    except ValueError as e:
        raise ConfigError(f"task.kind: {e}") from None


def _check_known(cls, d: dict, prefix: str = "") -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in d if k not in names]
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}")


def apply_overrides(cfg: TrainConfig, overrides: list[str] | dict[str, Any]) -> TrainConfig:
    """A copy of `cfg` with `key=value` overrides applied (strings are parsed by the field's type)."""
    cfg = from_dict(to_dict(cfg))
    items = list(overrides.items() if isinstance(overrides, dict) else [_split(o) for o in overrides])
    items.sort(key=lambda kv: kv[0] != "task.kind")  # the kind first: it decides which task.* keys exist
    for key, value in items:
        if key == "task.kind":
            if value != cfg.task.kind:
                cfg.task = _task_class(str(value))()
            continue
        keys = valid_keys(cfg)
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(close)}?" if close else ""
            kinds = f" (task keys are those of task.kind={cfg.task.kind}; kinds: {', '.join(task_kinds())})" \
                if key.startswith("task.") else ""
            raise ConfigError(f"unknown config key '{key}'.{hint}{kinds} Valid keys: {', '.join(keys)}")
        section, _, name = key.rpartition(".")
        target = getattr(cfg, section) if section else cfg
        setattr(target, name, _coerce(value, _hints(type(target))[name], key))
    return cfg


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{item}' is not KEY=VALUE (e.g. optim.lr=3e-3)")
    return key.strip(), value.strip()


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


_NONE = ("none", "null", "")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (a string from the command line, or already typed) as the annotated type `tp`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError("expected true or false")
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            return tp(value) if tp is not int else int(float(value)) if isinstance(value, str) else int(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()] if value else []
            inner = args[0] if args else str
            items = tuple(_coerce(v.strip() if isinstance(v, str) else v, inner, key) for v in value)
            if args and args[-1] is not Ellipsis and len(items) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            return items
        if origin is dict:
            if isinstance(value, str):
                value = json.loads(value) if value.strip().startswith("{") else dict(
                    _kv(p) for p in value.split(",") if p.strip())
            return {str(k): _coerce(v, args[1], key) for k, v in dict(value).items()}
    except (ValueError, TypeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config key '{key}': cannot read {value!r} as {_type_name(tp)} ({e})") from None
    return value


def _kv(part: str) -> tuple[str, str]:
    k, sep, v = part.rpartition("=")
    if not sep:
        raise ValueError(f"'{part}' is not REGEX=VALUE")
    return k.strip(), v.strip()


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))
