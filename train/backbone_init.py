"""A task model (a detector, a segmenter) whose backbone starts from a pretrained classifier of the zoo: what
`model.backbone_weights` does.

The task models build their backbone under the classifier's own module names (`stem/...`, `stages_N/...`), so the
classifier's weights go into it by name (`zoo.models.detection_backbone.with_backbone_weights`). The modules the task
model has and the classifier has not (its top-level names: a detector's `det` or `ssd`, a segmenter's `out`) are its
heads, which keep their fresh initialization; the classifier's own head is left out.
"""

from __future__ import annotations

import zoo
from zoo.models.detection_backbone import with_backbone_weights


def with_pretrained_backbone(model: zoo.Model, classifier: str, *, progress: bool = True) -> zoo.Model:
    """`model` with every module it shares by name with the pretrained zoo model `classifier` (e.g. "mobilenet_v2")
    loaded from it. A shared module whose weights differ in shape (another backbone variant) raises
    `WeightsMismatchError` naming the leaf; a classifier that shares no module with `model` is a ValueError."""
    source = zoo.load(classifier, progress=progress)
    own, theirs = set(model.variables["params"]), set(source.variables["params"])
    if not own & theirs:
        raise ValueError(f"model.backbone_weights={classifier!r}: its modules ({', '.join(sorted(theirs))}) share no "
                         f"name with {model.cfg.name}'s ({', '.join(sorted(own))}); name the classifier its backbone "
                         "was built from")
    heads = tuple(sorted(own - theirs))
    return zoo.Model(model.module, with_backbone_weights(model.variables, source.variables, heads), model.cfg)
