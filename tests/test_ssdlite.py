"""SSDLite on MobileNetV3-Large against torchvision's `ssdlite320_mobilenet_v3_large`: parameters and MACs as
published, default boxes, box coding and NMS against torchvision's own, converted weights (random, BatchNorm
perturbed) giving torchvision's raw head outputs within 1e-4 in float32 and its detections through the user's path
(torch.save -> zoo.load(weights=file)), and a class count of its own re-initializing the six class predictors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zoo
from zoo.abstract import abstract_variables
from zoo.convert import flatten_variables
from zoo.counting import count_jaxpr_macs, count_params
from zoo.layers import kinds
from zoo.layers.anchors import default_boxes
from zoo.layers.boxes import decode_boxes, encode_boxes
from zoo.layers.nms import nms
from zoo.models import ssdlite
from zoo.registry import get_entry

from reference import calibrate_batchnorm, perturb_batchnorm, random_images, torch
from traced import inference_trace

NAME = "ssdlite320_mobilenet_v3_large"
X = random_images(2, (320, 320))
ANCHORS = 6 * (20 * 20 + 10 * 10 + 5 * 5 + 3 * 3 + 2 * 2 + 1)  # 6 boxes per location of the six maps: 3,234
# Random heads give class logits of std ~0.2: every class of every anchor then scores ~1/91, above the 0.001
# threshold. Scaled by this and with the background's logit raised, a few hundred candidates pass it and NMS leaves
# ~110 per image. The crowded outputs shift the logits by `CROWDED`: thousands pass, the 300-detection cut applies,
# and one class (the first) has more candidates than the 300 kept per class.
LOGIT_GAIN, BACKGROUND = 12.0, 19.0
CROWDED = np.array([-3.0, 6.0] + [0.0] * 89, np.float32)
BOX_GAIN = 4.0  # box offsets of std ~0.75: boxes move off their anchors, so NMS meets varied overlaps


def test_counts_structure_and_layer_kinds():
    """torchvision's published size (3,440,060 parameters, 583.17M MACs at 320x320: `../shared/reference`), the raw
    outputs' shapes, and the maps the heads read: the C4 expansion (stride 16, 672) and the trunk's end (480)."""
    module = zoo.create_model(NAME)
    variables = abstract_variables(module, X.shape)
    assert count_params(variables["params"]) == 3_440_060
    traced = inference_trace(NAME, X.shape)  # the trace the parity test compiles
    macs = count_jaxpr_macs(traced.jaxpr.jaxpr) / len(X)
    assert abs(macs / 583.17e6 - 1) < 0.005, macs
    out = traced.out_info
    assert out["cls_logits"].shape == (2, ANCHORS, 91) and out["bbox_regression"].shape == (2, ANCHORS, 4)
    assert ssdlite.anchors((320, 320)).shape == (ANCHORS, 4)
    x = jax.ShapeDtypeStruct(X.shape, np.float32)
    feats = jax.eval_shape(lambda v, x: module.apply(v, x, features=True), variables, x)
    info = {f.name: (f.stride, f.channels) for f in get_entry(NAME).cfg.feature_info}
    assert info[ssdlite.C4] == (16, 672) and info[ssdlite.C5] == (32, 480)
    for name, (stride, channels) in info.items():
        assert feats[name].shape == (2, 320 // stride, 320 // stride, channels), name
    # other input sizes: as many default boxes as predictions (odd sizes round the maps up)
    odd = jax.ShapeDtypeStruct((1, 97, 130, 3), np.float32)
    other = jax.eval_shape(lambda v, x: module.apply(v, x), variables, odd)
    assert other["cls_logits"].shape[1] == len(ssdlite.anchors((97, 130)))
    kinds.check_model(module, variables, x, what="test")
    # the trunk's parameters are named as in the `mobilenet_v3_large` classifier, of its shapes before the reduced tail
    ours = {k: v for k, v in flatten_variables(variables).items() if k.split("/")[1] != "ssd"}
    classifier = flatten_variables(abstract_variables(zoo.create_model("mobilenet_v3_large"), (1, 224, 224, 3)))
    assert set(ours) < set(classifier)
    assert {k.split("/")[1] for k in ours if ours[k] != classifier[k]} == {"stages_5", "stages_6"}


def test_postprocess_thresholds_suppresses_per_class_and_pads():
    """Boxes of one class overlapping by IoU 0.57 > 0.55: the weaker one goes; of another class it stays; everything
    else scores under the threshold; the output has 300 rows, the rest padding."""
    anchors = ssdlite.anchors((320, 320))
    centre = (10 * 20 + 10) * 6  # the first map's location (10, 10): boxes 0 and 1 are 64 and 84.7 px squares
    logits = np.zeros((1, ANCHORS, 91), np.float32)
    logits[..., 0] = 10.0  # background: 90 classes at logit 0 score ~4.5e-5 each
    logits[0, centre, 5] = logits[0, centre + 1, 5] = 16.0
    logits[0, centre + 1, 5] -= 1.0
    logits[0, centre + 2, 7] = 15.0  # a 2:1 box of another class, overlapping the first by more than 0.55
    out = jax.jit(ssdlite.postprocess)({"cls_logits": logits, "bbox_regression": np.zeros((1, ANCHORS, 4))})
    assert {k: v.shape for k, v in out.items()} == {"boxes": (1, 300, 4), "scores": (1, 300), "labels": (1, 300),
                                                    "valid": (1, 300)}
    assert int(out["valid"].sum()) == 2 and out["valid"][0, :2].all()
    assert out["labels"][0, :2].tolist() == [5, 7]
    np.testing.assert_allclose(out["boxes"][0, :2], anchors[[centre, centre + 2]], atol=1e-4)
    assert not np.asarray(out["boxes"][0, 2:]).any() and not np.asarray(out["labels"][0, 2:]).any()


@pytest.mark.reference
def test_default_boxes_and_box_coding_match_torchvision():
    """The default boxes to the last bit (also on a map grid not square), the decoding with its clamp of the size
    ratios, and the encoding of training targets."""
    from torchvision.models.detection._utils import BoxCoder
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.image_list import ImageList

    generator = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    for size in ((320, 320), (320, 256)):
        grids = ssdlite.feature_grids(size)
        feats = [torch.zeros(1, 1, *g) for g in grids]
        expected = generator(ImageList(torch.zeros(1, 3, *size), [size]), feats)[0].numpy()
        ours = default_boxes(grids, size, ssdlite.ASPECT_RATIOS, ssdlite.MIN_RATIO, ssdlite.MAX_RATIO)
        np.testing.assert_array_equal(ours, expected)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    anchors = ssdlite.anchors((320, 320))
    codes = np.random.default_rng(0).standard_normal((ANCHORS, 4)).astype(np.float32) * 3
    codes[:4, 2:] = 40.0  # beyond the clamp of log(1000 / 16) once divided by 5
    expected = coder.decode_single(torch.from_numpy(codes), torch.from_numpy(anchors)).numpy()
    np.testing.assert_allclose(decode_boxes(jnp.asarray(codes), anchors), expected, rtol=1e-6, atol=1e-3)
    boxes = expected[4:]
    targets = coder.encode_single(torch.from_numpy(boxes), torch.from_numpy(anchors[4:])).numpy()
    np.testing.assert_allclose(encode_boxes(jnp.asarray(boxes), anchors[4:]), targets, rtol=1e-5, atol=1e-4)


@pytest.mark.reference
def test_nms_matches_torchvision():
    """Class-wise and class-blind greedy NMS keep torchvision's boxes in its order, padded to a fixed count."""
    import torchvision

    rng = np.random.default_rng(0)
    corner = rng.uniform(0, 100, (400, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(5, 40, (400, 2))], 1).astype(np.float32)
    scores = rng.uniform(0, 1, 400).astype(np.float32)
    classes = rng.integers(0, 5, 400)
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    run = jax.jit(nms, static_argnums=(2, 3))
    expected = torchvision.ops.batched_nms(tb, ts, torch.from_numpy(classes), 0.5).numpy()
    indices, mask = run(boxes, scores, 0.5, 400, classes)
    assert 100 < len(expected) < 400
    np.testing.assert_array_equal(np.asarray(indices)[np.asarray(mask)], expected)
    assert not np.asarray(indices)[~np.asarray(mask)].any()
    expected = torchvision.ops.nms(tb, ts, 0.3).numpy()
    indices, mask = run(boxes, scores, 0.3, 50)
    assert len(expected) > 50 and np.asarray(mask).all()
    np.testing.assert_array_equal(np.asarray(indices), expected[:50])
    # candidates left out by `valid`, and leading batch dimensions: each row as torchvision on its own candidates
    valid = scores > 0.5
    both = run(np.stack([boxes, boxes[::-1]]), np.stack([scores, scores[::-1]]), 0.5, 400,
               np.stack([classes, classes[::-1]]), np.stack([valid, valid[::-1]]))
    for row, flip in enumerate((False, True)):
        keep = np.flatnonzero(valid[::-1] if flip else valid)
        b, s, c = (a[::-1] if flip else a for a in (boxes, scores, classes))
        expected = keep[torchvision.ops.batched_nms(torch.from_numpy(b[keep].copy()), torch.from_numpy(s[keep].copy()),
                                                    torch.from_numpy(c[keep].copy()), 0.5).numpy()]
        indices, mask = (np.asarray(a[row]) for a in both)
        np.testing.assert_array_equal(indices[mask], expected)


