"""SSDLite's head on other registered backbones (no reference implementation): the maps at strides 16 and 32 picked
from the backbone's `feature_info`, parameter and MAC counts as measured, one output row per default box of
`zoo.models.ssdlite` (whose post-processing they share), and the backbone's parameters named as in its classifier."""

from __future__ import annotations

import pytest

import zoo
from zoo.abstract import abstract_variables
from zoo.convert import flatten_variables
from zoo.counting import count_jaxpr_macs, count_params
from zoo.models import ssdlite, ssdlite_backbones
from zoo.registry import get_entry

from traced import inference_trace

HW = (320, 320)
# name: (parameters, MACs at 320x320 from the jaxpr, the backbone maps read), measured
PRESETS = {
    "ssdlite320_mobilenetv2_100": (3_154_588, 635_181_504, ("stages_4", "stages_6")),
    "ssdlite320_tf_efficientnet_lite0": (4_311_196, 811_216_704, ("stages_4", "stages_6")),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_counts_maps_outputs_and_backbone_names(name):
    params, macs, taps = PRESETS[name]
    cfg = get_entry(name).cfg
    backbone = ssdlite_backbones.VARIANTS[name]
    assert cfg.task == "detection" and cfg.family == "ssdlite" and cfg.num_classes == 91 and not cfg.twin
    module = zoo.create_model(name)
    assert module.heads[0][1].taps == taps
    variables = abstract_variables(module, (1, *HW, 3))
    assert count_params(variables["params"]) == params
    traced = inference_trace(name, (1, *HW, 3))
    assert count_jaxpr_macs(traced.jaxpr.jaxpr) == macs
    anchors = len(ssdlite.anchors(HW))
    assert traced.out_info["cls_logits"].shape == (1, anchors, 91)
    assert traced.out_info["bbox_regression"].shape == (1, anchors, 4)
    ours = flatten_variables(variables)
    classifier = flatten_variables(abstract_variables(zoo.create_model(backbone), (1, *HW, 3)))
    trunk = {k: v for k, v in ours.items() if k.split("/")[1] != ssdlite_backbones.HEAD}
    assert trunk and all(classifier.get(k) == v for k, v in trunk.items())
    assert {k.split("/")[1] for k in set(classifier) - set(trunk)} == {"head"}  # pre-logits conv and classifier
    for path in cfg.classifier:
        assert f"params/{path}/kernel" in ours
    small = zoo.create_model(name, num_classes=5)
    assert abstract_variables(small, (1, *HW, 3))["params"]["ssd"]["cls_0"]["conv"]["kernel"].shape[-1] == 6 * 5
