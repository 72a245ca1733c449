"""GFL-Lite, the anchor-free detector on registered backbones (no reference implementation): every preset builds with
its maps picked by stride, parameter and MAC counts as measured, the raw outputs in the order of the documented grid,
box coding and post-processing on hand-made outputs, a class count of its own, jit of forward and post-processing,
and the classifier's ImageNet weights loading into the backbone by name."""

from __future__ import annotations

from functools import partial

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.abstract import abstract_variables
from zoo.convert import flatten_variables
from zoo.counting import count_jaxpr_macs, count_params
from zoo.layers import kinds
from zoo.layers.distances import decode_distances, distribution_integral, distribution_targets, encode_distances
from zoo.layers.gfl_head import PRIOR_LOGIT, GFLHead
from zoo.layers.conv import Conv2d, depthwise_impl
from zoo.layers.norm import batch_norm
from zoo.layers.pan import upsample_nearest_2x
from zoo.models import gfl_lite
from zoo.models.detection_backbone import maps_at, with_backbone_weights
from zoo.registry import get_entry
from zoo.weights.errors import WeightsMismatchError

from reference import random_images, random_variables
from traced import inference_trace

HW = (320, 320)
LOCATIONS = 40 * 40 + 20 * 20 + 10 * 10  # strides 8, 16, 32 of a 320x320 input
# name: (parameters, MACs at 320x320 from the jaxpr, the backbone maps read), measured
PRESETS = {
    "gfl_lite320_mobilenetv2_100": (2_013_072, 683_532_800, ("stages_2", "stages_4", "stages_6")),
    "gfl_lite320_mobilenetv3_large_100": (3_237_056, 556_598_400, ("stages_2", "stages_4", "stages_6")),
    "gfl_lite320_tf_efficientnet_lite0": (3_162_512, 857_648_000, ("stages_2", "stages_4", "stages_6")),
    "gfl_lite320_mobilevit_xs": (2_076_608, 1_817_206_400, ("stages_2", "stages_3", "stages_4")),
}
# the classifier's layers a detector does not build: its pre-logits conv or expansion, and the classifier
CLASSIFIER_ONLY = {"mobilenetv2_100": {"head"}, "mobilenetv3_large_100": {"head"}, "tf_efficientnet_lite0": {"head"},
                   "mobilevit_xs": {"final_conv", "head"}}


