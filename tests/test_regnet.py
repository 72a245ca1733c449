"""RegNet: the width rule's inputs are checked, and a torchvision checkpoint (the release file behind timm's `tv2_in1k`
tags, the tags' second source) loads into timm's name and gives torchvision's logits.

Counts, features and timm/torchvision parity of every name at 224x224: `test_models.py`, `test_parity.py`.
"""

from __future__ import annotations

import numpy as np
import pytest

import zoo
from zoo.models.regnet import REGNETX_002, RegNetParams, stage_specs
from zoo.registry import get_entry

from reference import perturb_batchnorm, random_images, scale_classifier_to_trained_spread, torch, twin_model


def test_width_rule_rejects_parameters_outside_the_design_space():
    with pytest.raises(ValueError, match="invalid RegNet parameters"):
        stage_specs(RegNetParams(w0=20, wa=36.44, wm=2.49, depth=13, group_w=8), "pycls")  # w0 % 8
    with pytest.raises(ValueError, match="rounding must be"):
        stage_specs(REGNETX_002, "nearest")


@pytest.mark.parity
def test_torchvision_checkpoint_loads_into_the_timm_name_of_its_tv2_tag(tmp_path):
    """`regnety_004.tv2_in1k` falls back to torchvision's `regnet_y_400mf` V2 file: its layout is recognized."""
    assert any(s.kind == "url" for p in get_entry("regnety_004").pretrained if p.tag == "tv2_in1k" for s in p.sources)
    twin = twin_model("torchvision:regnet_y_400mf")
    perturb_batchnorm(twin)
    x = random_images(2, (64, 64))
    x_nchw = torch.from_numpy(x.transpose(0, 3, 1, 2))
    scale_classifier_to_trained_spread(twin, x_nchw)
    path = tmp_path / "regnet_y_400mf.pth"
    torch.save(twin.state_dict(), path)
    with torch.inference_mode():
        expected = twin(x_nchw).numpy()
    got = np.asarray(zoo.load("regnety_004", weights=str(path))(x))
    assert np.abs(got - expected).max() <= 1e-4
