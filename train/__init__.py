"""The shared training loop: fine-tune any zoo model on your data, on one CPU or many accelerators, resumable.

    import train
    cfg = train.TrainConfig()
    cfg.model.name, cfg.data.source, cfg.steps = "tf_efficientnet_lite0", "folder:~/photos", 300
    result = train.fit(cfg)            # or train.fit(cfg, train_data=(images, labels), eval_data=...)
    result.model.predict("cat.jpg")    # a zoo.Model with the trained weights
    cfg.task.label_smoothing = 0.1     # the task's settings: cfg.task (a ClassificationConfig by default)
    model = train.load_run(cfg.workdir)  # later, from the checkpoint

`zoo train` / `zoo eval` on the command line (train/cli.py); shipped recipes in `train.configs`. Data are examples
(dicts: `image` plus targets); a task (`train.tasks`) owns their transforms, batches, loss and metrics, and a new kind
registers itself with `register_task`.
"""

from train.checkpoint import CheckpointError, Checkpoints
from train.config import (CompressConfig, ConfigError, DataConfig, DistillConfig, ModelConfig, OptimConfig, TrainConfig,
                          apply_overrides, valid_keys)
from train.data import DataError, Loader, Source
from train.distill import Distillation
from train.loop import NonFiniteError, Trainer, TrainResult, evaluate, fit, load_run
from train.state import TrainState
from train.summary import read_metrics
from train.forward import Forward
from train.sources import ArraySource, FolderSource, TfdsSource, write_image_folder
from train.tasks import Classification, ClassificationConfig, Task, TaskConfig, build_task, register_task
from train.transforms import Transform

__all__ = [
    "ArraySource", "CheckpointError", "Checkpoints", "Classification", "ClassificationConfig", "CompressConfig",
    "ConfigError", "DataConfig", "DataError", "Distillation", "DistillConfig", "FolderSource", "Forward", "Loader",
    "ModelConfig", "NonFiniteError", "OptimConfig", "Source", "Task", "TaskConfig", "TfdsSource", "TrainConfig",
    "TrainResult", "TrainState", "Trainer", "Transform", "apply_overrides", "build_task", "evaluate", "fit",
    "load_run", "read_metrics", "register_task", "valid_keys", "write_image_folder",
]