def _twin_and_outputs(path: str) -> dict:
    """torchvision's model (random weights; BatchNorm statistics from `X`, then perturbed; class and box predictors
    scaled) saved to `path`; its head outputs on `X`, its detections, and those of the crowded outputs."""
    import torchvision
    from torchvision.models.detection.image_list import ImageList

    torch.manual_seed(0)
    twin = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()

    class Raw(torch.nn.Module):
        """The SSD without its transform and post-processing: normalized images in, head outputs out."""

        def __init__(self):
            super().__init__()
            self.twin = twin

        def forward(self, x):
            return twin.head(list(twin.backbone(x).values()))

    x = torch.from_numpy(X.transpose(0, 3, 1, 2))
    perturb_batchnorm(twin)
    # With fixed random statistics, activations shrink through the 20+ blocks until the heads' outputs hardly depend
    # on the image (0.4% of their spread), and a mistake in the trunk would hardly show: statistics are taken from the
    # images, then perturbed, every BatchNorm's gain drawn near 1
    calibrate_batchnorm(Raw().eval(), x)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in twin.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.8)
                m.running_mean.add_(torch.randn(m.num_features, generator=g) * 0.1 * m.running_var.sqrt())
                m.running_var.mul_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
        for block in twin.head.classification_head.module_list:
            block[1].weight.mul_(LOGIT_GAIN)
            block[1].bias[::91] += BACKGROUND  # each box's 91 outputs: the background first
        for block in twin.head.regression_head.module_list:
            block[1].weight.mul_(BOX_GAIN)
    torch.save(twin.state_dict(), path)
    sizes = [tuple(X.shape[1:3])] * len(X)
    with torch.inference_mode():
        feats = list(twin.backbone(x).values())
        head = twin.head(feats)
        anchors = twin.anchor_generator(ImageList(x, sizes), feats)
        crowded = {**head, "cls_logits": head["cls_logits"] + torch.from_numpy(CROWDED)}
        found = {"sparse": twin.postprocess_detections(head, anchors, sizes),
                 "crowded": twin.postprocess_detections(crowded, anchors, sizes)}
    return {"raw": {k: v.numpy() for k, v in head.items()}, "crowded": {k: v.numpy() for k, v in crowded.items()},
            "detections": {k: [{n: t.numpy() for n, t in d.items()} for d in v] for k, v in found.items()}}


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    """(checkpoint path, torchvision's outputs, the zoo model loaded from the checkpoint)."""
    path = str(tmp_path_factory.mktemp("ssdlite") / "twin.pth")
    expected = _twin_and_outputs(path)
    return path, expected, zoo.load(NAME, weights=path)


