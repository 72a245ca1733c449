"""LR-ASPP on MobileNetV3-Large against torchvision's `lraspp_mobilenet_v3_large`: parameters and MACs as published,
converted weights (random, BatchNorm perturbed) giving torchvision's logits within 1e-4 in float32 through the user's
path (torch.save -> zoo.load(weights=file)), a class count of its own re-initializing both classifiers."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import zoo
from zoo.abstract import abstract_variables
from zoo.layers import kinds
from zoo.models.segmentation import SegmentationModel
from zoo.registry import get_entry

from reference import random_images
from segmentation_twins import check_metadata, reinitialized, saved_twin, torchvision_meta, zoo_outputs

NAME = "lraspp_mobilenet_v3_large"
X = random_images(1, (97, 130))  # odd sizes: the stride-8 and stride-16 maps (13x17, 7x9) do not divide the input


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """(checkpoint path, torchvision's outputs on X, the zoo model loaded from the checkpoint)."""
    path = str(tmp_path_factory.mktemp("lraspp") / "twin.pth")
    expected = saved_twin(NAME, path, X, classifiers=("classifier.low_classifier", "classifier.high_classifier"))
    return path, expected, zoo.load(NAME, weights=path)


@pytest.mark.reference
def test_counts_and_metadata_agree_with_torchvision():
    check_metadata(NAME)
    macs = zoo.model_info(NAME)["macs"]  # at 520x520, from the jaxpr
    assert macs == pytest.approx(torchvision_meta(NAME).meta["_ops"] * 1e9, rel=5e-3)


@pytest.mark.parity
def test_converted_twin_matches_torchvision(twin, record_property):
    _, expected, model = twin
    got = zoo_outputs(NAME, model.variables, X)
    assert got.keys() == expected.keys() == {"out"}
    assert got["out"].shape == expected["out"].shape == (1, 97, 130, 21)
    error = float(np.abs(got["out"] - expected["out"]).max())
    record_property("max_abs_diff_fp32", error)
    assert error <= 1e-4, f"max |zoo - torchvision| = {error:.2e} (logits up to {np.abs(expected['out']).max():.1f})"


@pytest.mark.parity
def test_other_class_count_reinitializes_both_classifiers(twin):
    path, _, model = twin
    reinitialized(NAME, path, model.variables)


def test_features_every_layer_kind_and_errors():
    module = zoo.create_model(NAME)
    variables = abstract_variables(module, X.shape)
    x = jax.ShapeDtypeStruct(X.shape, np.float32)
    feats = jax.eval_shape(lambda v, x: module.apply(v, x, features=True), variables, x)
    # the head's two inputs: torchvision's features[4] (stride 8) and the last map (stride 16, dilated)
    assert feats["stages_2/block_0"].shape == (1, 13, 17, 40) and feats["stages_6"].shape == (1, 7, 9, 960)
    info = {f.name: (f.stride, f.channels) for f in get_entry(NAME).cfg.feature_info}
    assert info["stages_2/block_0"] == (8, 40) and info["stages_6"] == (16, 960)
    kinds.check_model(module, variables, x, what="test")
    with pytest.raises(ValueError, match="expects 3 channels in the last axis"):
        jax.eval_shape(lambda v, x: module.apply(v, x), variables, jax.ShapeDtypeStruct((1, 97, 130, 4), np.float32))
    with pytest.raises(ValueError, match=r"taps \['stages_9/block_0'\] name no module the backbone ran"):
        broken = SegmentationModel(module.backbone, module.heads, taps=("stages_9/block_0",))
        jax.eval_shape(lambda v, x: broken.apply(v, x), variables, x)
    with pytest.raises(TypeError, match="output_stride"):  # the trunk is torchvision's: output stride 16
        zoo.create_model(NAME, output_stride=8)
