"""`zoo.load`: a model by name with its weights, as a small bundle that classifies images; `zoo.model_info`."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.abstract import abstract_variables
from zoo.config import ModelCfg, PretrainedCfg, WeightSource
from zoo.convert import flatten_variables
from zoo.counting import count_macs, count_params
from zoo.inputs import check_images
from zoo.labels import dataset_labels
from zoo.measured import tflite_latency
from zoo.layers.conv import depthwise_impl, resolved_depthwise_impl
from zoo.preprocess import preprocess
from zoo.registry import create_model, get_entry, split_name
from zoo.weights.merge import merge_variables
from zoo.weights.layouts import is_zoo_named, recognize_layout
from zoo.weights.pretrained import load_converted
from zoo.weights.torch_reader import load_state_dict

log = logging.getLogger("zoo")


@dataclass(frozen=True)
class Model:
    """A module, its variables (`{"params", "batch_stats"}`) and the config its inputs must follow."""

    module: nn.Module
    variables: dict
    cfg: ModelCfg
    pretrained: PretrainedCfg | None = None

    @property
    def name(self) -> str:
        return self.cfg.name + (f".{self.pretrained.tag}" if self.pretrained else "")

    @property
    def labels(self) -> tuple[str, ...] | None:
        """The class names of its weights' dataset (`zoo.labels`), or None when they are not known or its head
        has another number of classes."""
        labels = dataset_labels(self.pretrained, self.cfg.num_classes)
        return labels if labels is not None and len(labels) == self.cfg.num_classes else None

    @functools.cached_property
    def _apply(self):
        # The depthwise formulation is read at trace time, so it is a static argument: a call under another
        # formulation compiles its own trace instead of reusing the first one.
        def run(variables, x, features, impl):
            with depthwise_impl(impl):
                return self.module.apply(variables, x, train=False, features=features)

        return jax.jit(run, static_argnums=(2, 3))

    def __call__(self, images, *, features: bool = False):
        """Logits of a float NHWC batch, normalized as `preprocess` does; `features=True`: the backbone's dict of named
        outputs (`cfg.feature_info` maps and `pre_logits`, see `zoo.models.heads`)."""
        check_images(images, self.cfg.in_chans, self.cfg.name)
        return self._apply(self.variables, jnp.asarray(images), features, resolved_depthwise_impl())

    def preprocess(self, images) -> np.ndarray:
        """Paths, PIL images or uint8 arrays -> the normalized float batch this model expects."""
        return preprocess(images, self.cfg)

    def predict(self, images, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Top-k (label, probability) per image."""
        probs = np.asarray(jax.nn.softmax(self(self.preprocess(images)), axis=-1))
        names = self.labels or tuple(str(i) for i in range(probs.shape[-1]))
        out = []
        for p in probs:
            idx = np.argsort(-p)[:top_k]
            out.append([(names[i], float(p[i])) for i in idx])
        return out

    @property
    def num_params(self) -> int:
        return count_params(self.variables["params"])


def init_variables(module: nn.Module, cfg: ModelCfg, seed: int = 0) -> dict:
    x = jnp.zeros((1, *cfg.input_size, cfg.in_chans), jnp.float32)
    return jax.jit(module.init)(jax.random.key(seed), x)


