"""DeepLabV3 on MobileNetV3-Large against torchvision's `deeplabv3_mobilenet_v3_large` (with the auxiliary FCN head,
as its weights were trained): parameters and MACs as published, converted weights (random, BatchNorm perturbed) giving
torchvision's `out` and `aux` within 1e-4 in float32 through zoo.load(weights=file), a class count of its own
re-initializing both classifiers, and the model without the auxiliary head loading the same file."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import zoo
from zoo.abstract import abstract_variables
from zoo.counting import count_macs
from zoo.layers import kinds

from reference import random_images
from segmentation_twins import check_metadata, reinitialized, saved_twin, torchvision_meta, zoo_outputs

NAME = "deeplabv3_mobilenet_v3_large"
X = random_images(1, (97, 130))  # odd sizes: the stride-8 and stride-16 maps (13x17, 7x9) do not divide the input


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """(checkpoint path, torchvision's outputs on X, the zoo model loaded from the checkpoint)."""
    path = str(tmp_path_factory.mktemp("deeplabv3") / "twin.pth")
    expected = saved_twin(NAME, path, X, classifiers=("classifier.4", "aux_classifier.4"), aux_loss=True)
    return path, expected, zoo.load(NAME, weights=path)


@pytest.mark.reference
def test_counts_and_metadata_agree_with_torchvision():
    check_metadata(NAME)
    published = torchvision_meta(NAME).meta["_ops"] * 1e9  # 10.452 GMACs at 520x520
    macs = zoo.model_info(NAME)["macs"]
    assert macs == pytest.approx(published, rel=5e-3)
    # the published figure counts the auxiliary head: without it, 10.436 G, off the published digits
    module = zoo.create_model(NAME, aux=False)
    shape = (1, 520, 520, 3)
    without_aux = count_macs(module, abstract_variables(module, shape), shape)
    assert abs(macs - published) < 5e5 < abs(without_aux - published)


@pytest.mark.parity
def test_converted_twin_matches_torchvision(twin, record_property):
    _, expected, model = twin
    got = zoo_outputs(NAME, model.variables, X)
    assert got.keys() == expected.keys() == {"out", "aux"}
    for key in ("out", "aux"):
        assert got[key].shape == expected[key].shape == (1, 97, 130, 21)
        error = float(np.abs(got[key] - expected[key]).max())
        record_property(f"max_abs_diff_fp32_{key}", error)
        assert error <= 1e-4, f"{key}: max |zoo - torchvision| = {error:.2e}"


@pytest.mark.parity
def test_other_class_count_reinitializes_both_classifiers(twin):
    path, _, model = twin
    reinitialized(NAME, path, model.variables)


@pytest.mark.parity
def test_without_the_auxiliary_head_the_same_file_loads(twin):
    path, _, model = twin
    lean = zoo.load(NAME, weights=path, aux=False)
    assert set(lean.variables["params"]) == set(model.variables["params"]) - {"aux"}
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), lean.variables["params"]["out"],
                                  model.variables["params"]["out"])
    assert all(jax.tree_util.tree_leaves(same))
    out = jax.eval_shape(lambda v, x: lean.module.apply(v, x), lean.variables, jax.ShapeDtypeStruct(X.shape, np.float32))
    assert set(out) == {"out"}


def test_every_layer_has_a_kind():
    module = zoo.create_model(NAME)
    kinds.check_model(module, abstract_variables(module, X.shape), jax.ShapeDtypeStruct(X.shape, np.float32),
                      what="test")
