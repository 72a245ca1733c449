"""Tasks: the interface (`Task`), the registry of kinds (`register_task`, `build_task`) and the shipped kinds.

Each kind lives in its own module and registers itself on import; this package imports every shipped one so the
registry is complete.
"""

from train.tasks.base import (HostEvaluator, Task, TaskConfig, build_task, check_shapes, pad_ragged,
                              register_task, reset_classifiers, task_config_class, task_kinds)
from train.tasks.classification import Classification, ClassificationConfig
from train.tasks.detection import Detection, DetectionConfig
from train.tasks.segmentation import Segmentation, SegmentationConfig

__all__ = ["Classification", "ClassificationConfig", "Detection", "DetectionConfig", "HostEvaluator", "Segmentation",
           "SegmentationConfig", "Task", "TaskConfig", "build_task", "check_shapes", "pad_ragged", "register_task",
           "reset_classifiers", "task_config_class", "task_kinds"]
