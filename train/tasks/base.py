"""The `Task` interface and the registry of task kinds: what differs between classification, detection and
segmentation, so the loop never branches on it.

A task owns, from the example to the metric: its transforms of examples (train and eval, `transforms`), the checks of
the data before training (`validate`), collation of transformed examples into a batch padded to static shapes with a
validity mask (`collate`, for evaluation batches too), the training loss (`loss`), evaluation (`eval_sums` per batch,
reduced by `summarize`; metrics that need every example's outputs on the host, such as COCO's mAP, from a
`HostEvaluator` the task gives with `host_evaluator`), which metric is best (`best_metric`, `best_mode`), and how a
loaded model is adapted to it (`adapt`). It calls the network through `Forward`, which binds the variables, the train
flag and the dropout rng and records the updated model state (BatchNorm statistics).

A task kind registers itself with its config class: `@register_task("segmentation", SegmentationConfig)`; a run's
`cfg.task` (tagged by `kind`) then builds it with `build_task`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from train.data import DataError, Source, check_images, stack_collate
from train.forward import Forward
from train.state import flatten, unflatten
from train.transforms import Transform, transforms_for
from zoo.abstract import abstract_variables


@dataclass
class TaskConfig:
    """Settings of one task kind; subclasses add theirs and are registered with their task class."""

    kind: str = ""


_REGISTRY: dict[str, tuple[type, type]] = {}


def register_task(kind: str, config_class: type):
    """Class decorator: `kind` -> (config class, task class). Duplicate kinds raise."""
    if not (dataclasses.is_dataclass(config_class) and issubclass(config_class, TaskConfig)):
        raise TypeError(f"task '{kind}': its config must be a TaskConfig dataclass, not {config_class!r}")
    if config_class().kind != kind:
        raise TypeError(f"task '{kind}': {config_class.__name__}.kind defaults to '{config_class().kind}'")

    def register(task_class: type) -> type:
        if kind in _REGISTRY:
            raise ValueError(f"task kind '{kind}' is already registered ({_REGISTRY[kind][1].__name__})")
        _REGISTRY[kind] = (config_class, task_class)
        task_class.kind = kind
        return task_class

    return register


def task_kinds() -> list[str]:
    return sorted(_REGISTRY)


def task_config_class(kind: str) -> type:
    return _lookup(kind)[0]


def build_task(cfg: TaskConfig, *, num_classes: int) -> "Task":
    """The task a run's `cfg.task` describes."""
    return _lookup(cfg.kind)[1].from_config(cfg, num_classes=num_classes)


def _lookup(kind: str) -> tuple[type, type]:
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise ValueError(f"unknown task kind '{kind}'; registered kinds: {', '.join(task_kinds())}") from None


class HostEvaluator:
    """Metrics computed on the host from per-example outputs of the evaluation step (e.g. COCO's mAP, which ranks
    the detections of the whole evaluation set). The loop takes the entries named by `keys` out of each batch's
    `eval_sums` (they are per-example arrays, not sums), hands them to `add` as numpy arrays, and merges `summarize()`
    into the metrics. One evaluator serves one evaluation pass."""

    keys: tuple[str, ...] = ()

    def add(self, outputs: dict) -> None:
        raise NotImplementedError

    def summarize(self) -> dict:
        raise NotImplementedError


