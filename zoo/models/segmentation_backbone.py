"""Registered classifiers as segmentation backbones: the trunk without the layers only the classifier reads
(`zoo.models.detection_backbone`, and EfficientViT's pre-logits head), dilated where the family allows
(`output_stride`), logits resized to the input; the maps a head reads are picked by stride
(`zoo.models.detection_backbone.maps_at`).

The backbone keeps its classifier's parameter names (`stem/...`, `stages_N/...`): ImageNet weights of the classifier
go into it by name (`zoo.models.detection_backbone.with_backbone_weights`).
"""

from __future__ import annotations

import flax.linen as nn

from zoo.config import FeatureInfo
from zoo.models import mobilenet_base
from zoo.models.detection_backbone import DetectionModel, detection_trunk
from zoo.models.efficientvit_mit import EfficientViTMit
from zoo.models.mobilenet_base import MobileNet
from zoo.models.segmentation import SegmentationModel
from zoo.registry import get_entry


class BackboneSegmentationModel(SegmentationModel):
    """`SegmentationModel` whose backbone runs the layers at `skip` (paths, as in the parameter tree) as the identity
    (as `DetectionModel`'s): what only the classifier reads is neither built nor run."""

    skip: tuple[str, ...] = ()

    def tapped_features(self, x, train: bool = False) -> dict:
        if self.taps:
            raise ValueError("BackboneSegmentationModel reads the backbone's feature_info maps, not taps")
        return DetectionModel.backbone_features(self, x, train)


def segmentation_trunk(name: str, output_stride: int = 32, **overrides
                       ) -> tuple[nn.Module, tuple[str, ...], tuple[FeatureInfo, ...]]:
    """The registered classifier `name` without its classifier, dilated to `output_stride` (the MobileNet family's
    option; others raise on it), the paths it runs as the identity, and the `feature_info` of the maps it returns
    (the dilated strides: a dilated stage keeps its name at the output stride)."""
    if output_stride != 32:
        overrides["output_stride"] = output_stride
    try:
        trunk, skip = detection_trunk(name, **overrides)
    except TypeError as e:
        if "output_stride" not in str(e):
            raise
        raise ValueError(f"{name} cannot be dilated to output_stride {output_stride} (the MobileNet family's "
                         "option): build it at output_stride 32") from None
    if isinstance(trunk, EfficientViTMit):
        skip += ("head",)  # its pre-logits conv, pool, Linear and LayerNorm: classifier only
    if isinstance(trunk, MobileNet):
        info = mobilenet_base.feature_info(trunk.stages, output_stride=trunk.output_stride)
    else:
        info = get_entry(name).cfg.feature_info
    return trunk, skip, info


def preprocessing(backbone: str) -> dict:
    """The mean, std and first conv of the backbone's default weights (its classifier's, where it has none)."""
    entry = get_entry(backbone)
    cfg = entry.pretrained_cfg(None).apply_to(entry.cfg) if entry.pretrained else entry.cfg
    return dict(mean=cfg.mean, std=cfg.std, first_conv=cfg.first_conv)
