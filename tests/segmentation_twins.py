"""torchvision's segmentation models as references for the zoo's (test_lraspp.py, test_deeplabv3.py): a twin with
random weights and perturbed BatchNorm, its checkpoint, its outputs, and its published metadata."""

from __future__ import annotations

import jax
import numpy as np

import zoo
from zoo.registry import get_entry

from reference import perturb_batchnorm, torch
from traced import inference_trace

# Random heads give logits of std ~0.1, where a conversion mistake moves them by less than the 1e-4 bar; scaled by
# this, they span a few units as a trained model's do.
LOGIT_GAIN = 10.0


def saved_twin(name: str, path, x: np.ndarray, classifiers: tuple[str, ...], **kwargs) -> dict[str, np.ndarray]:
    """torchvision's model `name` (random weights, perturbed BatchNorm, the `classifiers` modules scaled by
    `LOGIT_GAIN`) saved to `path`; returns its outputs on the NHWC batch `x`, NHWC."""
    import torchvision

    torch.manual_seed(0)
    twin = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None, **kwargs).eval()
    perturb_batchnorm(twin)
    with torch.no_grad():
        for module in classifiers:
            for p in twin.get_submodule(module).parameters():
                p.mul_(LOGIT_GAIN)
    torch.save(twin.state_dict(), path)
    with torch.inference_mode():
        out = twin(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    return {k: v.numpy().transpose(0, 2, 3, 1) for k, v in out.items()}


def zoo_outputs(name: str, variables, x: np.ndarray) -> dict[str, np.ndarray]:
    """The registered model's outputs on `x`, compiled from the shared inference trace (native depthwise)."""
    got = inference_trace(name, x.shape).lower().compile()(variables, x)
    return {k: np.asarray(v) for k, v in got.items()}


def torchvision_meta(name: str):
    """torchvision's published weights record of `name` (the one release: COCO with VOC labels)."""
    from torchvision.models import get_model_weights

    (weights,) = list(get_model_weights(name))
    return weights


def check_metadata(name: str) -> None:
    """The registered record agrees with torchvision's: URL and tag, classes, parameter count, metrics, input size."""
    entry = get_entry(name)
    (pretrained,) = entry.pretrained
    ref = torchvision_meta(name)
    assert pretrained.sources[-1].location == ref.url
    assert pretrained.tag == ref.name.lower()
    assert pretrained.num_classes == entry.cfg.num_classes == len(ref.meta["categories"])
    metrics = ref.meta["_metrics"]["COCO-val2017-VOC-labels"]
    assert pretrained.extra == {"miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"]}
    transforms = ref.transforms()
    assert entry.cfg.input_size == (transforms.resize_size[0],) * 2
    assert np.allclose(entry.cfg.mean, transforms.mean) and np.allclose(entry.cfg.std, transforms.std)
    assert zoo.model_info(name)["params"] == ref.meta["num_params"]


def reinitialized(name: str, path: str, twin_variables) -> None:
    """`zoo.load(..., num_classes=5)` re-initializes every classifier path (zeros) and loads the rest."""
    cfg = get_entry(name).cfg
    model = zoo.load(name, weights=path, num_classes=5)
    flat = dict(jax.tree_util.tree_flatten_with_path(model.variables)[0])
    twin_flat = dict(jax.tree_util.tree_flatten_with_path(twin_variables)[0])
    assert flat.keys() == twin_flat.keys()
    reset = 0
    for key, value in flat.items():
        path_str = "/".join(str(getattr(k, "key", k)) for k in key[1:])
        if any(path_str.startswith(c + "/") for c in cfg.classifier):
            assert value.shape[-1] == 5 and not np.asarray(value).any(), path_str
            reset += 1
        else:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(twin_flat[key]), err_msg=path_str)
    assert reset == 2 * len(cfg.classifier)  # a kernel and a bias each
    out = jax.eval_shape(lambda v, x: model.module.apply(v, x), model.variables,
                         jax.ShapeDtypeStruct((1, 33, 47, 3), np.float32))
    assert {k: v.shape for k, v in out.items()} == {k: (1, 33, 47, 5) for k in out}