def load(
    name_or_tag: str,
    *,
    pretrained: bool = True,
    num_classes: int | None = None,
    in_chans: int | None = None,
    weights: str | None = None,
    layout: str | None = None,
    seed: int = 0,
    progress: bool = True,
    **overrides: Any,
) -> Model:
    """Build `name[.tag]` and load its pretrained weights (the default tag when none is given).

    `num_classes` different from the checkpoint's re-initializes only the classifier (logged); `in_chans != 3`
    adapts the first convolution. `weights=` reads a local checkpoint (.pth, .safetensors) instead of the registered
    sources, in `layout` ("timm", "torchvision", "lukemelas"; by default recognized from the file's keys).
    `pretrained=False` gives randomly initialized variables; `pretrained` takes a bool only.
    """
    if not isinstance(pretrained, bool):
        raise TypeError(f"pretrained= takes True or False, got {pretrained!r}; pass a local checkpoint as weights=<file>")
    entry = get_entry(name_or_tag)
    _, tag = split_name(name_or_tag)
    pcfg = entry.pretrained_cfg(tag) if (tag or (pretrained and entry.pretrained)) else None
    if weights is not None:
        pcfg = _local_weights(entry, pcfg, weights, layout)
    elif pretrained and pcfg is None:
        raise ValueError(f"model '{entry.name}' has no pretrained weights; use pretrained=False or weights=<file>")
    pretrained = pretrained or weights is not None
    cfg = pcfg.apply_to(entry.cfg) if pcfg else entry.cfg
    if num_classes is not None:
        cfg = cfg.replace(num_classes=num_classes)
    if in_chans is not None:
        cfg = cfg.replace(in_chans=in_chans, mean=_fit(cfg.mean, in_chans), std=_fit(cfg.std, in_chans))
    module = create_model(entry.name, num_classes=cfg.num_classes, in_chans=cfg.in_chans, **overrides)
    if not pretrained:
        variables = init_variables(module, cfg, seed)
    else:
        # Structure only: compiling a random init costs seconds to minutes on XLA:CPU and is not needed here.
        variables = abstract_variables(module, (1, *cfg.input_size, cfg.in_chans))
        # the checkpoint's own structure; the same as `variables` unless classes, channels or resolution changed
        same = (cfg.num_classes, cfg.in_chans, cfg.input_size) == (pcfg.num_classes, entry.cfg.in_chans,
                                                                   entry.cfg.input_size)
        reference = module if same else create_model(entry.name, num_classes=pcfg.num_classes, **overrides)
        target = flatten_variables(variables if same else
                                   abstract_variables(reference, (1, *entry.cfg.input_size, entry.cfg.in_chans)))
        if weights is not None and layout is None:
            pcfg = dataclasses.replace(pcfg, layout=_file_layout(entry, reference, target, pcfg))
        converter = entry.converters[pcfg.layout](reference)
        arrays = load_converted(entry.name, pcfg, converter, target, cache=weights is None, progress=progress)
        reset = ()
        if cfg.num_classes != pcfg.num_classes:
            reset = (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier)
            log.warning("%s: classifier re-initialized for %d classes (checkpoint has %d)", entry.name,
                        cfg.num_classes, pcfg.num_classes)
        variables = merge_variables(variables, arrays, reset=reset, first_conv=cfg.first_conv)
        variables = jax.device_put(variables)  # one transfer (jnp.asarray per leaf dispatches an op per array)
    return Model(module, variables, cfg, pcfg if pretrained else None)


def _local_weights(entry, pcfg: PretrainedCfg | None, path: str, layout: str | None) -> PretrainedCfg:
    """A pretrained record for a user's file: the tag's preprocessing, if any, and the file's layout."""
    layout = layout or (pcfg.layout if pcfg else entry.cfg.twin.split(":")[0])
    if layout not in entry.converters:
        raise ValueError(f"model '{entry.name}' reads layouts {sorted(entry.converters)}, not '{layout}'")
    base = pcfg or PretrainedCfg(tag="local", sources=(), layout=layout)
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    source = WeightSource("file", str(path))
    return dataclasses.replace(base, tag="local", sources=(source,), layout=layout)


def _file_layout(entry, reference: nn.Module, target: dict, pcfg: PretrainedCfg) -> str:
    """The layout of a user's file, recognized from its keys (whatever the default tag's layout is)."""
    path = pcfg.sources[0].location
    state_dict = load_state_dict(path)
    if is_zoo_named(state_dict) or len(entry.converters) == 1:
        return pcfg.layout
    renames = {name: make(reference) for name, make in entry.converters.items()}
    return recognize_layout(state_dict, renames, target, source=path)


def _fit(stats: tuple[float, ...], n: int) -> tuple[float, ...]:
    """Per-channel mean/std for `n` channels (the RGB average when not 3)."""
    return stats if n == len(stats) else (float(np.mean(stats)),) * n


@functools.cache
def model_info(name: str, input_size: tuple[int, int] | None = None) -> dict:
    """Parameters, MACs (from the jaxpr, at `input_size` or the default resolution), tags and source accuracy."""
    entry = get_entry(name)
    cfg = entry.cfg if input_size is None else entry.cfg.replace(input_size=tuple(input_size))
    module = create_model(entry.name)
    shape = (1, *cfg.input_size, cfg.in_chans)
    variables = abstract_variables(module, shape)
    return {
        "name": entry.name,
        "family": cfg.family,
        "task": cfg.task,
        "params": count_params(variables["params"]),
        "macs": count_macs(module, variables, shape),
        "input_size": cfg.input_size,
        "twin": cfg.twin,
        "paper": cfg.paper,
        "feature_info": [dataclasses.asdict(f) for f in cfg.feature_info],
        "tflite_latency": tflite_latency(entry.name),  # measured, shipped with the package (`zoo.measured`)
        "pretrained": [
            {"tag": p.tag, "top1": p.top1, "top5": p.top5, "license": p.license,
             "input_size": p.input_size or cfg.input_size, "sources": [s.describe() for s in p.sources]}
            for p in entry.pretrained
        ],
    }
