"""Semantic segmentation models: a backbone and heads (`TaskModel`) whose logits are upsampled to the input.

`module.apply(v, x)` returns `{"out": logits}` (plus `"aux"` where the model has an auxiliary head), each NHWC
float32 at the input's height and width, resized bilinearly with half-pixel centers as torchvision's segmentation
models do (`F.interpolate(..., align_corners=False)`); `features=True` returns the dict the heads read: the backbone's,
with the `taps`. The backbone's parameters keep the names they have in its classifier (`stem/...`, `stages_N/...`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from zoo.config import FeatureInfo
from zoo.layers.resize import resize_bilinear
from zoo.models.heads import TaskModel
from zoo.models import mobilenetv3  # noqa: F401  (registers the trunk's classifier before the families ask for it)
from zoo.models.mobilenet_base import feature_info
from zoo.registry import create_model


class SegmentationModel(TaskModel):
    """`TaskModel` whose heads give per-pixel logits at a fraction of the input size: each is resized to the input
    (in float32) and returned by its name.

    `taps`: paths of backbone submodules (as in the parameter tree, e.g. "stages_2/block_0") whose outputs join the
    backbone's dict under their path. torchvision's MobileNetV3 heads read the output of the first block of the
    stride-8 stage (`features[4]`), which the backbone's dict (the last map of each stage) does not hold.
    """

    taps: tuple[str, ...] = ()

    def __call__(self, x, train: bool = False, features: bool = False):
        feats = self.tapped_features(x, train)
        if features:
            return feats
        out = self.apply_heads(feats, train)
        return {name: resize_bilinear(y.astype(jnp.float32), x.shape[1:3]) for name, y in out.items()}

    def tapped_features(self, x, train: bool = False) -> dict:
        if not self.taps:
            return self.backbone(x, train=train, features=True)
        tapped, depth = {}, len(self.path)  # the backbone shares this module's scope: its paths continue ours

        def record(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if context.method_name == "__call__":
                path = "/".join(context.module.path[depth:])
                if path in self.taps:
                    tapped[path] = y
            return y

        with nn.intercept_methods(record):
            feats = self.backbone(x, train=train, features=True)
        missing = [t for t in self.taps if t not in tapped]
        if missing:
            raise ValueError(f"taps {missing} name no module the backbone ran ({type(self.backbone).__name__}'s "
                             "parameter paths, e.g. 'stages_2/block_0')")
        return {**feats, **tapped}


# torchvision's `features[4]`: the stride-8 map its MobileNetV3 segmentation heads read (40 channels)
MOBILENET_V3_LARGE_STRIDE8 = "stages_2/block_0"


def mobilenet_v3_large_trunk(**overrides) -> nn.Module:
    """torchvision's `mobilenet_v3_large(dilated=True).features` (its segmentation backbone): output stride 16, the
    block whose stride is removed already dilated, and no pre-logits conv (`head_type="pool"`: the heads read maps)."""
    return create_model("mobilenet_v3_large", num_classes=0, output_stride=16, dilate_first=True, head_type="pool",
                        **overrides)


def trunk_feature_info(trunk: nn.Module, taps: tuple[FeatureInfo, ...] = ()) -> tuple[FeatureInfo, ...]:
    """The dict a segmentation model returns with `features=True`: the dilated trunk's maps and the taps."""
    return (*feature_info(trunk.stages, output_stride=trunk.output_stride), *taps)