def _same_detections(got: dict, expected: list[dict]) -> tuple[int, float, float]:
    """Our padded detections are torchvision's per image: (how many, max box error in pixels, max score error).

    Each of torchvision's detections is matched to ours by label and box (within 1e-3 px), one to one, and both lists
    are by decreasing score: the order may differ only where scores tie to float rounding (4e-6 apart here)."""
    compared, box_error, score_error = 0, 0.0, 0.0
    for i, ref in enumerate(expected):
        valid = np.asarray(got["valid"][i])
        n = len(ref["boxes"])
        assert valid.sum() == n and valid[:n].all(), (i, valid.sum(), n)
        boxes, scores, labels = (np.asarray(got[k][i][:n]) for k in ("boxes", "scores", "labels"))
        distance = np.abs(boxes[:, None] - ref["boxes"][None]).max(-1)  # (ours, torchvision's)
        same = (labels[:, None] == ref["labels"][None]) & (distance <= 1e-3)
        assert (same.sum(0) == 1).all() and (same.sum(1) == 1).all(), f"image {i}: detections differ"
        ours = same.argmax(0)  # ours matching each of torchvision's
        box_error = max(box_error, float(distance[ours, np.arange(n)].max()))
        score_error = max(score_error, float(np.abs(scores[ours] - ref["scores"]).max()))
        assert (np.diff(scores) <= 0).all()
        compared += n
    assert score_error <= 1e-4, score_error  # the bar of the logits
    return compared, box_error, score_error