def test_registry_lists_every_preset():
    assert zoo.list_models("gfl_lite*") == sorted(PRESETS)
    assert set(PRESETS) <= set(zoo.list_models(task="detection"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_counts_maps_and_backbone_names(name):
    """Counts as measured, the maps at strides 8, 16, 32 of the backbone's `feature_info`, one output row per location,
    and the backbone's parameters named (and shaped) as in its classifier."""
    params, macs, taps = PRESETS[name]
    cfg = get_entry(name).cfg
    backbone = gfl_lite.VARIANTS[name][0]
    assert cfg.task == "detection" and cfg.num_classes == 80 and cfg.input_size == HW and not cfg.twin
    assert cfg.feature_info == get_entry(backbone).cfg.feature_info
    module = zoo.create_model(name)
    assert module.heads[0][1].taps == taps == maps_at(cfg.feature_info, gfl_lite.STRIDES)
    variables = abstract_variables(module, (1, *HW, 3))
    assert count_params(variables["params"]) == params
    traced = inference_trace(name, (1, *HW, 3))
    assert count_jaxpr_macs(traced.jaxpr.jaxpr) == macs
    assert traced.out_info["cls_logits"].shape == (1, LOCATIONS, 80)
    assert traced.out_info["box_regression"].shape == (1, LOCATIONS, 4 * (gfl_lite.REG_MAX + 1))
    ours = flatten_variables(variables)
    classifier = flatten_variables(abstract_variables(zoo.create_model(backbone), (1, *HW, 3)))
    trunk = {k: v for k, v in ours.items() if k.split("/")[1] != gfl_lite.HEAD}
    assert trunk and all(classifier.get(k) == v for k, v in trunk.items())
    assert {k.split("/")[1] for k in set(classifier) - set(trunk)} == CLASSIFIER_ONLY[backbone]
    for path in cfg.classifier:
        assert f"params/{path}/kernel" in ours


def test_locations_follow_the_documented_grid():
    """Locations level by level, row by row, at the cells' centres; the head's outputs in that order (a head without
    tower whose class predictor copies its input gives each location's index back)."""
    centres, strides = gfl_lite.points((128, 96))
    assert centres.shape == (16 * 12 + 8 * 6 + 4 * 3, 2)
    np.testing.assert_array_equal(centres[:3], [[4, 4], [12, 4], [20, 4]])
    np.testing.assert_array_equal(centres[12], [4, 12])  # the second row of the stride-8 map
    np.testing.assert_array_equal(centres[16 * 12], [8, 8])  # the first location at stride 16
    np.testing.assert_array_equal(centres[-1], [80, 112])  # the last cell at stride 32
    assert strides.tolist() == [8.0] * 192 + [16.0] * 48 + [32.0] * 12
    sizes = [(16, 12), (8, 6), (4, 3)]
    maps = [np.arange(h * w, dtype=np.float32).reshape(1, h, w, 1) + 1000 * i for i, (h, w) in enumerate(sizes)]
    head = GFLHead(num_classes=1, reg_max=1, width=1, conv=Conv2d, norm=batch_norm(), depth=0)
    variables = jax.tree_util.tree_map_with_path(
        lambda p, a: np.full(a.shape, "cls" in str(p[-2]) and "kernel" in str(p[-1]), np.float32),
        jax.eval_shape(head.init, jax.random.key(0), maps))
    out = jax.jit(head.apply)(variables, maps)
    expected = np.concatenate([m.ravel() for m in maps])
    np.testing.assert_array_equal(out["cls_logits"][0, :, 0] - PRIOR_LOGIT, expected)
    assert out["box_regression"].shape == (1, len(centres), 8)


def test_nearest_upsampling_fits_ceil_halved_maps():
    x = np.arange(2 * 3 * 2, dtype=np.float32).reshape(1, 2, 3, 2)
    up = upsample_nearest_2x(x, (4, 5))
    np.testing.assert_array_equal(up, np.repeat(np.repeat(x, 2, 1), 2, 2)[:, :4, :5])
    with pytest.raises(ValueError, match="doubles"):
        upsample_nearest_2x(x, (3, 7))


def test_box_coding_round_trips_exactly():
    """Known boxes at known locations: their distances in strides, the two-hot distributions of those (clipped at
    reg_max), and back to the same boxes through the raw-output decoding."""
    reg_max = gfl_lite.REG_MAX
    centres, strides = gfl_lite.points((128, 128))
    # (row, col) (5, 6) at stride 8, (3, 2) at 16, (1, 1) at 32
    at = [5 * 16 + 6, 16 * 16 + 3 * 8 + 2, 16 * 16 + 8 * 8 + 5]
    np.testing.assert_array_equal(centres[at], [[52, 44], [40, 56], [48, 48]])
    boxes = np.array([[30, 20, 70, 60], [4, 10, 100, 120], [0, 0, 128, 128]], np.float32)
    # every location's assigned box the same one: the family's encode and decode over the raw outputs' layout
    assigned = np.broadcast_to(np.float32([20, 20, 90, 100]), (1, len(centres), 4))

    @jax.jit
    def code(boxes, assigned):
        dist = encode_distances(boxes, centres[at], strides[at])
        targets = distribution_targets(dist, reg_max)
        regression = jnp.log(gfl_lite.encode(assigned, (128, 128))).reshape(1, len(centres), -1)
        return {"dist": dist, "boxes": decode_distances(dist, centres[at], strides[at]), "targets": targets,
                "integral": distribution_integral(jnp.log(targets)),
                "edge": distribution_targets(jnp.asarray([0.0, 7.0, 9.5, -1.0]), reg_max),
                "all_dist": encode_distances(assigned[0], centres, strides),
                "decoded": gfl_lite.decode(regression, (128, 128))}

    out = jax.tree_util.tree_map(np.asarray, code(boxes, assigned))
    np.testing.assert_allclose(out["dist"], [[22 / 8, 24 / 8, 18 / 8, 16 / 8], [36 / 16, 46 / 16, 60 / 16, 64 / 16],
                                             [1.5, 1.5, 2.5, 2.5]])
    np.testing.assert_allclose(out["boxes"], boxes, atol=1e-5)
    assert out["targets"].shape == (3, 4, reg_max + 1)
    np.testing.assert_allclose(out["targets"][0, 0], [0, 0, 0.25, 0.75, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(out["integral"], out["dist"], atol=1e-5)
    np.testing.assert_array_equal(out["edge"], np.eye(reg_max + 1)[[0, 7, 7, 0]])
    # the locations inside the box and within reg_max strides of its sides decode to it exactly
    inside = ((out["all_dist"] > 0) & (out["all_dist"] <= reg_max)).all(-1)
    assert inside.sum() > 50
    np.testing.assert_allclose(out["decoded"][0, inside], assigned[0, inside], atol=1e-4)


def test_postprocess_keeps_the_best_of_duplicates_per_class():
    """Three boxes of class 3 (two overlapping by IoU ~0.7), the first one's box again for class 1, everything else
    under the score threshold: NMS removes the duplicate of class 3 only, 100 rows, the rest padding."""
    hw = (128, 128)
    centres, strides = gfl_lite.points(hw)
    at = [5 * 16 + 6, 5 * 16 + 7, 16 * 16 + 8 * 8 + 5]  # (5, 6) and (5, 7) at stride 8, (1, 1) at stride 32
    boxes = np.array([[30, 20, 70, 60], [34, 20, 74, 62], [40, 40, 100, 120]], np.float32)
    regression = np.full((1, len(centres), 4, gfl_lite.REG_MAX + 1), -30.0, np.float32)  # distance 0 elsewhere
    regression[0, :, :, 0] = 0.0
    regression[0, at] = np.log(np.asarray(distribution_targets(encode_distances(boxes, centres[at], strides[at]),
                                                               gfl_lite.REG_MAX)) + 1e-30)
    logits = np.full((1, len(centres), 80), -8.0, np.float32)
    logits[0, at, 3] = [3.0, 2.0, 1.0]
    logits[0, at[0], 1] = 0.5
    outputs = {"cls_logits": logits, "box_regression": regression.reshape(1, len(centres), -1)}
    out = jax.jit(partial(gfl_lite.postprocess, image_size=hw))(outputs)
    assert {k: v.shape for k, v in out.items()} == {"boxes": (1, 100, 4), "scores": (1, 100), "labels": (1, 100),
                                                    "valid": (1, 100)}
    assert int(out["valid"].sum()) == 3 and out["valid"][0, :3].all()
    assert out["labels"][0, :3].tolist() == [3, 3, 1]
    np.testing.assert_allclose(out["scores"][0, :3], jax.nn.sigmoid(np.array([3.0, 1.0, 0.5])), rtol=1e-6)
    np.testing.assert_allclose(out["boxes"][0, :3], boxes[[0, 2, 0]], atol=1e-3)
    assert not np.asarray(out["boxes"][0, 3:]).any() and not np.asarray(out["labels"][0, 3:]).any()


def test_other_class_count_jits_forward_and_postprocess():
    """`num_classes=5`: five class scores per location (the class predictors alone change shape), and forward plus
    post-processing compile as one function on a small input."""
    name = "gfl_lite320_mobilenetv2_100"
    module = zoo.create_model(name, num_classes=5)
    x = random_images(2, (128, 128))
    variables = random_variables(module, x.shape)
    ours, default = flatten_variables(variables), flatten_variables(abstract_variables(zoo.create_model(name), x.shape))
    assert {k for k in ours if ours[k] != default[k]} == {
        f"params/{p}/{leaf}" for p in get_entry(name).cfg.classifier for leaf in ("kernel", "bias")}
    kinds.check_model(module, variables, jax.ShapeDtypeStruct(x.shape, np.float32), what="test")

    @jax.jit
    def detect(variables, x):
        return gfl_lite.postprocess(module.apply(variables, x), x.shape[1:3])

    with depthwise_impl("native"):  # compiles faster than the CPU default's shifted slices
        out = detect(variables, x)
    assert out["boxes"].shape == (2, 100, 4) and out["labels"].dtype == jnp.int32
    labels = np.asarray(out["labels"])[np.asarray(out["valid"])]
    assert ((labels >= 0) & (labels < 5)).all()
    boxes = np.asarray(out["boxes"])
    assert (boxes >= 0).all() and (boxes[..., 2:] <= 128).all()


def test_backbone_takes_the_classifier_imagenet_weights_by_name():
    """The offline lite0 weights (`tf_efficientnet_lite0.in1k_pkg`) go into the detector's backbone unchanged; the
    neck and head, abstract here, become zeros; a backbone lacking a classifier leaf is an error naming it."""
    classifier = zoo.load("tf_efficientnet_lite0", progress=False)
    module = zoo.create_model("gfl_lite320_tf_efficientnet_lite0")
    variables = abstract_variables(module, (1, 128, 128, 3))
    merged = with_backbone_weights(variables, classifier.variables, heads=(gfl_lite.HEAD,))
    flat = dict(zip(flatten_variables(merged), jax.tree_util.tree_leaves(merged)))
    source = dict(zip(flatten_variables(classifier.variables), jax.tree_util.tree_leaves(classifier.variables)))
    trunk = [k for k in flat if k.split("/")[1] != gfl_lite.HEAD]
    assert len(trunk) > 200
    for k in trunk:
        np.testing.assert_array_equal(flat[k], source[k])
    assert not any(np.asarray(v).any() for k, v in flat.items() if k.split("/")[1] == gfl_lite.HEAD)
    del source["params/stem/conv/kernel"]
    damaged = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in source.items()})
    with pytest.raises(WeightsMismatchError, match="stem/conv/kernel"):
        with_backbone_weights(variables, damaged, heads=(gfl_lite.HEAD,))


def test_maps_at_names_what_is_missing():
    info = get_entry("mobilenetv2_100").cfg.feature_info
    assert maps_at(info, (4, 32)) == ("stages_1", "stages_6")
    with pytest.raises(ValueError, match="stride 64"):
        maps_at(info, (8, 64))
