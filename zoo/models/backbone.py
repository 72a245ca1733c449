"""The backbone side of the model contract (see `zoo.models.heads` for how heads consume it).

A backbone's output is a dict: one NHWC map per `ModelCfg.feature_info` entry, keyed by its name, at the entry's
stride and width, then `"pre_logits"`, the pooled features the classifier's last Linear takes.

Every family's constructor takes injected layer factories `conv`, `norm` and `dense` (None: the defaults), so
quantized, sparse or slimmable layers substitute without forking a model (`layer_factories`). Activations are named
(`act="relu6"`) and substituted at trace time (`zoo.layers.activations.override_activations`).
"""

from __future__ import annotations

from typing import Sequence

from zoo.config import FeatureInfo
from zoo.layers.factories import layer_factories  # noqa: F401  (families import it from here)

PRE_LOGITS = "pre_logits"


def feature_dict(names: Sequence[str], maps: Sequence, pre_logits) -> dict:
    """The backbone output: `{name: map for each feature_info name, "pre_logits": pooled}` (in that order)."""
    if len(names) != len(maps):
        raise ValueError(f"{len(maps)} feature maps for {len(names)} feature_info names {list(names)}")
    return {**dict(zip(names, maps)), PRE_LOGITS: pre_logits}


def stage_feature_info(stem_chs: int, strides: Sequence[int], channels: Sequence[int],
                       stem_stride: int = 2) -> tuple[FeatureInfo, ...]:
    """The last output at each stride of a stem + stages network (timm's feature_info): the stem's when the first
    stage downsamples, then every stage that the next one downsamples, and the last stage.

    `strides[i]` is stage i's stride (that of its first block), `channels[i]` its output width.
    """
    infos, stride = [], stem_stride
    if strides[0] > 1:
        infos.append(FeatureInfo("stem", stem_stride, stem_chs))
    for i, (s, c) in enumerate(zip(strides, channels)):
        stride *= s
        if i + 1 == len(strides) or strides[i + 1] > 1:
            infos.append(FeatureInfo(f"stages_{i}", stride, c))
    return tuple(infos)
