"""SSD's detection augmentations (`train.box_augment`): objects stay under their boxes, the IoU crop meets its drawn
minimum, zoom-out shifts by its offset onto a mean-filled canvas, photometric distortion leaves boxes alone, all
deterministic under a seed; and the recipe refuses data without boxes. Numpy only."""

from __future__ import annotations

import colorsys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import train
from train import box_augment as ba
from train.data import DataError
from train.transforms import Transform, transforms_for

BACKGROUND = (90, 90, 90)
COLOURS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}  # class -> the solid colour of its object
MEAN = (0.485, 0.456, 0.406)


def _scene(h=72, w=96) -> dict:
    """Three solid rectangles on a gray background, each under its box, classes naming the colours."""
    img = np.empty((h, w, 3), np.uint8)
    img[...] = BACKGROUND
    boxes = np.float32([[4, 6, 30, 40], [40, 20, 90, 64], [60, 2, 80, 16]])
    for (x0, y0, x1, y1), colour in zip(boxes.astype(int), COLOURS.values()):
        img[y0:y1, x0:x1] = colour
    return {"image": img, "boxes": boxes, "classes": np.int32([0, 1, 2])}


def _check_objects(out: dict) -> None:
    img = np.asarray(out["image"])
    h, w = img.shape[:2]
    boxes, classes = out["boxes"], out["classes"]
    assert len(boxes) >= 1 and boxes.shape == (len(classes), 4) and boxes.dtype == np.float32
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    for (x0, y0, x1, y1), c in zip(boxes, classes):
        assert (x0, y0, x1, y1) == tuple(np.round([x0, y0, x1, y1])), "integer crops and offsets keep boxes on pixels"
        region = img[int(y0):int(y1), int(x0):int(x1)]
        assert region.size and (region == COLOURS[int(c)]).all(), f"class {c} box no longer covers its object"


@pytest.mark.parametrize("kind", ["array", "pil"])
def test_geometric_steps_keep_every_object_under_its_box(kind):
    ex = _scene()
    if kind == "pil":
        ex = {**ex, "image": Image.fromarray(ex["image"])}
    cropped = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        for out in (ba.iou_crop(ex, rng), ba.zoom_out(ex, rng, MEAN, p=1.0),
                    ba.iou_crop(ba.zoom_out(ex, rng, MEAN, p=1.0), rng)):
            assert isinstance(out["image"], Image.Image if kind == "pil" else np.ndarray)
            _check_objects(out)
        cropped += np.asarray(out["image"]).shape != (72, 96, 3)
    assert cropped > 20  # the crops did happen


def _coded_image(h, w) -> np.ndarray:
    """Each pixel holds its own (x, y): a crop tells where it was taken."""
    y, x = np.mgrid[:h, :w]
    return np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)