class Task:
    """The interface the loop uses. Subclasses implement `loss`, `eval_sums`, `summarize` and `from_config`, and
    override the rest where their data needs it; see `Classification`."""

    kind: str = ""
    target_keys: tuple[str, ...] = ()  # what every example must carry besides `image`
    metric_names: tuple[str, ...] = ("loss",)
    best_metric: str = "loss"  # what "best checkpoint" means, with `best_mode`; read by the loop
    best_mode: str = "min"

    @classmethod
    def from_config(cls, cfg: TaskConfig, *, num_classes: int) -> "Task":
        raise NotImplementedError

    def transforms(self, data, model_cfg) -> tuple[Transform, Transform]:
        """(train, eval) transforms of examples, from the run's `DataConfig` and the model's input settings."""
        return transforms_for(data, model_cfg, required=self.target_keys)

    def validate(self, source: Source, model_cfg, *, gray_to_rgb: bool = False, what: str = "training") -> None:
        """Raise a clear error, before training, on data this task and model cannot use."""
        check_images(source, model_cfg.in_chans, gray_to_rgb, what)
        first = source.example(0)
        missing = [k for k in self.target_keys if k not in first]
        if missing:
            raise DataError(f"{what} data ({source.name}): examples have no '{missing[0]}' (they have "
                            f"{', '.join(sorted(first))}); the {self.kind or type(self).__name__} task needs "
                            f"{', '.join(('image', *self.target_keys))}")

    def collate(self, examples: list[dict], valid: np.ndarray, rng: np.random.Generator | None) -> dict:
        """Host side: transformed examples -> a batch of numpy arrays of static shapes, with `valid` (B,) float32 (0
        for padding). `rng` is a Generator for training batches (batch-level augmentation) and None in evaluation."""
        return stack_collate(examples, valid, rng)

    def adapt(self, module, base, model_cfg) -> dict:
        """Variables for `module` (built for this task as `model_cfg` says) from `base`, a loaded `zoo.Model`."""
        check_shapes(module, base.variables, model_cfg)
        return base.variables

    def init_params(self, rng: jax.Array) -> dict:
        """Trainable parameters the task owns besides the model's (e.g. distillation adapters)."""
        return {}

    def consts(self) -> dict:
        """Arrays the loss reads but never trains (e.g. a teacher's variables), passed into the jitted step."""
        return {}

    def loss(self, forward: Forward, batch: dict, *, task_params: dict, consts: dict,
             rng: jax.Array) -> tuple[jax.Array, dict]:
        """Scalar training loss and per-batch metrics (scalars), calling `forward` on the batch."""
        raise NotImplementedError

    def eval_sums(self, forward: Forward, batch: dict) -> dict:
        """Per-batch sums (over examples with `valid` 1) that `summarize` turns into metrics."""
        raise NotImplementedError

    def summarize(self, sums: Mapping[str, float]) -> dict:
        raise NotImplementedError

    def host_evaluator(self) -> HostEvaluator | None:
        """A fresh `HostEvaluator` for one evaluation pass, or None when `eval_sums` and `summarize` say it all."""
        return None


def model_shapes(module, model_cfg) -> dict:
    """Flat path -> shape of the parameters `module` creates at `model_cfg`'s input size (traced, nothing run)."""
    shape = (1, *model_cfg.input_size, model_cfg.in_chans)
    return {k: v.shape for k, v in flatten(abstract_variables(module, shape)["params"]).items()}


def check_shapes(module, variables: dict, model_cfg) -> None:
    want, have = model_shapes(module, model_cfg), {k: v.shape for k, v in flatten(variables["params"]).items()}
    bad = [f"{k} {have.get(k)} vs {want.get(k)}" for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    if bad:
        raise ValueError(f"the loaded weights do not fit the model this task builds ({len(bad)} parameter(s) differ, "
                        f"loaded vs built: {'; '.join(bad[:5])})")


def reset_classifiers(module, base, model_cfg) -> dict:
    """`base`'s variables (a loaded `zoo.Model`) for `module` built as `model_cfg` says with other classes: every path
    of `base.cfg.classifier` zeros of the new shapes (as `zoo.load` re-initializes a classifier), the rest as loaded,
    which must fit."""
    paths = (base.cfg.classifier,) if isinstance(base.cfg.classifier, str) else tuple(base.cfg.classifier)
    flat = flatten(base.variables["params"])
    for k, shape in model_shapes(module, model_cfg).items():
        if any(k.startswith(p + "/") for p in paths):
            flat[k] = jnp.zeros(shape, flat[k].dtype if k in flat else jnp.float32)
    variables = {**base.variables, "params": unflatten(flat)}
    check_shapes(module, variables, model_cfg)
    return variables


def pad_ragged(arrays: list[np.ndarray], length: int, fill=0, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-example arrays of varying first dimension -> (B, length, ...) padded with `fill`, and (B, length) bool
    marking real rows. More than `length` rows is an error (raise the task's maximum)."""
    rest = next((a.shape[1:] for a in arrays if a.ndim), ())
    out = np.full((len(arrays), length, *rest), fill, dtype or (arrays[0].dtype if arrays else np.float32))
    mask = np.zeros((len(arrays), length), bool)
    for i, a in enumerate(arrays):
        if len(a) > length:
            raise DataError(f"an example has {len(a)} rows, more than the {length} a batch holds (raise the task's "
                            "maximum)")
        out[i, :len(a)], mask[i, :len(a)] = a, True
    return out, mask
