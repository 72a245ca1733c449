"""Tier 1, every registered model: parameter count and MACs against the reference, output and feature shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import zoo
from zoo.abstract import abstract_variables
from zoo.counting import count_jaxpr_macs, count_params
from zoo.layers.conv import depthwise_impl
from zoo.registry import get_entry

from reference import reference_counts
from traced import inference_trace

ALL = zoo.list_models(task="classification")


@pytest.mark.reference  # counted live by torch where ../shared/reference does not list the model
@pytest.mark.parametrize("name", ALL)
def test_params_and_macs_match_reference(name):
    entry = get_entry(name)
    res = entry.cfg.input_size[0]
    variables = abstract_variables(zoo.create_model(name), (1, res, res, 3))
    ref = reference_counts(entry.cfg.twin, res)
    assert count_params(variables["params"]) == ref["params"]
    # what `count_macs` (`zoo info`) does: depthwise convolutions as convolutions, here on the two images of the
    # parity test's trace (traced.py), whose MACs are twice one image's
    traced = inference_trace(name, (2, res, res, 3))
    macs = count_jaxpr_macs(traced.jaxpr.jaxpr) / 2
    assert abs(macs / ref["macs"] - 1) < 0.005, (macs, ref["macs"])
    out = traced.out_info
    assert out.shape == (2, entry.cfg.num_classes) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", ALL)
def test_feature_info_matches_feature_maps(name):
    """`features=True` returns the backbone's dict: every feature_info name at its stride and width, in that order,
    then `pre_logits`, the input of the classifier's last Linear."""
    cfg = get_entry(name).cfg
    module = zoo.create_model(name)
    x = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32)
    keys = []

    def features(variables):
        keys.clear()
        with depthwise_impl("native"):
            return jax.eval_shape(lambda v, x: (out := module.apply(v, x, features=True), keys.extend(out))[0],
                                  variables, x)

    # the variables at the default resolution (traced already for the counts and parity) serve most networks at
    # 128x128; those whose parameters depend on the input size (attention biases: LeViT) raise, and get their own
    variables = abstract_variables(module, (1, *cfg.input_size, 3))
    try:
        feats = features(variables)
    except Exception:  # noqa: BLE001 - anything else raises again with the matching variables
        variables = abstract_variables(module, x.shape)
        feats = features(variables)
    strides = [f.stride for f in cfg.feature_info]  # 4-32 for the task heads; 2 where the network has such a map
    assert strides in ([2, 4, 8, 16, 32], [4, 8, 16, 32]), strides
    assert keys == [f.name for f in cfg.feature_info] + ["pre_logits"]
    for info in cfg.feature_info:
        assert feats[info.name].shape == (2, 128 // info.stride, 128 // info.stride, info.channels), info
    classifier = variables["params"]
    for part in cfg.classifier.split("/"):
        classifier = classifier[part]
    in_features = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(classifier) if leaf.ndim == 2}
    assert in_features == {feats["pre_logits"].shape[1]} and feats["pre_logits"].shape[0] == 2


@pytest.mark.parametrize("name", ALL)
def test_config_sanity(name):
    entry = get_entry(name)
    cfg = entry.cfg
    assert cfg.name == name and cfg.twin.split(":")[0] in ("timm", "torchvision")
    assert len(cfg.mean) == len(cfg.std) == 3 and 0 < cfg.crop_pct <= 1
    for p in entry.pretrained:
        assert p.layout in entry.converters
        assert p.sources and all(s.kind in ("hf_hub", "url", "package", "file") for s in p.sources)
        assert p.top1 is None or 40 < p.top1 < 90
        for s in p.sources:
            if s.kind in ("url", "package"):
                assert s.sha256 and len(s.sha256) >= 8, f"{name}.{p.tag}: {s.describe()} has no checksum"