@pytest.mark.parametrize("minimum", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_iou_crop_meets_the_drawn_minimum_and_keeps_boxes_centred_inside(minimum):
    h, w = 100, 120
    boxes = np.float32([[10, 10, 90, 80], [70, 50, 115, 95], [2, 60, 30, 98]])
    ex = {"image": _coded_image(h, w), "boxes": boxes, "classes": np.int32([0, 1, 2])}
    widths = []
    for seed in range({0.0: 60, 0.9: 5}.get(minimum, 15)):  # few crops qualify at 0.9: each takes many rounds
        out = ba.iou_crop(ex, np.random.default_rng(seed), options=(minimum,))
        img = out["image"]
        ch, cw = img.shape[:2]
        left, top = int(img[0, 0, 0]), int(img[0, 0, 1])
        window = (left, top, left + cw, top + ch)
        assert 0.3 <= cw / w <= 1 and 0.3 <= ch / h <= 1 and 0.5 <= cw / ch <= 2
        widths.append(cw / w)
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        inside = (left < cx) & (cx < left + cw) & (top < cy) & (cy < top + ch)
        assert ba._box_iou(boxes[inside], window).max() >= minimum
        np.testing.assert_array_equal(out["classes"], np.flatnonzero(inside))
        expected = np.clip(boxes[inside] - [left, top, left, top], 0, [cw, ch, cw, ch])
        np.testing.assert_array_equal(out["boxes"], expected.astype(np.float32))
    if minimum == 0.0:
        assert min(widths) < 0.45  # small crops are drawn too


def test_iou_crop_keeps_the_whole_image_when_drawn_and_examples_without_boxes():
    ex = _scene()
    assert ba.iou_crop(ex, np.random.default_rng(0), options=(None,)) is ex
    empty = {**ex, "boxes": np.zeros((0, 4), np.float32), "classes": np.zeros(0, np.int32)}
    assert ba.iou_crop(empty, np.random.default_rng(0)) is empty
    # the default options keep the whole image in about 1/7 of the draws (more: rounds with no qualifying crop redraw)
    kept = sum(ba.iou_crop(ex, np.random.default_rng(s)) is ex for s in range(300))
    assert 20 <= kept <= 120


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_zoom_out_shifts_boxes_by_the_offset_onto_a_mean_filled_canvas(dtype):
    ex = _scene(40, 50)
    bound = 255 if dtype == np.uint8 else 1.0
    image = ex["image"] if dtype == np.uint8 else (ex["image"] / np.float32(255)).astype(np.float32)
    ex = {**ex, "image": image}
    fill = np.asarray(MEAN) * bound
    fill = np.round(fill).astype(dtype) if dtype == np.uint8 else fill.astype(dtype)
    sides = []
    for seed in range(20):
        out = ba.zoom_out(ex, np.random.default_rng(seed), MEAN, p=1.0)
        canvas = out["image"]
        assert canvas.dtype == dtype
        ch, cw = canvas.shape[:2]
        sides.append(cw / 50)
        assert 1 <= cw / 50 <= 4 and 1 <= ch / 40 <= 4
        shift = out["boxes"] - ex["boxes"]
        left, top = shift[0, 0], shift[0, 1]
        np.testing.assert_array_equal(shift, np.broadcast_to([left, top, left, top], shift.shape))
        left, top = int(left), int(top)
        np.testing.assert_array_equal(canvas[top:top + 40, left:left + 50], image)
        outside = np.ones((ch, cw), bool)
        outside[top:top + 40, left:left + 50] = False
        assert (canvas[outside] == fill).all()
        np.testing.assert_array_equal(out["classes"], ex["classes"])
    assert max(sides) > 2.5  # the canvas does grow, up to 4x
    zoomed = sum(ba.zoom_out(ex, np.random.default_rng(s), MEAN)["image"] is not image for s in range(200))
    assert 70 <= zoomed <= 130  # p = 0.5
    # a 1-channel image gets the mean colour's gray (torchvision's grayscale weights: 117 of 255)
    gray = ba.zoom_out({**ex, "image": _scene(40, 50)["image"][..., 0]}, np.random.default_rng(0), MEAN, p=1.0)["image"]
    assert gray.ndim == 2 and (gray == 117).sum() == gray.size - 40 * 50


@pytest.mark.parametrize("kind", ["uint8", "float32", "pil", "gray"])
def test_photometric_distortion_leaves_boxes_bit_identical(kind):
    ex = _scene()
    image = {"uint8": ex["image"], "float32": (ex["image"] / np.float32(255)).astype(np.float32),
             "pil": Image.fromarray(ex["image"]), "gray": ex["image"][..., 0]}[kind]
    ex = {**ex, "image": image}
    before = np.asarray(image)
    changed = 0
    for seed in range(30):
        out = ba.photometric_distort(ex, np.random.default_rng(seed))
        assert out["boxes"] is ex["boxes"] and out["classes"] is ex["classes"]
        assert out["boxes"].tobytes() == _scene()["boxes"].tobytes()
        after = np.asarray(out["image"])
        assert type(out["image"]) is type(image) and after.dtype == before.dtype and after.shape == before.shape
        assert after.min() >= 0 and after.max() <= (1.0 if kind == "float32" else 255)
        x0, y0, x1, y1 = ex["boxes"][1].astype(int)
        region = after[y0:y1, x0:x1]
        assert (region == region[0, 0]).all()  # a solid object stays solid
        changed += not np.array_equal(after, before)
    assert changed > 15


def test_photometric_distortion_is_the_same_on_uint8_and_float_images():
    ex = _scene()
    as_float = {**ex, "image": (ex["image"] / np.float32(255)).astype(np.float32)}
    for seed in range(10):
        u8 = ba.photometric_distort(ex, np.random.default_rng(seed))["image"]
        f32 = ba.photometric_distort(as_float, np.random.default_rng(seed))["image"]
        np.testing.assert_array_equal(u8, np.rint(f32 * 255).astype(np.uint8))  # rounded, not truncated


def test_photometric_ranges():
    """On a mid gray (unmoved by saturation, hue and channel order), contrast around the image's own mean does
    nothing either: what remains is brightness, a factor in [0.875, 1.125] applied in about half the draws."""
    ex = {"image": np.full((8, 8, 3), 128, np.uint8), "boxes": np.zeros((0, 4), np.float32)}
    values = [int(ba.photometric_distort(ex, np.random.default_rng(s))["image"][0, 0, 0]) for s in range(200)]
    assert min(values) >= round(128 * 0.875) and max(values) <= round(128 * 1.125)
    assert 70 <= sum(v != 128 for v in values) <= 130
    assert max(values) - min(values) >= 25  # the factors spread over the range


def test_hue_shift_is_colorsys_hsv_rotation():
    x = np.random.default_rng(0).random((12, 12, 3)).astype(np.float32)
    x[0, 0], x[0, 1], x[0, 2] = 0.4, 0.0, (1.0, 1.0, 0.2)  # gray, black, two channels at the maximum
    for shift in (0.05, -0.03, 0.5):
        expected = [colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
                    for h, s, v in (colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3).astype(float))]
        np.testing.assert_allclose(ba._shift_hue(x, shift).reshape(-1, 3), expected, atol=1e-5)


