"""Registered classifiers as detection backbones: the trunk without the layers only the classifier reads, the maps a
head reads picked by stride, and the classifier's weights put into a detector by name.

A detector is a `DetectionModel`: a `TaskModel` (`zoo.models.heads`) whose backbone keeps the classifier's parameter
names (`stem/...`, `stages_N/...`), so ImageNet weights of the classifier load into it (`with_backbone_weights`).
What a head does not read is not built: the MobileNet family's pre-logits conv (`head_type="pool"`, as SSDLite's
trunk in `zoo.models.ssdlite`), MobileViT's `final_conv` (the 1x1 expansion its classifier pools; its detection and
segmentation heads read the last stage, as ml-cvnets' do) - so parameter and MAC counts are those of what runs.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from zoo.config import FeatureInfo
from zoo.convert import flatten_variables
from zoo.models.heads import TaskModel
from zoo.models.mobilenet_base import MobileNet
from zoo.models.mobilevit import MobileViT
from zoo.registry import create_model
from zoo.weights.merge import merge_variables


def detection_trunk(name: str, **overrides) -> tuple[nn.Module, tuple[str, ...]]:
    """The registered classifier `name` built without its classifier (`overrides` go to its constructor), and the
    paths of its layers that a `DetectionModel` runs as the identity (see the module docstring)."""
    module = create_model(name, num_classes=0, **overrides)
    if isinstance(module, MobileNet):
        return module.clone(head_type="pool"), ()
    if isinstance(module, MobileViT):
        return module, ("final_conv",)
    return module, ()


def maps_at(feature_info: Sequence[FeatureInfo], strides: Sequence[int], backbone: str = "the backbone"
            ) -> tuple[str, ...]:
    """The names of the backbone maps at `strides`: the deepest (last in `feature_info`) where a dilated backbone has
    several at one stride; an error naming the maps there are when a stride has none."""
    names = []
    for s in strides:
        found = [f.name for f in feature_info if f.stride == s]
        if not found:
            have = ", ".join(f"{f.name} (stride {f.stride})" for f in feature_info)
            raise ValueError(f"{backbone} has no map at stride {s} (needs strides {tuple(strides)}); it has {have}")
        names.append(found[-1])
    return tuple(names)


class DetectionModel(TaskModel):
    """`TaskModel` whose backbone runs the layers at `skip` (paths, as in the parameter tree) as the identity."""

    skip: tuple[str, ...] = ()

    def __call__(self, x, train: bool = False, features: bool = False):
        feats = self.backbone_features(x, train)
        return feats if features else self.apply_heads(feats, train)

    def backbone_features(self, x, train: bool = False) -> dict:
        if not self.skip:
            return self.backbone(x, train=train, features=True)
        skipped, depth = set(), len(self.path)  # the backbone shares this module's scope: its paths continue ours

        def identity(next_fun, args, kwargs, context):
            path = "/".join(context.module.path[depth:])
            if context.method_name == "__call__" and path in self.skip:
                skipped.add(path)
                return args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(identity):
            feats = self.backbone(x, train=train, features=True)
        if skipped != set(self.skip):
            raise ValueError(f"skip {sorted(set(self.skip) - skipped)}: no module of {type(self.backbone).__name__} "
                             "the backbone ran")
        return feats


def with_backbone_weights(variables: dict, classifier_variables: dict, heads: Sequence[str]) -> dict:
    """`variables` of a detector (concrete or abstract) with every leaf outside the `heads` (module paths, e.g.
    ("det",)) taken from the classifier's variables of the same name. The classifier's own layers that the detector
    lacks are left out; a backbone leaf the classifier lacks, or holds in another shape, raises
    `WeightsMismatchError` (as `zoo.load` does). Abstract head leaves become zeros (`merge_variables`)."""
    wanted = set(flatten_variables(variables))
    arrays = dict(zip(flatten_variables(classifier_variables), jax.tree_util.tree_leaves(classifier_variables)))
    return merge_variables(variables, {k: v for k, v in arrays.items() if k in wanted}, reset=tuple(heads))

