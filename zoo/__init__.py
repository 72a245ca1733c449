"""Efficient vision models in JAX: load a pretrained lightweight backbone by name, fine-tune, compress, export."""

from zoo import models as _models  # noqa: F401  (registers every family)
from zoo.config import FeatureInfo, ModelCfg, PretrainedCfg, WeightSource
from zoo.registry import UnknownModelError, create_model, list_models, register_model

__version__ = "0.1.0"
from zoo.api import Model, load, model_info
from zoo.counting import count_macs, count_params