def test_recipe_is_deterministic_under_a_seed():
    ex = {**_scene(), "image": Image.fromarray(_scene()["image"])}

    def run(seed):
        out = ba.augment(ex, "ssd", np.random.default_rng(seed), fill=MEAN)
        return np.asarray(out["image"]).tobytes(), out["boxes"].tobytes(), out["classes"].tobytes()

    assert all(run(s) == run(s) for s in range(8))
    assert len({run(s) for s in range(6)}) > 3


def _model_cfg(**kw):
    return SimpleNamespace(input_size=(3, 32, 32)[1:], mean=MEAN, std=(0.229, 0.224, 0.225), in_chans=3,
                           interpolation="bilinear", crop_pct=0.875, **kw)


def test_training_transform_runs_the_recipe_then_resizes():
    data = train.DataConfig(box_augment="ssd")
    tf, ev = transforms_for(data, _model_cfg(), required=("boxes", "classes"))
    ex = _scene()
    sizes, canvas = set(), 0
    # the zoom-out canvas (the mean colour in uint8) normalized: no pixel of the scene has this value
    fill = (np.round(np.asarray(MEAN) * 255) / 255 - MEAN) / np.asarray((0.229, 0.224, 0.225))
    for seed in range(10):
        out = tf(ex, np.random.default_rng(seed))
        assert out["image"].shape == (32, 32, 3)
        canvas += np.isclose(out["image"], fill, atol=1e-5).all(-1).any()
        b = out["boxes"]
        assert len(b) >= 1 and len(b) == len(out["classes"]) and (b >= 0).all() and (b <= 32).all()
        sizes.add(np.round(b[0], 3).tobytes())
    assert len(sizes) > 3 and canvas >= 2
    plain = transforms_for(train.DataConfig(), _model_cfg(), required=("boxes", "classes"))[1]
    np.testing.assert_array_equal(ev(ex, None)["image"], plain(ex, None)["image"])  # evaluation is untouched


def test_data_without_boxes_is_refused_with_the_fix():
    with pytest.raises(DataError, match=r"carry no boxes: set data.box_augment=''"):
        transforms_for(train.DataConfig(box_augment="ssd"), _model_cfg(), required=("label",))
    tf = Transform(size=(32, 32), mean=MEAN, std=(1, 1, 1), channels=3, train=True, box_augment="ssd")
    with pytest.raises(DataError, match=r"no boxes \(it has image, label\).*set data.box_augment=''"):
        tf({"image": _scene()["image"], "label": 1}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="box_augment must be '' .off. or one of ssd, not 'yolo'"):
        Transform(size=(32, 32), mean=MEAN, std=(1, 1, 1), channels=3, train=True, box_augment="yolo")
