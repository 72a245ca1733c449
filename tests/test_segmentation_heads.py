"""DeepLabV3+ and SegFormer's all-MLP decoder on registered backbones (no reference implementation): every preset
builds with its maps picked by stride and returns logits at the input size, parameter and MAC counts as measured,
the backbone's parameters named and shaped as in its classifier (less the classifier-only layers), every layer a
known kind, a class count of its own, a jitted training-mode gradient, and a clear error for a missing stride."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.abstract import abstract_variables
from zoo.convert import flatten_variables
from zoo.layers import kinds
from zoo.layers.conv import depthwise_impl
from zoo.models import deeplabv3plus, segformer_head
from zoo.models.detection_backbone import maps_at
from zoo.registry import get_entry

from quick_compile import quick_compile
from reference import random_images, random_variables

HW = (96, 128)  # small and not square: the logits must come back at exactly this size
BACKBONES = {**{n: b for n, (b, _) in deeplabv3plus.VARIANTS.items()}, **segformer_head.VARIANTS}
# name: (parameters, MACs at 512x512 from zoo.model_info, the maps the head reads), measured
PRESETS = {
    "deeplabv3plus_mobilenetv2_100": (4_675_333, 7_603_044_352, ("stages_6", "stages_1")),
    "deeplabv3plus_mobilenetv3_large_100": (10_586_933, 11_754_823_552, ("stages_6", "stages_1")),
    "segformer_head_mobilevit_xs": (2_001_093, 6_765_625_344, ("stages_1", "stages_2", "stages_3", "stages_4")),
    "segformer_head_efficientvit_b0": (782_341, 1_656_881_152, ("stages_0", "stages_1", "stages_2", "stages_3")),
}
# the classifier's layers a segmentation model does not build: its pre-logits layers, and the classifier
CLASSIFIER_ONLY = {"mobilenetv2_100": {"head"}, "mobilenetv3_large_100": {"head"}, "mobilevit_xs": {"final_conv", "head"},
                   "efficientvit_b0": {"head"}}


def _maps(module) -> tuple[str, ...]:
    head = module.heads[0][1]
    return (head.high, head.low) if isinstance(head, deeplabv3plus.DeepLabV3PlusHead) else head.keys


def test_registry_lists_every_preset():
    assert sorted(zoo.list_models("deeplabv3plus*") + zoo.list_models("segformer_head*")) == sorted(PRESETS)
    assert set(PRESETS) <= set(zoo.list_models(task="segmentation"))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_counts_maps_output_and_backbone_names(name):
    """Counts as measured, the maps picked by stride, `{"out": (N, H, W, 21)}` at the input size, the backbone's
    parameters named and shaped as in its classifier, and every layer of a known kind."""
    params, macs, maps = PRESETS[name]
    cfg, backbone = get_entry(name).cfg, BACKBONES[name]
    assert cfg.task == "segmentation" and cfg.num_classes == 21 and cfg.input_size == (512, 512) and not cfg.twin
    module = zoo.create_model(name)
    assert _maps(module) == maps
    info = zoo.model_info(name)
    assert (info["params"], info["macs"]) == (params, macs)

    shape = (1, *cfg.input_size, 3)  # the variables do not depend on it: model_info's cached trace
    variables = abstract_variables(module, shape)
    x = jax.ShapeDtypeStruct((2, *HW, 3), jnp.float32)
    # kinds.check_model's trace, the output kept
    with nn.intercept_methods(kinds.interceptor_checking("test")), kinds.structure_trace():
        out = jax.eval_shape(lambda v, x: module.apply(v, x), variables, x)
    assert {k: v.shape for k, v in out.items()} == {"out": (2, *HW, 21)} and out["out"].dtype == jnp.float32

    ours = flatten_variables(variables)
    classifier = flatten_variables(abstract_variables(zoo.create_model(backbone), shape))
    trunk = {k: v for k, v in ours.items() if k.split("/")[1] != "out"}
    assert trunk and all(classifier.get(k) == v for k, v in trunk.items())
    assert {k.split("/")[1] for k in set(classifier) - set(trunk)} == CLASSIFIER_ONLY[backbone]
    for path in cfg.classifier:
        assert f"params/{path}/kernel" in ours


def test_deeplabv3plus_reads_the_deepest_map_at_its_output_stride():
    """Dilated to stride 16, MobileNetV2 has two maps there (stages_4, stages_6): ASPP reads the deepest. At output
    stride 8 the rates double (the paper's Sec. 4.1) and the map ASPP reads is an eighth of the input."""
    info = get_entry("deeplabv3plus_mobilenetv2_100").cfg.feature_info
    assert [f.name for f in info if f.stride == 16] == ["stages_4", "stages_6"]
    module = deeplabv3plus.deeplabv3plus("mobilenetv2_100", output_stride=8)
    head = module.heads[0][1]
    assert (head.high, head.low, head.rates) == ("stages_6", "stages_1", (12, 24, 36))
    feats = jax.eval_shape(lambda v, x: module.apply(v, x, features=True), abstract_variables(module, (1, *HW, 3)),
                           jax.ShapeDtypeStruct((1, *HW, 3), jnp.float32))
    assert feats["stages_6"].shape == (1, 12, 16, 320) and feats["stages_1"].shape == (1, 24, 32, 24)


def test_a_backbone_without_a_needed_stride_is_an_error_naming_its_maps():
    info = tuple(f for f in get_entry("efficientvit_b0").cfg.feature_info if f.stride != 4)
    with pytest.raises(ValueError, match=r"efficientvit_b0 has no map at stride 4 .*stages_1 \(stride 8\)"):
        maps_at(info, segformer_head.STRIDES, "efficientvit_b0")
    with pytest.raises(ValueError, match="output_stride"):  # a family that cannot dilate says so
        deeplabv3plus.deeplabv3plus("efficientvit_b0", output_stride=16)


def test_other_class_count_and_a_jitted_training_gradient():
    """`num_classes=5`: only the class conv changes shape. One jitted training-mode forward (BatchNorm on batch
    statistics, dropout on) with the gradient of the head: finite, reaching every head layer, and new BatchNorm
    statistics throughout. The head's gradient only: the backbone's backward pass compiles for ~12 s more here, and
    each backbone family's training step is `test_train_step_smoke.py`'s."""
    name = "segformer_head_efficientvit_b0"
    module = zoo.create_model(name, num_classes=5)
    x = random_images(2, (64, 96))
    variables = random_variables(module, x.shape)
    ours, default = flatten_variables(variables), flatten_variables(abstract_variables(zoo.create_model(name), x.shape))
    assert {k for k in ours if ours[k] != default[k]} == {
        f"params/{p}/{leaf}" for p in get_entry(name).cfg.classifier for leaf in ("kernel", "bias")}
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 5, (2, 64, 96)))

    @jax.jit
    def step(head, params, batch_stats, x, rng):
        def loss(head):
            out, updates = module.apply({"params": {**params, "out": head}, "batch_stats": batch_stats}, x,
                                        train=True, mutable=["batch_stats"], rngs={"dropout": rng})
            assert out["out"].shape == (2, 64, 96, 5)
            logp = jax.nn.log_softmax(out["out"])
            return -jnp.take_along_axis(logp, labels[..., None], -1).mean(), updates["batch_stats"]
        return jax.grad(loss, has_aux=True)(head)

    params = variables["params"]
    with quick_compile(), depthwise_impl("native"):
        grads, stats = step(params["out"], params, variables["batch_stats"], x, jax.random.PRNGKey(0))
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(grads)]
    assert len(norms) == len(jax.tree_util.tree_leaves(params["out"])) and all(0 < n < np.inf for n in norms)
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), stats,
                                     variables["batch_stats"])
    assert all(jax.tree_util.tree_leaves(changed))
