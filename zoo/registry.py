"""Model registry: names -> builder functions, their `ModelCfg` and pretrained tags.

A variant is a function that returns a configured linen module, decorated with `@register_model(cfg, pretrained)`.
Building does no I/O (see `zoo.load` for weights).
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Callable, Mapping

import flax.linen as nn

from zoo.config import ModelCfg, PretrainedCfg


TASKS = ("classification", "segmentation", "detection")


class UnknownModelError(KeyError):
    """Raised for a model name or tag that is not registered; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    cfg: ModelCfg
    pretrained: tuple[PretrainedCfg, ...]
    # layout ("timm", "torchvision", ...) -> fn(module) -> rename(torch_module_path) -> zoo path (see zoo.convert)
    converters: Mapping[str, Callable]

    @property
    def default_tag(self) -> str | None:
        return self.pretrained[0].tag if self.pretrained else None

    def pretrained_cfg(self, tag: str | None) -> PretrainedCfg:
        tag = tag or self.default_tag
        for p in self.pretrained:
            if p.tag == tag:
                return p
        tags = ", ".join(p.tag for p in self.pretrained) or "none"
        family = [f"{e.name}.{p.tag}" for e in _REGISTRY.values() if e.cfg.family == self.cfg.family
                  and e.name != self.name for p in e.pretrained]
        others = f"; the family's other weights ({self.cfg.family}): {', '.join(family)}" if family else ""
        raise UnknownModelError(f"model '{self.name}' has no pretrained tag '{tag}'; its tags: {tags}{others}")


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(cfg: ModelCfg, pretrained: tuple[PretrainedCfg, ...] = (), converters: Mapping[str, Callable] = {}):
    """Register `fn(**overrides) -> nn.Module` under `cfg.name`. Duplicate names raise."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = cfg.name
        if cfg.task not in TASKS:
            raise ValueError(f"model '{name}' has unknown task '{cfg.task}'; tasks: {', '.join(TASKS)}")
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        tags = [p.tag for p in pretrained]
        if len(set(tags)) != len(tags):
            raise ValueError(f"model '{name}' has duplicate pretrained tags: {tags}")
        missing = {p.layout for p in pretrained} - set(converters)
        if missing:
            raise ValueError(f"model '{name}' has weights in layout(s) {missing} but no converter for them")
        _REGISTRY[name] = ModelEntry(name, fn, cfg, tuple(pretrained), dict(converters))
        return fn

    return wrap


def split_name(name_or_tag: str) -> tuple[str, str | None]:
    """'mobilenetv3_large_100.ra_in1k' -> ('mobilenetv3_large_100', 'ra_in1k')."""
    name, _, tag = name_or_tag.partition(".")
    return name, (tag or None)


def get_entry(name_or_tag: str) -> ModelEntry:
    name, _ = split_name(name_or_tag)
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model '{name}'.{hint} `zoo.list_models()` lists all {len(_REGISTRY)} models."
        ) from None


def list_models(pattern: str | None = None, pretrained: bool = False, task: str | None = None) -> list[str]:
    """Registered names matching a shell-style `pattern`; with `pretrained=True`, `name.tag` for every tag; with
    `task` ("classification", "segmentation", "detection"), only the models of that task (`ModelCfg.task`)."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task '{task}'; tasks: {', '.join(TASKS)}")
    names = sorted(n for n, e in _REGISTRY.items() if task is None or e.cfg.task == task)
    if pretrained:
        names = [f"{n}.{p.tag}" for n in names for p in _REGISTRY[n].pretrained]
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def create_model(name: str, *, num_classes: int | None = None, **overrides) -> nn.Module:
    """Build the named module (no weights, no I/O). Unknown keyword arguments raise."""
    entry = get_entry(name)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    try:
        return entry.builder(**overrides)
    except TypeError as e:  # a dataclass module rejects unknown fields with a terse message
        raise TypeError(f"create_model('{entry.name}'): {e}") from None