@pytest.mark.parity
def test_converted_twin_matches_raw_outputs_and_detections(twin, record_property):
    _, expected, model = twin
    # native depthwise, the trace the counts read (traced.py)
    raw = inference_trace(NAME, X.shape).lower().compile()(model.variables, X)
    for key in ("cls_logits", "bbox_regression"):
        error = float(np.abs(np.asarray(raw[key]) - expected["raw"][key]).max())
        record_property(f"max_abs_diff_{key}", error)
        assert error <= 1e-4, f"{key}: max |zoo - torchvision| = {error:.2e}"
    postprocess = jax.jit(ssdlite.postprocess)
    sparse, box_error, score_error = _same_detections(postprocess(raw), expected["detections"]["sparse"])
    record_property("detections_compared", sparse)
    record_property("max_abs_diff_boxes_px", box_error)
    record_property("max_abs_diff_scores", score_error)
    assert 150 < sparse < 400  # ~110 of the 300 rows per image: thresholds, NMS and padding all at work
    # the post-processing alone, on torchvision's own outputs with thousands of candidates: the cut at 300
    crowded, _, _ = _same_detections(postprocess(expected["crowded"]), expected["detections"]["crowded"])
    assert crowded == 600


@pytest.mark.parity
def test_other_class_count_reinitializes_the_class_predictors(twin):
    path, _, model = twin
    cfg = get_entry(NAME).cfg
    other = zoo.load(NAME, weights=path, num_classes=21)
    flat = dict(jax.tree_util.tree_flatten_with_path(other.variables)[0])
    loaded = dict(jax.tree_util.tree_flatten_with_path(model.variables)[0])
    assert flat.keys() == loaded.keys()
    reset = 0
    for key, value in flat.items():
        path_str = "/".join(str(getattr(k, "key", k)) for k in key[1:])
        if any(path_str.startswith(c + "/") for c in cfg.classifier):
            assert value.shape[-1] == 6 * 21 and not np.asarray(value).any(), path_str
            reset += 1
        else:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(loaded[key]), err_msg=path_str)
    assert reset == 2 * 6  # a kernel and a bias in each map's class predictor
    out = jax.eval_shape(lambda v, x: other.module.apply(v, x), other.variables,
                         jax.ShapeDtypeStruct((1, 320, 320, 3), np.float32))
    assert out["cls_logits"].shape == (1, ANCHORS, 21)


@pytest.mark.reference
def test_metadata_agrees_with_torchvision():
    from torchvision.models.detection import SSDLite320_MobileNet_V3_Large_Weights

    ref = SSDLite320_MobileNet_V3_Large_Weights.COCO_V1
    entry = get_entry(NAME)
    (pretrained,) = entry.pretrained
    assert pretrained.sources[-1].location == ref.url and pretrained.tag == ref.name.lower()
    assert pretrained.num_classes == entry.cfg.num_classes == len(ref.meta["categories"])
    assert pretrained.extra == {"box_map": ref.meta["_metrics"]["COCO-val2017"]["box_map"]}
    assert zoo.model_info(NAME)["params"] == ref.meta["num_params"]
    assert entry.cfg.task == "detection" and entry.cfg.input_size == (320, 320)
    # the labels a loaded model, `zoo detect` and the exported sidecar name its classes by: COCO's at their ids
    model = zoo.Model(zoo.create_model(NAME), {}, entry.cfg, pretrained)
    assert model.labels == tuple(ref.meta["categories"]) and model.labels[1] == "person"
    assert zoo.Model(model.module, {}, entry.cfg.replace(num_classes=11), pretrained).labels is None  # retrained head
